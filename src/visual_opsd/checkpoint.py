"""Atomic writes of checkpoint and dataset folders.

A folder is written in full under a temporary name beside its destination and renamed into place
only once complete, so a run that dies mid-write leaves the previous good folder (or nothing),
never a half-written one that a resume could pick up.

Training checkpoints also carry `manifest.json`: the size and SHA-256 of every file, written last.
`verify_manifest` names any file that is missing, truncated or altered; `resolve_checkpoint` uses
the previous good checkpoint (`last.prev/`, kept by `atomic_dir(..., keep_previous=True)`) when
the requested one fails the check, or stops with a `CheckpointError` that says why.
`shared_atomic_dir` is the same for a folder every process writes into (sharded checkpoints,
`sharded_checkpoint.py`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from visual_opsd.errors import CheckpointError

logger = logging.getLogger(__name__)

TMP_PREFIX = ".tmp-"
MANIFEST = "manifest.json"
PREVIOUS_SUFFIX = ".prev"


@contextlib.contextmanager
def atomic_dir(final_path: str | Path, *, manifest: bool = False, keep_previous: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder; on success it replaces `final_path`, on error it is removed.

    The temporary folder sits in the same parent (same file system), so the final rename is atomic.
    An existing `final_path` is moved aside first and deleted only after the new one is in place;
    with `keep_previous` it becomes `<final_path>.prev` instead (the fallback of a corrupt one).
    `manifest` writes `manifest.json` (size + SHA-256 of every file) once the body is done.
    """
    final_path = Path(final_path)
    tmp = _temporary(final_path)
    try:
        yield tmp
        _publish(tmp, final_path, manifest, keep_previous)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def shared_atomic_dir(final_path: str | Path, dist: Any, *, manifest: bool = False,
                      keep_previous: bool = False) -> Iterator[Path]:
    """`atomic_dir` written by every process of a run together (`dist`: `distributed.Dist`; every
    rank enters it): rank 0 makes the temporary folder and tells the others its name, each rank
    writes its own files into it, and once all are done (a barrier) rank 0 writes the manifest and
    renames the folder into place. A rank that dies mid-write leaves only the temporary folder
    (removed at the next start by `remove_stale_temporaries`), never a published half-checkpoint.
    The folder must be on a file system every rank sees (one machine, or a shared one)."""
    final_path = Path(final_path)
    tmp = Path(dist.gather_objects(str(_temporary(final_path)) if dist.is_main else None)[0])
    try:
        yield tmp
        dist.barrier()  # every rank's files are complete (and flushed by their writers)
        if dist.is_main:
            _publish(tmp, final_path, manifest, keep_previous)
    except BaseException:
        if dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def _temporary(final_path: Path) -> Path:
    """A new empty folder beside `final_path` (same file system: the final rename is atomic)."""
    final_path.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=TMP_PREFIX + final_path.name + "-", dir=final_path.parent))


def _publish(tmp: Path, final_path: Path, manifest: bool, keep_previous: bool) -> None:
    """The manifest, then `tmp` renamed to `final_path` (the old one moved aside or to `.prev`)."""
    if manifest:
        write_manifest(tmp)
    _fsync_tree(tmp)
    old = None
    previous = final_path.with_name(final_path.name + PREVIOUS_SUFFIX)
    if keep_previous and final_path.exists():
        # a crash between these renames leaves `previous` (good) and no `final_path`: the
        # resume falls back to `previous`; nothing half-written is ever published
        if previous.exists():
            old = previous.with_name(f"{TMP_PREFIX}old-{previous.name}-{os.getpid()}")
            os.replace(previous, old)
        os.replace(final_path, previous)
    elif final_path.exists():
        old = final_path.with_name(f"{TMP_PREFIX}old-{final_path.name}-{os.getpid()}")
        os.replace(final_path, old)
    os.replace(tmp, final_path)
    _fsync_dir(final_path.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete `.tmp-*` folders left in `folder` by a run killed mid-write (call only when no other
    process writes there, i.e. at the start of a run); returns what was removed."""
    folder = Path(folder)
    stale = [p for p in folder.glob(TMP_PREFIX + "*") if p.is_dir()] if folder.is_dir() else []
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    if stale:
        logger.info("removed %d half-written temporaries in %s", len(stale), folder)
    return stale


def _sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_manifest(folder: str | Path) -> Path:
    """Write `folder/manifest.json`: `{"files": {relative path: {"size", "sha256"}}}` for every file."""
    folder = Path(folder)
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST):
        files[path.relative_to(folder).as_posix()] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    out = folder / MANIFEST
    out.write_text(json.dumps({"format": 1, "files": files}, indent=1))
    return out


def verify_manifest(folder: str | Path) -> list[str]:
    """Problems of a checkpoint folder against its manifest, each naming the file; [] when intact.

    A folder without a manifest (written before manifests existed) cannot be checked: [] with a warning.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return [f"{folder}: no such checkpoint folder"]
    manifest = folder / MANIFEST
    if not manifest.is_file():
        logger.warning("%s: no %s; the checkpoint cannot be verified", folder, MANIFEST)
        return []
    try:
        files = json.loads(manifest.read_text())["files"]
        if not isinstance(files, dict):
            raise TypeError("files is not a mapping")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        return [f"{manifest}: unreadable manifest ({e})"]
    problems = []
    for rel, entry in files.items():
        path = folder / rel
        if not path.is_file():
            problems.append(f"{path}: missing")
            continue
        size = path.stat().st_size
        if size != entry.get("size"):
            problems.append(f"{path}: {size} bytes, the manifest says {entry.get('size')} (truncated or replaced)")
        elif _sha256(path) != entry.get("sha256"):
            problems.append(f"{path}: SHA-256 does not match the manifest (altered)")
    return problems


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint to resume from: `path` if it verifies, else `<path>.prev` if that does.

    Raises `CheckpointError` naming every failing file when neither is usable.
    """
    path = Path(path)
    problems = verify_manifest(path)
    if not problems:
        return path
    previous = path.with_name(path.name + PREVIOUS_SUFFIX)
    previous_problems = verify_manifest(previous) if previous.is_dir() else [f"{previous}: no such checkpoint folder"]
    if not previous_problems:
        logger.warning("checkpoint %s is not usable (%s); resuming from the previous one, %s",
                       path, "; ".join(problems), previous)
        return previous
    raise CheckpointError(
        f"cannot resume from {path}: {'; '.join(problems)}; nor from the previous checkpoint: "
        f"{'; '.join(previous_problems)}"
    )


def _fsync_tree(root: Path) -> None:
    """Flush every file so that a rename never publishes data still sitting in the page cache."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())


def _fsync_dir(folder: Path) -> None:
    """Make the renames themselves durable (the directory entry), where the OS allows it."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
