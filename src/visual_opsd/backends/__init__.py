"""Model families behind one small interface (`base.Backend`): the built-in miniature unified model
(`mini`) and Hugging Face vision-language models (`hf`). `load_backend` opens a saved folder of
either kind; heavy imports (transformers) happen only when an HF folder is opened."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from visual_opsd.backends.base import Backend
    from visual_opsd.backends.hf_config import HFOptions


def backend_kind(path: str | Path) -> str:
    """"mini" or "hf" for a saved model folder; a clear error for anything else."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no model folder at {path}")
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
        "has format visual_opsd.mini, or a Hugging Face folder, whose config.json has a model_type)"
    )


def load_backend(path: str | Path, hf: HFOptions | None = None, resume: bool = False) -> Backend:
    """The backend saved at `path`: mini checkpoints as they are; HF folders prepared per `hf`
    (LoRA, dtype, ...). `resume=True` continues a LoRA checkpoint's own adapter (exact resume)."""
    if backend_kind(path) == "mini":
        from visual_opsd.backends.mini import MiniBackend

        return MiniBackend.load(path)
    from visual_opsd.backends.hf import HFBackend

    return HFBackend.load(path, hf, resume=resume)


def maze_cell_px(backend: Backend) -> int:
    """Pixels per maze cell that give the backend one image patch / token per cell."""
    cell = getattr(backend, "cell_px", None)
    return int(cell) if cell else int(backend.cfg.patch_size)
