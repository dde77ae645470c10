"""Sharded checkpoints of sharded runs: every process writes its own shards of `last/` with DCP.

Under FSDP2 and DeepSpeed ZeRO-3 a process holds 1/N of the weights, of AdamW's state and of the
EMA teacher's shadow; under ZeRO-1/2, 1/N of AdamW's state. A whole-tensor checkpoint gathers all of
it through one process (ThinkMorph-7B: 14.6 B parameters, ~58 GB of fp32 weights alone, plus twice
that of AdamW state). Instead every rank writes what it holds with `torch.distributed.checkpoint`
(DCP); nothing is gathered. FSDP2's shards are DTensors of the whole tensors; ZeRO-3's partitions
are flat slices, written as 1-D DTensors of the flattened tensors; ZeRO-1/2's pieces of AdamW's
state are written as `NAME#START` (the piece's first element in the flattened tensor). Reading a
tensor whole joins its pieces and reshapes it to its whole shape, which `sharded.json` records
(`shapes`) for every tensor stored flat (`_assemble`).

    last/
      dcp/                 DCP's files: one `__<rank>_0.distcp` per rank, and `.metadata` (every
                           tensor's whole shape and where its pieces lie)
      sharded.json         the format, the model folder the run started from (`model_from`) and its
                           backend options, the optimizer's param groups and parameter names, and
                           the whole shapes of the tensors stored flat (ZeRO)
      trainer_state.json   step, best, ... (as in every checkpoint)
      manifest.json        size + SHA-256 of every file, every rank's included

Tensors: `model/NAME` (the model's state dict: trainable and frozen weights, buffers),
`optim/NAME/KEY` (AdamW's `step`, `exp_avg`, `exp_avg_sq` of every trainable parameter that has
them), `teacher/NAME` (the EMA shadow). The folder is published by `checkpoint.shared_atomic_dir`:
written under a temporary name by all ranks, checksummed and renamed by rank 0 once every rank is
done, the previous one kept as `last.prev/`; a run killed mid-write leaves no `last/` that a resume
could load. It lives on a file system every rank sees.

Resume (`train.open_run`), on any number of processes and any engine: the model is opened from the
run's `init_from` (architecture, config, tokenizer) and its weights replaced by the checkpoint's
(`load_model`: whole tensors, before the engine lays them out, as a fresh run loads `init_from`);
then the optimizer state and the teacher's shadow (`load_state`): in place, so under FSDP2 each rank
reads only the pieces of its own shards whatever the process count that wrote them (DCP reshards
on load) and one plain process reads whole tensors; DeepSpeed ZeRO gets whole tensors through its
engine's loader, and so does any engine resuming a ZeRO (flat) checkpoint. The unsharded
checkpoint layout (`train.save_train_state`) is unchanged.

Export (`visual-opsd export CHECKPOINT --out DIR`, `export`): the student's weights in the model
family's own folder layout (HF `save_pretrained`, BAGEL's released layout, mini), which eval,
diagnose and train open; in one process, without a process group.
"""

from __future__ import annotations

import json
import math
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

from visual_opsd.checkpoint import atomic_dir, resolve_checkpoint, shared_atomic_dir
from visual_opsd.engines import FRAGMENT
from visual_opsd.errors import CheckpointError, ConfigError
from visual_opsd.faults import maybe_kill

FORMAT = "visual_opsd.dcp"
INFO = "sharded.json"
DCP_DIR = "dcp"


def is_sharded(path: str | Path) -> bool:
    """Whether the checkpoint folder `path` holds shards (DCP) rather than whole tensors."""
    return (Path(path) / INFO).is_file()


