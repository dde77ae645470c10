"""Atomic folder writes: complete folders appear whole, failed writes leave the old one untouched."""

from __future__ import annotations

import pytest
import torch

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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_partition_view_is_handed_to_dcp_without_a_copy(dtype):
    """ZeRO-3's partitions are views into flat buffers; DCP's writer would clone each (and keep the
    clones until the file is written). `_own_storage` gives the same memory a storage of its own size."""
    from visual_opsd.engines import _own_storage

    flat = torch.arange(100, dtype=torch.float32).to(dtype)
    view = flat[10:30]
    own = _own_storage(view)
    assert own.untyped_storage().nbytes() == own.nbytes == view.nbytes and own.dtype == dtype
    assert own.data_ptr() == view.data_ptr() and torch.equal(own, view)
    own[0] = -1  # the same memory: a write shows in the buffer
    assert float(flat[10]) == -1
    whole = torch.ones(4, dtype=dtype)
    assert _own_storage(whole) is whole
    strided = flat.view(10, 10)[:, 0]  # not contiguous: left to DCP as it is
    assert _own_storage(strided) is strided


def test_pieces_of_a_sharded_checkpoint_join_or_name_what_is_wrong(tmp_path):
    """ZeRO-1/2's pieces `NAME#START` join in order into NAME and take the whole shape `sharded.json`
    records; a gap between pieces or a wrong element count is a CheckpointError naming the tensor."""
    import json

    from visual_opsd import sharded_checkpoint
    from visual_opsd.errors import CheckpointError

    (tmp_path / sharded_checkpoint.INFO).write_text(json.dumps(
        {"format": sharded_checkpoint.FORMAT, "shapes": {"optim/w/exp_avg": [2, 3]}}))
    whole = torch.arange(6.0)
    pieces = {"optim/w/exp_avg#4": whole[4:], "optim/w/exp_avg#0": whole[:4], "optim/w/step": torch.tensor(2.0)}
    out = sharded_checkpoint._assemble(tmp_path, pieces)
    assert torch.equal(out["optim/w/exp_avg"], whole.view(2, 3)) and float(out["optim/w/step"]) == 2.0
    with pytest.raises(CheckpointError, match="pieces of optim/w/exp_avg do not join up"):
        sharded_checkpoint._assemble(tmp_path, {"optim/w/exp_avg#0": whole[:3], "optim/w/exp_avg#4": whole[4:]})
    with pytest.raises(CheckpointError, match="optim/w/exp_avg has 5 elements"):
        sharded_checkpoint._assemble(tmp_path, {"optim/w/exp_avg#0": whole[:5]})
