"""Model families behind one small interface (`base.Backend`): the built-in miniature unified model
(`mini`), Hugging Face vision-language models (`hf`) and BAGEL / ThinkMorph-7B (`bagel`).
`load_backend` opens a saved folder of any kind; heavy imports (transformers, diffusers) happen only
when a folder of that kind is opened."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from visual_opsd.backends.bagel import BagelLoadOptions
    from visual_opsd.backends.base import Backend
    from visual_opsd.backends.hf_config import HFOptions


def is_bagel_folder(path: str | Path) -> bool:
    """A BAGEL checkpoint folder: the released layout (llm_config.json + vit_config.json), also ours."""
    path = Path(path)
    return (path / "llm_config.json").is_file() and (path / "vit_config.json").is_file()


def backend_kind(path: str | Path) -> str:
    """"mini", "hf" or "bagel" for a saved model folder; a clear error for anything else."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no model folder at {path}")
    if is_bagel_folder(path):  # before config.json: a released BAGEL folder may carry one too
        return "bagel"
    config = path / "config.json"
    if config.is_file():
        data = json.loads(config.read_text())
        if data.get("format") == "visual_opsd.mini":
            return "mini"
        if "model_type" in data:
            return "hf"
    elif (path / "adapter" / "adapter_config.json").is_file():
        return "hf"  # an HF LoRA checkpoint saved as the adapter alone
    raise ValueError(
        f"{path}: not a model folder this package can load (expected a mini-model checkpoint, whose config.json "
        "has format visual_opsd.mini, a Hugging Face folder, whose config.json has a model_type, or a BAGEL "
        "folder with llm_config.json and vit_config.json)"
    )


def load_backend(path: str | Path, hf: HFOptions | None = None, resume: bool = False,
                 bagel: BagelLoadOptions | None = None) -> Backend:
    """The backend saved at `path`: mini checkpoints as they are; HF folders prepared per `hf`
    (LoRA, dtype, ...), where `resume=True` continues a LoRA checkpoint's own adapter (exact resume);
    BAGEL folders per `bagel` (default: the whole model, generation side included, fp32 weights on
    this process's GPU or the CPU; the generation side stays frozen in training)."""
    kind = backend_kind(path)
    if kind == "mini":
        from visual_opsd.backends.mini import MiniBackend

        return MiniBackend.load(path)
    if kind == "bagel":
        from visual_opsd.backends.bagel import BagelBackend, BagelLoadOptions

        return BagelBackend.from_options(path, bagel or BagelLoadOptions(understanding_only=False, dtype="float32"))
    from visual_opsd.backends.hf import HFBackend

    return HFBackend.load(path, hf, resume=resume)


def maze_cell_px(backend: Backend) -> int:
    """Pixels per maze cell that give the backend one image patch / token per cell."""
    cell = getattr(backend, "cell_px", None)
    return int(cell) if cell else int(backend.cfg.patch_size)
