"""Atomic writes of checkpoint and dataset folders.

A folder is written in full under a temporary name beside its destination and renamed into place
only once complete, so a run that dies mid-write leaves the previous good folder (or nothing),
never a half-written one that a resume could pick up.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

TMP_PREFIX = ".tmp-"


@contextlib.contextmanager
def atomic_dir(final_path: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder; on success it replaces `final_path`, on error it is removed.

    The temporary folder sits in the same parent (same file system), so the final rename is atomic.
    An existing `final_path` is moved aside first and deleted only after the new one is in place.
    """
    final_path = Path(final_path)
    final_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX + final_path.name + "-", dir=final_path.parent))
    try:
        yield tmp
        _fsync_tree(tmp)
        old = None
        if final_path.exists():
            old = final_path.with_name(f"{TMP_PREFIX}old-{final_path.name}-{os.getpid()}")
            os.replace(final_path, old)
        os.replace(tmp, final_path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fsync_tree(root: Path) -> None:
    """Flush every file so that a rename never publishes data still sitting in the page cache."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
