"""Fault injection: killed runs, corrupt checkpoints, non-finite steps, resource budgets.

Each test injects one failure into a real (tiny) training run and checks what the program does;
docs/failure-modes.md lists them. Kills are real SIGKILLs of a child process at points chosen by a
seeded RNG (rollout, optimizer step, checkpoint writing), via `visual_opsd.faults`.
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
from pathlib import Path

import pytest
import torch
from helpers import SHORT_RUN, assert_same, cli, run_overrides, step_rows, weights

from visual_opsd.backends.mini import MiniBackend
from visual_opsd.checkpoint import resolve_checkpoint, verify_manifest
from visual_opsd.config import load_config
from visual_opsd.errors import BudgetError, CheckpointError, TrainingAborted
from visual_opsd.faults import ENV
from visual_opsd.train import TrainConfig, run_train

STEPS = int(SHORT_RUN["optim.steps"])
# one random step per kill point, drawn once from a fixed seed (reproducible "random points")
_rng = random.Random(10)
KILLS = [
    ("rollout", _rng.randint(2, STEPS)),
    ("optimizer", _rng.randint(2, STEPS)),
    ("checkpoint", _rng.randint(2, STEPS)),
]


def overrides(model: Path, out: Path, **extra) -> list[str]:
    return run_overrides(model, out, SHORT_RUN, **extra)


def train(model: Path, out: Path, **extra) -> Path:
    return run_train(load_config(TrainConfig, None, overrides(model, out, **extra)))


def step_of(folder: Path) -> int:
    return json.loads((folder / "trainer_state.json").read_text())["step"]


@pytest.fixture(scope="module")
def reference(tiny_model, tmp_path_factory) -> Path:
    """The uninterrupted run every faulty run must reproduce."""
    out = tmp_path_factory.mktemp("ref") / "run"
    train(tiny_model, out)
    return out


# --- killed runs ----------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("point,step", KILLS, ids=[f"{p}@{s}" for p, s in KILLS])
def test_sigkill_then_resume_gives_identical_weights(tiny_model, reference, tmp_path, point, step):
    out = tmp_path / "run"
    proc = cli(["train", *overrides(tiny_model, out)], fault=f"kill:{point}@{step}")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    # the checkpoint left is the last complete one; a half-written one exists only under a temporary name
    last = resolve_checkpoint(out / "last")
    assert last == out / "last" and verify_manifest(last) == []
    assert step_of(last) == step - 1
    partial = [p for p in out.iterdir() if p.name.startswith(".tmp-")]
    if point == "checkpoint":
        assert partial and not (partial[0] / "optimizer.pt").exists(), "expected a half-written temporary"
    train(tiny_model, out, resume=out / "last")
    assert_same(weights(reference / "last", teacher=True), weights(out / "last", teacher=True))
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp-")]  # leftovers cleaned on resume
    assert [r["step"] for r in step_rows(out)] == list(range(1, STEPS + 1))  # each step logged once


# --- corrupt checkpoints --------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_corrupt_last_falls_back_to_previous(tiny_model, reference, tmp_path, caplog, damage):
    out = tmp_path / "run"
    train(tiny_model, out, stop_at_step=3)
    weights_file = out / "last" / "model" / "model.safetensors"
    data = weights_file.read_bytes()
    if damage == "truncate":
        weights_file.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        weights_file.write_bytes(data[:-10] + bytes([data[-10] ^ 1]) + data[-9:])
    else:
        weights_file.unlink()
    problems = verify_manifest(out / "last")
    assert len(problems) == 1 and str(weights_file) in problems[0]
    with caplog.at_level(logging.WARNING):
        assert resolve_checkpoint(out / "last") == out / "last.prev"
    assert str(weights_file) in caplog.text and "last.prev" in caplog.text
    # resuming replays step 3 from the step-2 checkpoint: the same final weights
    train(tiny_model, out, resume=out / "last")
    assert_same(weights(reference / "last", teacher=True), weights(out / "last", teacher=True))


def _no_good_checkpoint(model: Path, out: Path) -> Path:
    """A run stopped at step 2 whose last/ and last.prev/ both have a truncated optimizer.pt."""
    train(model, out, stop_at_step=2)
    for name in ("last", "last.prev"):
        f = out / name / "optimizer.pt"
        f.write_bytes(f.read_bytes()[:100])
    return out


def test_no_good_checkpoint_stops_with_a_clear_message(tiny_model, tmp_path):
    out = _no_good_checkpoint(tiny_model, tmp_path / "run")
    with pytest.raises(CheckpointError, match=r"optimizer\.pt: \d+ bytes, the manifest says \d+"):
        resolve_checkpoint(out / "last")


@pytest.mark.slow
def test_no_good_checkpoint_exits_3_from_the_cli(tiny_model, tmp_path):
    out = _no_good_checkpoint(tiny_model, tmp_path / "run")
    proc = cli(["train", *overrides(tiny_model, out, resume=out / "last")])
    assert proc.returncode == 3
    assert "CheckpointError: cannot resume from" in proc.stderr and "Traceback" not in proc.stderr
    assert str(out / "last" / "optimizer.pt") in proc.stderr


def test_crash_between_the_publishing_renames_uses_previous(tiny_model, tmp_path):
    """last/ moved to last.prev/ but the new one not yet renamed into place: the resume finds last.prev/."""
    out = tmp_path / "run"
    train(tiny_model, out, stop_at_step=2)
    os.replace(out / "last", out / "gone")
    assert resolve_checkpoint(out / "last") == out / "last.prev"


def test_malicious_pickle_is_not_executed(tiny_model, tmp_path):
    """optimizer.pt is read with weights_only=True: a pickle that would run code is refused."""
    import pickle

    from visual_opsd.teacher import Teacher
    from visual_opsd.train import load_train_state

    out = tmp_path / "run"
    train(tiny_model, out, stop_at_step=1)
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (out / "last" / "optimizer.pt").write_bytes(pickle.dumps(Exploit(), protocol=2))
    backend = MiniBackend.load(out / "last" / "model")
    opt = torch.optim.AdamW(backend.model.parameters())
    with pytest.raises(CheckpointError, match="optimizer.pt: cannot be loaded"):
        load_train_state(out / "last", opt, Teacher(backend.model, "ema"))
    assert not marker.exists()


# --- non-finite losses and gradients ------------------------------------------------------------


def test_non_finite_step_is_skipped_and_logged(tiny_model, tmp_path, monkeypatch, caplog):
    out = tmp_path / "run"
    monkeypatch.setenv(ENV, "nan:loss@2,inf:grad@3")
    with caplog.at_level(logging.WARNING):
        train(tiny_model, out)
    rows = step_rows(out)
    skipped = {r["step"]: r for r in rows if "skipped" in r}
    assert sorted(skipped) == [2, 3]
    assert len(skipped[2]["samples"]) == 4 and skipped[3]["bad_steps"] == 2
    assert "step 2: non-finite loss" in caplog.text and skipped[2]["samples"][0] in caplog.text
    assert rows[-1]["step"] == STEPS and "skipped" not in rows[-1]
    assert all(torch.isfinite(t).all() for t in weights(out / "last", teacher=True).values())


def test_consecutive_non_finite_steps_abort_leaving_last_good(tiny_model, tmp_path, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setenv(ENV, "nan:loss@2,nan:loss@3")
    with pytest.raises(TrainingAborted, match=r"2 consecutive non-finite steps .*last good checkpoint .* \(step 2\)"):
        train(tiny_model, out, **{"optim.max_bad_steps": 2})
    # step 2 was skipped (its checkpoint holds step 1's weights), step 3 aborted without writing
    assert step_of(out / "last") == 2 and verify_manifest(out / "last") == []
    assert_same(weights(out / "last.prev", teacher=True), weights(out / "last", teacher=True))
    assert all(torch.isfinite(t).all() for t in weights(out / "last", teacher=True).values())


@pytest.mark.slow
def test_consecutive_non_finite_steps_exit_3_from_the_cli(tiny_model, tmp_path):
    """The command line says the same as TrainingAborted above in one line, with exit code 3."""
    proc = cli(["train", *overrides(tiny_model, tmp_path / "cli", **{"optim.max_bad_steps": 1})], fault="nan:loss@1")
    assert proc.returncode == 3 and "TrainingAborted" in proc.stderr and "Traceback" not in proc.stderr


# --- resource budgets ----------------------------------------------------------------------------


def test_sequence_budget_fails_before_allocating(tiny_model, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(BudgetError, match=r"up to \d+ tokens per row .* > limits.max_sequence_tokens=20"):
        train(tiny_model, out, **{"limits.max_sequence_tokens": 20})
    assert not (out / "last").exists() and not (out / "metrics.jsonl").exists()


def test_memory_budget_fails_with_every_term(tiny_model, tmp_path):
    with pytest.raises(BudgetError) as info:
        train(tiny_model, tmp_path / "run", **{"limits.max_memory_gb": 1e-5})
    message = str(info.value)
    for term in ("weights", "gradients", "optimizer (AdamW, 2 states)", "teacher shadow", "activations", "logits"):
        assert term in message
    train(
        tiny_model,
        tmp_path / "ok",
        **{"limits.max_memory_gb": 1.0, "limits.max_sequence_tokens": 4096, "optim.steps": 1},
    )


# --- bad data reaching the command line ----------------------------------------------------------


def test_bad_training_data_is_one_located_line(tiny_model, tmp_path, capsys):
    from visual_opsd.cli import main

    folder = tmp_path / "ds"
    folder.mkdir()
    (folder / "data.jsonl").write_text('{"id": "a", "question": "q?", "answer": "B"}\n{"id": "b", "question": 3}\n')
    rc = main(["train", *overrides(tiny_model, tmp_path / "run", **{"data.path": folder})])
    err = capsys.readouterr().err
    assert rc == 2 and "data error:" in err and "row b: question: expected str, got int" in err


def test_training_can_skip_invalid_rows(tiny_model, tmp_path, caplog):
    """data.skip_invalid=true: bad rows are counted and listed in a warning, the run goes on."""
    from visual_opsd.data import write_dataset
    from visual_opsd.tasks import get_task

    good = get_task("maze").generate(4, seed=0, split="train", sizes=(3, 3), cell_px=4)
    folder = write_dataset(good, tmp_path / "ds")
    with open(folder / "data.jsonl", "a") as f:
        f.write('{"id": "bad", "question": "", "answer": "R"}\nnot json\n')
    with caplog.at_level(logging.WARNING):
        train(tiny_model, tmp_path / "run", **{"data.path": folder, "data.skip_invalid": "true", "optim.steps": 1})
    assert "skipped 2 invalid rows" in caplog.text and "row bad: question: empty" in caplog.text
