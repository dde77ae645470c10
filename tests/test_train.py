"""The Visual-OPSD loop on a tiny random mini model: exact resume after SIGKILL, the loss's
reductions (sequence_mean by hand, split-invariant normalisation for both), the controls, and the
checkpoints it leaves."""

from __future__ import annotations

import json
import re
import signal
from pathlib import Path

import pytest
import torch
from helpers import SHORT_RUN, assert_same, cli, metrics_rows, run_overrides, step_rows, train_dumping_grads, weights
from safetensors.torch import load_file

from visual_opsd.backends.mini import MiniBackend
from visual_opsd.config import load_config
from visual_opsd.errors import ConfigError
from visual_opsd.losses import generalized_jsd
from visual_opsd.rollout import Rollout, collect_rollout
from visual_opsd.tasks import get_task
from visual_opsd.teacher import Teacher
from visual_opsd.train import (
    LossConfig,
    TrainConfig,
    batch_indices,
    distill_loss,
    loss_normalizer,
    run_train,
    teacher_contexts,
)

RUN = {**SHORT_RUN, "data.n_val": "4", "eval.max_new_tokens": "12", "optim.steps": "6"}


def overrides(model: Path, out: Path, **extra) -> list[str]:
    return run_overrides(model, out, RUN, **extra)


def test_batches_cover_each_epoch_once():
    seen = [i for step in range(3) for i in batch_indices(12, step, 4, seed=3)]
    assert sorted(seen) == list(range(12))
    assert batch_indices(12, 1, 4, seed=3) == batch_indices(12, 1, 4, seed=3)


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted(tiny_model, tmp_path):
    """`visual-opsd train` SIGKILLed half way through step 4 (after the optimizer step changed the
    weights, before the teacher update and the checkpoint: the `kill:optimizer@4` fault point), then
    resumed from last/: the same weights (student and EMA teacher), bit for bit, as an uninterrupted run."""
    ref = tmp_path / "ref"
    run_train(load_config(TrainConfig, None, overrides(tiny_model, ref)))

    killed = tmp_path / "killed"
    proc = cli(["train", *overrides(tiny_model, killed)], fault="kill:optimizer@4")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    state = json.loads((killed / "last" / "trainer_state.json").read_text())
    assert state["step"] == 3  # the last complete checkpoint, step 4's never started
    assert [r["step"] for r in step_rows(killed)] == [1, 2, 3]
    assert not [p for p in killed.iterdir() if p.name.startswith(".tmp-") and (p / "trainer_state.json").exists()]

    run_train(load_config(TrainConfig, None, overrides(tiny_model, killed, resume=killed / "last")))
    assert_same(weights(ref / "last", teacher=True), weights(killed / "last", teacher=True))
    assert [r["step"] for r in step_rows(killed)] == [1, 2, 3, 4, 5, 6]