def save(path: Path, engine: Any, teacher: Any, dist: Any, model_from: str | Path, backend: dict | None,
         trainer_state: dict) -> None:
    """Write checkpoint `path` (every rank calls it): each rank its shards of the model, the
    optimizer and the teacher (`engine.named_state`), rank 0 the JSON files; published atomically
    with a manifest, the previous one kept as `<path>.prev`. `model_from`: the model folder the run
    started from, `backend`: its backend options as plain data (what `export` opens)."""
    import torch.distributed.checkpoint as dcp

    with shared_atomic_dir(path, dist, manifest=True, keep_previous=True) as tmp:
        dcp.save(engine.named_state(teacher), checkpoint_id=tmp / DCP_DIR)
        maybe_kill("checkpoint", trainer_state["step"])  # fault injection: a half-written checkpoint
        shapes = engine.whole_shapes(teacher)
        if dist.is_main:
            info = {"format": FORMAT, "model_from": str(Path(model_from).resolve()), "backend": backend,
                    "processes": dist.world, "param_groups": engine.param_groups(),
                    "names": engine.names,  # the optimizer's parameters in order (torch's index layout)
                    "shapes": shapes}
            (tmp / INFO).write_text(json.dumps(info, indent=2))
            (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2))


def read_info(path: Path) -> dict[str, Any]:
    """`sharded.json` of checkpoint `path`; a `CheckpointError` when unreadable or not ours."""
    try:
        info = json.loads((path / INFO).read_text())
        if info.get("format") != FORMAT:
            raise ValueError(f"format {info.get('format')!r}, expected {FORMAT!r}")
        return info
    except (OSError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{path / INFO}: not a readable sharded checkpoint ({e})") from None


def _load(path: Path, target: dict[str, torch.Tensor]) -> None:
    """DCP load of `target`'s tensors, in place, from checkpoint `path` (a collective when a process
    group is up); any failure is a `CheckpointError` naming the folder."""
    import torch.distributed.checkpoint as dcp

    try:
        with warnings.catch_warnings():  # without a process group (one process, `export`) is intended
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(target, checkpoint_id=path / DCP_DIR)
    except Exception as e:  # a missing key, a mismatched shape, an unreadable file: one clear message
        raise CheckpointError(f"{path / DCP_DIR}: cannot be loaded ({type(e).__name__}: {str(e)[:300]})") from e


def _metadata(path: Path) -> dict[str, Any]:
    """Every tensor of the checkpoint: name -> DCP's storage metadata (whole `size`, `properties.dtype`)."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        return dict(FileSystemReader(str(path / DCP_DIR)).read_metadata().state_dict_metadata)
    except Exception as e:
        raise CheckpointError(f"{path / DCP_DIR}: no readable DCP metadata ({type(e).__name__}: {e})") from e


def load_model(path: Path, model: torch.nn.Module) -> None:
    """The checkpoint's weights into `model` (unsharded: whole tensors), in place."""
    if not read_info(path).get("shapes"):
        _load(path, {f"model/{k}": v for k, v in model.state_dict().items()})
        return
    whole = read_whole(path, "model/")  # flat partitions (ZeRO-3): read whole, then reshaped
    with torch.no_grad():
        for k, v in model.state_dict().items():
            if k not in whole or whole[k].shape != v.shape:
                raise CheckpointError(f"{path}: model/{k} is missing or not shaped as the model's {list(v.shape)}")
            v.copy_(whole[k])


def read_whole(path: Path, prefix: str) -> dict[str, torch.Tensor]:
    """Every tensor whose name starts with `prefix`, whole and in its own shape, by the rest of its
    name (e.g. `teacher/` -> {NAME: tensor}); in one process, or every rank (a collective)."""
    items = {k: md for k, md in _metadata(path).items() if k.startswith(prefix)}
    target = {k: torch.empty(tuple(md.size), dtype=md.properties.dtype) for k, md in items.items()}
    if target:
        _load(path, target)
    return {k[len(prefix):]: v for k, v in _assemble(path, target).items()}


def _assemble(path: Path, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Whole tensors in their shapes: pieces `NAME#START` (ZeRO-1/2's AdamW fragments) joined in
    order into NAME, and every tensor stored flat reshaped to its whole shape (`shapes`)."""
    shapes = read_info(path).get("shapes", {})
    out, pieces = {}, {}
    for key, value in tensors.items():
        base, sep, start = key.partition(FRAGMENT)
        if sep:
            pieces.setdefault(base, []).append((int(start), value.reshape(-1)))
        else:
            out[key] = value
    for base, parts in pieces.items():
        parts.sort(key=lambda part: part[0])
        starts = [start for start, _ in parts]
        ends = [start + v.numel() for start, v in parts]
        if starts[0] != 0 or starts[1:] != ends[:-1]:
            raise CheckpointError(f"{path}: the pieces of {base} do not join up (starts {starts}, ends {ends})")
        out[base] = torch.cat([v for _, v in parts])
    for key, shape in shapes.items():
        if key in out:
            if out[key].numel() != math.prod(shape):
                raise CheckpointError(f"{path}: {key} has {out[key].numel()} elements, its shape {shape} needs "
                                      f"{math.prod(shape)}")
            out[key] = out[key].view(shape)
    return out


def load_state(path: Path, engine: Any, teacher: Any) -> dict[str, Any]:
    """The optimizer state and the teacher's shadow of checkpoint `path` into the run's engine and
    teacher (every rank calls it; the model's weights came first, `load_model`); returns the
    trainer state. In place where the engine allows it (each rank reads its shards' pieces), else
    as whole tensors through `engine.load_optimizer` (DeepSpeed)."""
    info = read_info(path)
    saved: dict[str, dict[str, tuple[list[int], torch.dtype]]] = {}  # name -> key -> (shape, dtype)
    for key, md in _metadata(path).items():
        if key.startswith("optim/"):
            name, _, item = key[len("optim/"):].partition(FRAGMENT)[0].rpartition("/")
            saved.setdefault(name, {})[item] = (list(md.size), md.properties.dtype)
    unknown = sorted(set(saved) - set(engine.names))
    if unknown:
        raise CheckpointError(f"{path}: optimizer state for parameters this run does not train: {unknown[:5]}")
    groups = [{k: tuple(v) if isinstance(v, list) else v for k, v in g.items()} for g in info["param_groups"]]
    if engine.in_place_state and not info.get("shapes"):  # (flat partitions are not this run's layout)
        engine.add_optimizer_state(saved)
        _load(path, engine.named_state(teacher, model=False))
        for group, saved_group in zip(engine.optimizer.param_groups, groups, strict=True):
            group.update(saved_group)
    else:
        moments = read_whole(path, "optim/")
        state = {i: {k: moments[f"{name}/{k}"] for k in saved[name]}
                 for i, name in enumerate(engine.names) if name in saved}
        engine.load_optimizer({"state": state, "param_groups": groups})
        if teacher.shadow:
            teacher.load_state_dict(read_whole(path, "teacher/"))
    try:
        return json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path / 'trainer_state.json'}: cannot be loaded ({e})") from None


def backend_options(data: dict | None) -> Any:
    """A backend options object from its plain data (`sharded.json`'s `backend`); None stays None."""
    if data is None:
        return None
    from visual_opsd.backends import FAMILIES
    from visual_opsd.config import from_dict

    return from_dict(FAMILIES[data["kind"]].options, data, prefix="backend.")


def export(checkpoint: str | Path, out: str | Path, model_from: str | Path | None = None) -> Path:
    """The student of a training checkpoint as a model folder at `out` (written atomically; `out`
    must not hold anything yet): a sharded checkpoint's weights loaded into the model folder it
    records (or `model_from`) and saved in the family's layout; an unsharded one's `model/` copied.
    A checkpoint that fails its manifest falls back to `<checkpoint>.prev` as a resume would."""
    from visual_opsd.backends import open_backend

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {out} already exists and is not an empty folder; choose a new one")
    path = resolve_checkpoint(checkpoint)
    if not is_sharded(path):
        if not (path / "model").is_dir():
            raise ConfigError(f"{path}: not a training checkpoint (neither {INFO} nor model/)")
        with atomic_dir(out) as tmp:
            shutil.copytree(path / "model", tmp, dirs_exist_ok=True)
        return out
    info = read_info(path)
    source = Path(model_from or info["model_from"])
    try:
        backend = open_backend(source, backend_options(info.get("backend")))
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"the model folder the checkpoint was trained from cannot be opened ({e}); name one "
                          "with the same architecture with --model-from") from None
    load_model(path, backend.model)
    with atomic_dir(out) as tmp:
        backend.save(tmp)
    return out
