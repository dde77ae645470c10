"""DeepSpeed ZeRO-1/2/3 under `accelerate launch`: 2 CPU processes (gloo) reproduce 1 process.

The same deterministic set-up as test_distributed.py (helpers.DIST_RUN: rollout.source=data, completions of uneven
lengths across ranks, 2 ranks x 2 micro-batches vs 1 process x 1 micro-batch of 4). DeepSpeed comes
either from a shipped accelerate config (on a CPU accelerate resolves it to MULTI_CPU and passes it
on in the environment, which the run honours) or from the `deepspeed_stage` key.

DeepSpeed reduces a zero gradient for a trainable parameter that got none (one process leaves it
without a gradient, and AdamW skips it): such entries must be exactly zero and their weights equal.
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers import DIST_STEPS, dist_overrides, launch, max_diff, one_process, optimizer_state, step_rows, weights
from safetensors.torch import load_file

from visual_opsd import sharded_checkpoint
from visual_opsd.backends.hf import HFBackend
from visual_opsd.config import load_config
from visual_opsd.engines import FRAGMENT
from visual_opsd.faults import DUMP_ENV, ENV
from visual_opsd.train import TrainConfig, run_train

pytestmark = pytest.mark.slow  # every test launches 2 processes (accelerate launch)


def assert_grads_match(one, two) -> None:
    """Every step's whole gradients: equal on the parameters one process has a gradient for, and
    exactly zero on the others."""
    for step in range(1, DIST_STEPS + 1):
        a, b = (load_file(str(d / "grads" / f"grads-{step}.safetensors")) for d in (one, two))
        assert a and set(a) <= set(b), f"step {step}: gradients missing under ZeRO: {sorted(set(a) - set(b))[:5]}"
        assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6, f"step {step}"
        assert all(float(b[k].abs().max()) == 0 for k in set(b) - set(a)), f"step {step}"


def assert_optimizer_matches(one, two) -> None:
    """AdamW's state of two last/ in torch's per-parameter layout: whole tensors in their shapes, not
    DeepSpeed's flat partitions (a ZeRO-3 checkpoint's shards are read whole and reshaped)."""
    if not any(sharded_checkpoint.is_sharded(d / "last") for d in (one, two)):
        groups = [torch.load(d / "last" / "optimizer.pt", weights_only=True)["param_groups"] for d in (one, two)]
        assert groups[0][0]["params"] == groups[1][0]["params"]  # torch's layout
    opt_a, opt_b = optimizer_state(one / "last"), optimizer_state(two / "last")
    assert opt_a and set(opt_a) <= set(opt_b)
    for i, state in opt_a.items():
        for k, v in state.items():
            assert v.shape == opt_b[i][k].shape and float((v - opt_b[i][k]).abs().max()) < 1e-6


@pytest.mark.parametrize("stage, config", [(1, None), (2, "deepspeed_zero2.yaml"), (3, "deepspeed_zero3.yaml")])
def test_zero_two_processes_match_one_process(tiny_model, single, tmp_path, stage, config):
    """ZeRO-`stage` on 2 processes x 2 micro-batches reproduces one plain process: gradients, losses,
    gradient norms, and after 3 steps the weights, the EMA teacher (a shadow of partitions under
    ZeRO-3), the AdamW state and the validation-best model. ZeRO-2 and ZeRO-3 come from the shipped
    accelerate configs (on a CPU accelerate resolves them to MULTI_CPU; the run takes the stage from
    the launcher's environment), ZeRO-1 from the `deepspeed_stage` key."""
    out = tmp_path / f"zero{stage}"
    ask = {} if config else {"deepspeed_stage": stage}
    proc = launch(
        2,
        dist_overrides(tiny_model, out, **ask, **{"optim.grad_accum": 2}),
        config=config,
        **{DUMP_ENV: str(out / "grads")},
    )
    assert f"train: 2 processes, engine zero{stage}" in proc.stdout
    assert_grads_match(single, out)
    assert max_diff(weights(single / "last"), weights(out / "last")) < 1e-6
    assert max_diff(weights(single / "best"), weights(out / "best")) < 1e-6
    assert_optimizer_matches(single, out)
    for a, b in zip(step_rows(single), step_rows(out), strict=True):
        assert b["tokens"] == a["tokens"] == sum(b["tokens/per_rank"])
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-7)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5, abs=1e-7)
    # every rank writes what it holds (ZeRO-3: its partitions; ZeRO-1/2: its pieces of AdamW's state)
    last = out / "last"
    assert sharded_checkpoint.is_sharded(last) and not (last / "optimizer.pt").exists()
    assert sorted(p.name for p in (last / "dcp").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    if stage < 3:  # a moment split inside a parameter between the ranks, joined again on reading
        pieces = [k for k in sharded_checkpoint._metadata(last) if FRAGMENT in k]
        assert pieces and any(not k.endswith(f"{FRAGMENT}0") for k in pieces)
    written = sorted(p.name for p in out.iterdir())  # rank 0 alone wrote
    assert written == ["best", "config.json", "grads", "last", "last.prev", "metrics.jsonl"]


def test_zero_checkpoints_resume_on_another_engine(tiny_model, single, tmp_path):
    """Step 1 under ZeRO-3 on 2 processes (each rank's partitions), step 2 under ZeRO-2 on 2 processes
    (the weights once, each rank its pieces of AdamW's state), step 3 in one plain process (the pieces
    joined into whole tensors in torch's layout): the weights, teacher and optimizer state of one
    uninterrupted process (DeepSpeed's optimizer state is loaded into its partitions)."""
    out = tmp_path / "mixed"
    launch(2, dist_overrides(tiny_model, out, deepspeed_stage=3, stop_at_step=1))
    launch(2, dist_overrides(tiny_model, out, deepspeed_stage=2, resume=out / "last", stop_at_step=2))
    assert sharded_checkpoint.is_sharded(out / "last")
    assert json.loads((out / "last" / "trainer_state.json").read_text())["step"] == 2
    run_train(load_config(TrainConfig, None, dist_overrides(tiny_model, out, resume=out / "last")))
    assert not sharded_checkpoint.is_sharded(out / "last")  # one plain process writes whole tensors
    assert max_diff(weights(single / "last"), weights(out / "last")) < 1e-6
    assert_optimizer_matches(single, out)
    assert [r["step"] for r in step_rows(out)] == list(range(1, DIST_STEPS + 1))


def test_zero3_writes_its_partitions_and_resumes_under_zero3_and_fsdp(tiny_model, single, tmp_path):
    """ZeRO-3's last/ holds each rank's partitions (DCP, one file per rank; flat 1-D tensors with their
    whole shapes in sharded.json), never the whole model: it resumes under ZeRO-3 on 2 processes, and
    that one's under FSDP2 (whole tensors into the shards), ending on the uninterrupted weights,
    teacher and AdamW state; `visual-opsd export` of it is the student's model folder."""
    out = tmp_path / "z3"
    launch(2, dist_overrides(tiny_model, out, deepspeed_stage=3, stop_at_step=1))
    last = out / "last"
    assert sharded_checkpoint.is_sharded(last) and not (last / "model").exists()
    assert sorted(p.name for p in (last / "dcp").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    info = json.loads((last / sharded_checkpoint.INFO).read_text())
    whole = weights(single / "last")
    model = sharded_checkpoint.read_whole(last, "model/")  # reshaped from the flat partitions
    assert {k: list(v.shape) for k, v in model.items()} == {k: list(v.shape) for k, v in whole.items()
                                                             if not k.startswith("teacher/")}
    assert info["shapes"] and all(len(shape) >= 1 for shape in info["shapes"].values())
    assert any(len(shape) == 2 for shape in info["shapes"].values())  # matrices were stored flat
    launch(2, dist_overrides(tiny_model, out, deepspeed_stage=3, resume=last, stop_at_step=2))
    assert sharded_checkpoint.is_sharded(last) and json.loads((last / "trainer_state.json").read_text())["step"] == 2
    launch(2, dist_overrides(tiny_model, out, shard_weights="true", resume=last))
    assert max_diff(weights(single / "last", teacher=True), weights(out / "last", teacher=True)) < 1e-6
    assert_optimizer_matches(single, out)
    assert [r["step"] for r in step_rows(out)] == list(range(1, DIST_STEPS + 1))


def test_a_sharded_fsdp_checkpoint_resumes_under_zero(tiny_model, single, tmp_path):
    """Step 1 under FSDP2 (last/ written as each rank's shards, torch.distributed.checkpoint), steps 2-3
    under ZeRO-2: DeepSpeed gets the shards' optimizer state as whole tensors; the weights, teacher and
    AdamW state of one uninterrupted process."""
    out = tmp_path / "mixed"
    launch(2, dist_overrides(tiny_model, out, shard_weights="true", stop_at_step=1))
    assert sharded_checkpoint.is_sharded(out / "last")
    launch(2, dist_overrides(tiny_model, out, deepspeed_stage=2, resume=out / "last"))
    assert max_diff(weights(single / "last"), weights(out / "last")) < 1e-6
    assert_optimizer_matches(single, out)
    assert [r["step"] for r in step_rows(out)] == list(range(1, DIST_STEPS + 1))


def test_zero3_skips_a_non_finite_step_on_every_rank(tiny_model, tmp_path, monkeypatch):
    """A NaN loss on rank 1 alone at step 2: DeepSpeed finds the non-finite gradient norm on every
    rank and skips the step; the run ends on the weights of one process that skipped step 2."""
    ref = tmp_path / "single"
    monkeypatch.setenv(ENV, "nan:loss@2")
    run_train(load_config(TrainConfig, None, dist_overrides(tiny_model, ref)))
    monkeypatch.delenv(ENV)
    out = tmp_path / "zero3"
    launch(2, dist_overrides(tiny_model, out, deepspeed_stage=3, **{"optim.grad_accum": 2}), **{ENV: "nan:loss@2/1"})
    rows, ref_rows = step_rows(out), step_rows(ref)
    assert [r["step"] for r in rows if "skipped" in r] == [2] == [r["step"] for r in ref_rows if "skipped" in r]
    assert max_diff(weights(ref / "last"), weights(out / "last")) < 1e-6


def test_zero3_samples_rollouts_of_different_lengths_without_collectives(tiny_model, tmp_path):
    """On-policy sampling: each rank decodes its own completions (different lengths) on the weights
    gathered once per step, so no rank waits on a collective the other never issues."""
    out = tmp_path / "sample"
    # an untrained model rarely stops early: long budgets make early stops, so lengths, differ by rank
    sampling = {"rollout.source": "sample", "rollout.max_new_tokens": 160, "rollout.n": 2, "optim.steps": 2}
    launch(2, dist_overrides(tiny_model, out, deepspeed_stage=3, **sampling))
    rows = step_rows(out)
    assert [r["step"] for r in rows] == [1, 2] and all(r["tokens"] > 0 for r in rows)
    assert any(len(set(r["tokens/per_rank"])) > 1 for r in rows), "ranks sampled equal lengths"


def test_zero3_runs_the_hugging_face_backend_as_one_process(tmp_path):
    """ZeRO-3 gathers every weight itself, so the HF backend (which calls its inner model and output
    head outside the root forward; FSDP2 needs `in_forward` for that) runs under it and matches one
    process."""
    model = tmp_path / "model"
    HFBackend.tiny("qwen2_5_vl").save(model)
    one, two = one_process(model, tmp_path / "one"), tmp_path / "two"
    args = dist_overrides(model, two, deepspeed_stage=3, **{"optim.grad_accum": 2})
    launch(2, args, **{DUMP_ENV: str(two / "grads")})
    assert_grads_match(one, two)
    assert max_diff(weights(one / "last"), weights(two / "last")) < 1e-6
