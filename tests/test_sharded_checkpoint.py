"""Sharded checkpoints of FSDP2 runs (`visual_opsd/sharded_checkpoint.py`): every rank writes its own
shards of `last/` with torch.distributed.checkpoint; killed, corrupted and resumed on another process
count, they end on the weights of the uninterrupted one-process run; `visual-opsd export` makes a
model folder that `eval` opens.

The reference is conftest's `single` (one plain process, helpers.DIST_RUN); the other resume paths
(sharded -> one process -> sharded again, through configs/accelerate/fsdp.yaml) are in
test_distributed.py.
"""

from __future__ import annotations

import json
import logging

import pytest
from helpers import DIST_STEPS, dist_overrides, launch, max_diff, optimizer_state, step_rows, weights
from safetensors.torch import load_file

from visual_opsd import sharded_checkpoint
from visual_opsd.checkpoint import resolve_checkpoint, verify_manifest
from visual_opsd.cli import main
from visual_opsd.config import load_config
from visual_opsd.faults import ENV
from visual_opsd.train import TrainConfig, run_train

pytestmark = pytest.mark.slow  # every test launches 2 processes (accelerate launch)

FAST_EVAL = ["--n", "2", "--sizes", "3", "3", "--warmup", "1", "--latency-n", "1", "--max-new-tokens", "4",
             "--no-progress", "threads=1"]


def step_of(folder) -> int:
    return json.loads((folder / "trainer_state.json").read_text())["step"]


def assert_same_run(reference, out) -> None:
    """Student, EMA teacher and AdamW state (whole tensors, sharded or not) of two last/ within 1e-6."""
    assert max_diff(weights(reference / "last", teacher=True), weights(out / "last", teacher=True)) < 1e-6
    opt_a, opt_b = optimizer_state(reference / "last"), optimizer_state(out / "last")
    assert opt_a.keys() == opt_b.keys()
    assert max(max_diff(opt_a[i], opt_b[i]) for i in opt_a) < 1e-6


def test_killed_while_writing_resumes_from_the_last_published_shards(tiny_model, single, tmp_path, capsys):
    """Both ranks SIGKILLed after writing their shards of step 2, before rank 0 published them: last/
    is still step 1's sharded checkpoint (each rank's .distcp, DCP's metadata, the manifest over all),
    the unpublished one only a temporary. Its export opens in `eval`; resumed on 2 processes the run
    ends on the uninterrupted weights and EMA teacher."""
    out = tmp_path / "run"
    args = dist_overrides(tiny_model, out, shard_weights="true")
    proc = launch(2, args, check=False, **{ENV: "kill:checkpoint@2"})
    assert proc.returncode != 0, proc.stdout[-2000:]
    last = resolve_checkpoint(out / "last")
    assert last == out / "last" and verify_manifest(last) == [] and step_of(last) == 1
    files = sorted(p.name for p in (last / "dcp").iterdir())
    assert files == [".metadata", "__0_0.distcp", "__1_0.distcp"]  # each rank wrote its own shard
    assert set(json.loads((last / "manifest.json").read_text())["files"]) >= {f"dcp/{f}" for f in files}
    assert not (last / "model").exists() and not (last / "optimizer.pt").exists()  # nothing gathered
    partial = [p for p in out.iterdir() if p.name.startswith(".tmp-last")]
    assert partial and not (partial[0] / "trainer_state.json").exists(), "expected an unpublished temporary"

    # eval cannot open the shards themselves and says how to make a model folder of them
    assert main(["eval", "--system", f"raw={last}", "--out", str(tmp_path / "e0"), *FAST_EVAL]) == 2
    assert "visual-opsd export" in capsys.readouterr().err
    exported = tmp_path / "exported"
    assert main(["export", str(last), "--out", str(exported)]) == 0
    model = {k.removeprefix("model/"): v for k, v in sharded_checkpoint.read_whole(last, "model/").items()}
    assert max_diff(load_file(str(exported / "model.safetensors")), model) == 0
    assert main(["eval", "--system", f"step1={exported}", "--out", str(tmp_path / "eval"), *FAST_EVAL]) == 0
    assert json.loads((tmp_path / "eval" / "results.json").read_text())["step1"]["tasks"]["maze"]["n"] == 2
    assert main(["export", str(last), "--out", str(exported)]) == 2  # never overwrites a folder

    launch(2, dist_overrides(tiny_model, out, shard_weights="true", resume=out / "last"))
    assert sharded_checkpoint.is_sharded(out / "last") and step_of(out / "last") == DIST_STEPS
    assert_same_run(single, out)
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp-")]  # leftovers cleaned on resume
    assert [r["step"] for r in step_rows(out)] == list(range(1, DIST_STEPS + 1))


def test_a_corrupt_shard_falls_back_to_the_previous_and_resumes_in_one_process(tiny_model, single, tmp_path,
                                                                                caplog):
    """A flipped byte in rank 1's shard of last/ is named by the manifest check; the resume takes
    last.prev/ (step 1), written by 2 processes, into one plain process (DCP reshards on load: whole
    tensors), replays steps 2 and 3 and ends on the uninterrupted weights, teacher and AdamW state."""
    out = tmp_path / "run"
    launch(2, dist_overrides(tiny_model, out, shard_weights="true", stop_at_step=2))
    assert step_of(out / "last") == 2 and step_of(out / "last.prev") == 1
    shard = out / "last" / "dcp" / "__1_0.distcp"
    data = shard.read_bytes()
    shard.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])
    problems = verify_manifest(out / "last")
    assert len(problems) == 1 and str(shard) in problems[0]
    with caplog.at_level(logging.WARNING):
        run_train(load_config(TrainConfig, None, dist_overrides(tiny_model, out, resume=out / "last")))
    assert "last.prev" in caplog.text
    assert not sharded_checkpoint.is_sharded(out / "last")  # one plain process writes whole tensors
    assert_same_run(single, out)
    assert [r["step"] for r in step_rows(out)] == list(range(1, DIST_STEPS + 1))
