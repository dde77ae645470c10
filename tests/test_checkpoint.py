"""Atomic folder writes: complete folders appear whole, failed writes leave the old one untouched."""

from __future__ import annotations

import pytest

from visual_opsd.checkpoint import TMP_PREFIX, atomic_dir


def test_success_publishes_and_replaces(tmp_path):
    dest = tmp_path / "ckpt"
    with atomic_dir(dest) as tmp:
        (tmp / "w.txt").write_text("one")
        assert not dest.exists()
    assert (dest / "w.txt").read_text() == "one"
    with atomic_dir(dest) as tmp:
        (tmp / "w.txt").write_text("two")
    assert (dest / "w.txt").read_text() == "two"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_failure_keeps_previous_and_leaves_no_temporary(tmp_path):
    dest = tmp_path / "ckpt"
    with atomic_dir(dest) as tmp:
        (tmp / "w.txt").write_text("good")
    with pytest.raises(RuntimeError):
        with atomic_dir(dest) as tmp:
            (tmp / "w.txt").write_text("half")
            raise RuntimeError("killed mid-write")
    assert (dest / "w.txt").read_text() == "good"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(TMP_PREFIX)]
