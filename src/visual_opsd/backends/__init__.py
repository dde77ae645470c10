"""Model families behind one small interface (`base.Backend`), and the registry that opens them.

A family registers, in `FAMILIES` below, one line: its `kind` (a config's `backend.kind`), how to
recognise a saved folder of it (reading config files only), its options dataclass (the config's
`backend:` section) and the module that opens it (imported only when such a folder is opened, so
that no command pays for transformers unless it uses a Hugging Face model). That module provides
`open_folder(path, options, resume) -> Backend`. Adding a family is one module and one line here
(docs/architecture.md).

    mini   the built-in miniature unified model (`mini.py`)
    hf     Hugging Face vision-language models (`hf.py`; options in `hf_config.py`, which does not
           import transformers)
    bagel  BAGEL / ThinkMorph-7B (`bagel.py`)
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

from visual_opsd.backends.bagel import BagelLoadOptions
from visual_opsd.backends.hf_config import HFOptions
from visual_opsd.backends.mini import MiniOptions

if TYPE_CHECKING:
    from visual_opsd.backends.base import Backend


@dataclass(frozen=True)
class Family:
    kind: str
    recognise: Callable[[Path], bool]
    options: type  # a dataclass with `kind: Literal[<kind>]`
    module: str  # provides open_folder(path, options, resume) -> Backend
    # the options of a run whose config has no backend section
    default_options: Callable[[], Any] | None = None


def is_bagel_folder(path: str | Path) -> bool:
    """A BAGEL checkpoint folder: the released layout (llm_config.json + vit_config.json), also ours."""
    path = Path(path)
    return (path / "llm_config.json").is_file() and (path / "vit_config.json").is_file()


def _config_json(path: Path) -> dict:
    try:
        data = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _is_mini_folder(path: Path) -> bool:
    return _config_json(path).get("format") == "visual_opsd.mini"


def _is_hf_folder(path: Path) -> bool:
    # a folder with a transformers config, or an HF LoRA checkpoint saved as the adapter alone
    return "model_type" in _config_json(path) or (path / "adapter" / "adapter_config.json").is_file()


# Order matters: a released BAGEL folder may carry a config.json too, so it is recognised first.
FAMILIES: dict[str, Family] = {f.kind: f for f in (
    Family("bagel", is_bagel_folder, BagelLoadOptions, "visual_opsd.backends.bagel",
           default_options=lambda: BagelLoadOptions(understanding_only=False, dtype="float32")),
    Family("mini", _is_mini_folder, MiniOptions, "visual_opsd.backends.mini"),
    Family("hf", _is_hf_folder, HFOptions, "visual_opsd.backends.hf"),
)}
# the type of a config's `backend:` section: one of the families' options, chosen by its `kind`
BackendOptions = Union[tuple(f.options for f in FAMILIES.values())]  # noqa: UP007 (built at run time)


def family_of(path: str | Path) -> Family:
    """The family of the saved model folder at `path`; a clear error for anything else."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no model folder at {path}")
    for family in FAMILIES.values():
        if family.recognise(path):
            return family
    if (path / "sharded.json").is_file():  # sharded_checkpoint.INFO (not imported: this module stays light)
        raise ValueError(f"{path}: a sharded training checkpoint (an FSDP2 run's shards, no model folder); make a "
                         f"model folder of it with `visual-opsd export {path} --out DIR`")
    raise ValueError(
        f"{path}: not a model folder this package can load (expected a mini-model checkpoint, whose config.json "
        "has format visual_opsd.mini, a Hugging Face folder, whose config.json has a model_type, or a BAGEL "
        "folder with llm_config.json and vit_config.json)"
    )


def backend_kind(path: str | Path) -> str:
    """"mini", "hf" or "bagel" (a registered kind) for a saved model folder."""
    return family_of(path).kind


def open_backend(path: str | Path, options: Any = None, resume: bool = False) -> Backend:
    """The backend saved at `path`, opened as `options` (the config's `backend:` section, whose
    kind must match the folder's; None: the family's defaults). `resume=True` continues a
    checkpoint's own trainable state (an HF LoRA checkpoint's adapter) for an exact resume."""
    from visual_opsd.errors import ConfigError

    family = family_of(path)
    if options is None:
        options = family.default_options() if family.default_options else family.options()
    elif getattr(options, "kind", None) != family.kind:
        raise ConfigError(f"backend.kind is {getattr(options, 'kind', None)!r} but {path} is a {family.kind} "
                          f"model folder; set backend.kind={family.kind} or drop the backend section")
    return importlib.import_module(family.module).open_folder(Path(path), options, resume)