def _split_run(model: Path, out: Path, accum: int, reduction: str, fused: bool) -> list[tuple[float, float, int]]:
    """A 2-step deterministic run (completions from the data) with `accum` micro-batches per step;
    its gradients are dumped under out/grads. Returns (loss, grad_norm, tokens) per step."""
    train_dumping_grads(
        overrides(
            model,
            out,
            **{
                "optim.grad_accum": accum,
                "optim.steps": 2,
                "rollout.source": "data",
                "loss.top_k": "null",
                "loss.clip": "null",
                "optim.lr": 1e-4,
                "loss.reduction": reduction,
                "loss.fused": str(fused).lower(),
            },
        ),
        out,
    )
    return [(r["loss"], r["grad_norm"], r["tokens"]) for r in step_rows(out)]


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("reduction", ["sequence_mean", "token_mean"])
def test_loss_does_not_depend_on_the_micro_batch_split(tiny_model, tmp_path, reduction, fused):
    """Deterministic mode (completions from the data, of uneven lengths): 1 x 4 prompts vs 2 x 2 vs
    4 x 1 per step give the same loss, gradient and gradient norm at every step, for both
    reductions (normalised by the window's completion / token count) and both loss paths."""
    logs, grads = [], []
    for accum in (1, 2, 4):
        out = tmp_path / f"acc{accum}"
        logs.append(_split_run(tiny_model, out, accum, reduction, fused))
        grads.append(load_file(str(out / "grads" / "grads-1.safetensors")))
    assert logs[0][0][0] > 0
    for other, other_grads in zip(logs[1:], grads[1:], strict=True):
        for (loss_a, grad_a, tok_a), (loss_b, grad_b, tok_b) in zip(logs[0], other, strict=True):
            assert tok_a == tok_b
            # a wrong normalisation is off by the split factor (2x, 4x); fp32 batching noise on a
            # near-zero JSD between two almost equal distributions stays far below 1e-3
            assert loss_b == pytest.approx(loss_a, rel=1e-3)
            assert grad_b == pytest.approx(grad_a, rel=1e-3)
        # the whole first-step gradient, tensor by tensor (the same weights before it)
        assert grads[0].keys() == other_grads.keys()
        for k, g in grads[0].items():
            torch.testing.assert_close(other_grads[k], g, rtol=1e-3, atol=1e-3 * float(g.abs().max()) + 1e-12)


def test_the_reduction_reaches_the_training_loss(tiny_model, tmp_path):
    """Completions of uneven lengths: the two reductions give different step losses (the key is
    wired through), and the default is the paper's sequence_mean."""
    assert TrainConfig().loss.reduction == "sequence_mean"
    seq = _split_run(tiny_model, tmp_path / "seq", 2, "sequence_mean", False)
    tok = _split_run(tiny_model, tmp_path / "tok", 2, "token_mean", False)
    assert seq[0][2] == tok[0][2]  # the logged token count does not depend on the reduction
    assert abs(seq[0][0] - tok[0][0]) > 1e-3 * abs(tok[0][0])
    with pytest.raises(ConfigError, match="reduction"):
        load_config(TrainConfig, None, ["loss.reduction=mean"])


def _uneven_rollout(backend: MiniBackend) -> tuple[list, Rollout]:
    """The data traces of 4 mazes as completions, with some ids unscored (as injected ids are) and
    one completion entirely unscored: per-completion token counts differ widely."""
    samples = get_task("maze").generate(4, seed=1, split="train", sizes=(3, 4), cell_px=4)
    ctx = [backend.build_context(s, "student") for s in samples]
    ro = collect_rollout(backend, samples, ctx, source="data")
    ro.sampled = [[j % (r + 2) != 1 for j in range(len(ids))] for r, ids in enumerate(ro.ids)]
    ro.sampled[2] = [False] * len(ro.ids[2])
    ro.ids[3] = ro.ids[3][:5]  # a short one
    ro.sampled[3] = [True] * 5
    return samples, ro


