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


def test_manifest_and_previous_checkpoint(tmp_path):
    from visual_opsd.checkpoint import MANIFEST, resolve_checkpoint, verify_manifest
    from visual_opsd.errors import CheckpointError

    dest = tmp_path / "last"
    for text in ("one", "two"):
        with atomic_dir(dest, manifest=True, keep_previous=True) as tmp:
            (tmp / "sub").mkdir()
            (tmp / "sub" / "w.bin").write_text(text)
    assert (dest / "sub" / "w.bin").read_text() == "two"
    assert (tmp_path / "last.prev" / "sub" / "w.bin").read_text() == "one"
    assert (dest / MANIFEST).is_file() and verify_manifest(dest) == [] == verify_manifest(tmp_path / "last.prev")
    (dest / "sub" / "w.bin").write_text("twx")  # same size, altered
    assert verify_manifest(dest) == [f"{dest / 'sub' / 'w.bin'}: SHA-256 does not match the manifest (altered)"]
    assert resolve_checkpoint(dest) == tmp_path / "last.prev"
    (tmp_path / "last.prev" / "sub" / "w.bin").write_text("")
    with pytest.raises(CheckpointError, match="0 bytes, the manifest says 3"):
        resolve_checkpoint(dest)