@pytest.mark.parametrize("fused", [False, True])
def test_sequence_mean_is_the_mean_over_completions_of_their_token_means(tiny_model, fused):
    """`distill_loss` with reduction=sequence_mean against a hand-written reference: per-token JSD,
    the mean over each completion's scored tokens, then the mean over the completions that have
    any; values and gradients (the logits path and the fused hidden-state path)."""
    backend = MiniBackend.load(tiny_model)
    model = backend.model
    teacher = Teacher(model, "frozen")
    with torch.no_grad():  # a student away from the teacher, so that the JSD is not ~0
        for prm in model.parameters():
            prm.add_(0.05 * torch.randn(prm.shape, generator=torch.Generator().manual_seed(prm.numel())))
    samples, ro = _uneven_rollout(backend)
    s_ctx = [backend.build_context(s, "student") for s in samples]
    t_ctx = teacher_contexts(backend, samples, samples, "data", torch.Generator().manual_seed(0))
    mask = ro.loss_mask(max(len(i) for i in ro.ids))
    params = [prm for prm in model.parameters() if prm.requires_grad]
    cfg = LossConfig(top_k=16, clip=0.05, fused=fused)
    assert cfg.reduction == "sequence_mean"

    normalizer = loss_normalizer([mask], cfg.reduction)
    assert int(normalizer) == 3  # the unscored completion does not count
    loss = distill_loss(backend, teacher, s_ctx, t_ctx, ro, cfg, normalizer, {})
    grads = torch.autograd.grad(loss, params, allow_unused=True)

    with teacher.weights():
        t_logits = backend.score(t_ctx, ro.ids).logits
    s_logits = backend.score(s_ctx, ro.ids).logits
    per_token = generalized_jsd(s_logits, t_logits, top_k=16, clip=0.05, reduction="none")  # (R, T)
    means = [per_token[r, mask[r]].mean() for r in range(len(ro.ids)) if mask[r].any()]
    ref = torch.stack(means).mean()
    ref_grads = torch.autograd.grad(ref, params, allow_unused=True)

    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-7)
    for g, r in zip(grads, ref_grads, strict=True):
        assert (g is None) == (r is None)
        if g is not None:
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6 * float(r.abs().max()) + 1e-9)
    # the other reduction is a different number here: the token mean over all scored tokens
    token_cfg = LossConfig(top_k=16, clip=0.05, fused=fused, reduction="token_mean")
    token_loss = distill_loss(backend, teacher, s_ctx, t_ctx, ro, token_cfg, loss_normalizer([mask], "token_mean"), {})
    torch.testing.assert_close(token_loss, per_token[mask].sum() / mask.sum(), rtol=1e-5, atol=1e-7)
    assert abs(token_loss.item() - ref.item()) > 1e-3 * ref.item()


@pytest.mark.parametrize("vt_mode", ["noise", "shuffled", "none"])
def test_controls_train_and_log(tiny_model, tmp_path, vt_mode):
    out = tmp_path / vt_mode
    cfg = load_config(
        TrainConfig,
        None,
        overrides(
            tiny_model,
            out,
            **{"teacher.vt_mode": vt_mode, "teacher.mode": "frozen", "optim.steps": 2, "eval.every": 2, "rollout.n": 2},
        ),
    )
    selected = run_train(cfg)
    assert selected.parent.name == "best" and (selected / "model.safetensors").is_file()
    rows = metrics_rows(out)
    steps = step_rows(out)
    assert len(steps) == 2
    for key in (
        "loss",
        "tokens",
        "rollout/length",
        "rollout/truncated",
        "rollout/parsable",
        "time/rollout",
        "time/teacher",
        "time/update",
    ):
        assert key in steps[-1]
    assert 0 < steps[-1]["memory/rss_gib"] <= steps[-1]["memory/peak_rss_gib"] < 64  # GiB, right unit
    assert "val/accuracy" in steps[-1] and rows[0]["step"] == 0 and "val/accuracy" in rows[0]


def test_a_dataset_mixing_tasks_is_validated_per_task(tiny_model, tmp_path, capsys):
    """Visual-OPSD on a dataset of two tasks (no val_path): validation takes samples of both, scores
    each by its own task, logs and prints the accuracy per task beside the overall one."""
    from visual_opsd.data import write_dataset

    mazes = get_task("maze").generate(10, seed=3, split="train", sizes=(3, 3), cell_px=4)
    for s in mazes[5:]:
        s.task = "short_answer"
    write_dataset(mazes, tmp_path / "mix")
    out = tmp_path / "run"
    cfg = load_config(TrainConfig, None, overrides(tiny_model, out, **{"data.path": tmp_path / "mix", "optim.steps": 1,
                                                                       "eval.every": 1}))
    run_train(cfg)
    first = metrics_rows(out)[0]
    assert first["step"] == 0
    assert first["val/accuracy"] == pytest.approx((first["val/accuracy/maze"] + first["val/accuracy/short_answer"]) / 2)
    printed = capsys.readouterr().out
    assert re.search(r"step 0: val accuracy \d\.\d{3}, maze \d\.\d{3}, short_answer \d\.\d{3}\n", printed)
    assert "step 1: val accuracy" in printed
