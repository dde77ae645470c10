"""Experiment tracking and console logging (`tracking.py`): a tiny SFT and a tiny Visual-OPSD run
report to TensorBoard, whose event files, read back, hold every metrics.jsonl value at its step;
batch jobs print a metrics line every `logging_steps` steps (and validation lines); a tracker whose
package is missing is one config-error line, exit 2, before out_dir exists."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
from helpers import SHORT_RUN, metrics_rows, run_overrides

from visual_opsd import tracking
from visual_opsd.cli import main
from visual_opsd.config import load_config
from visual_opsd.errors import ConfigError
from visual_opsd.optim import MetricsLog
from visual_opsd.sft import SFTConfig, run_sft
from visual_opsd.train import TrainConfig, run_train

pytestmark = pytest.mark.usefixtures("one_thread")

# tests/test_sft.py's tiny SFT
SFT_TINY = ["progress=false", "threads=1", "data.n_train=24", "data.n_val=3", "data.sizes=[3,3]", "model.d_model=32",
            "model.n_layers=1", "model.n_heads=2", "model.mlp_ratio=2.0", "model.patch_size=4",
            "model.tokenizer_tasks=[maze]", "optim.steps=4", "optim.batch_size=4", "optim.warmup_steps=1",
            "eval.every=2", "eval.vt_steps=2", "eval.max_new_tokens=12", "data.trace=text_only"]
TRAIN_RUN = {**SHORT_RUN, "optim.steps": "3", "eval.every": "3"}


def event_scalars(folder: Path) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} of the TensorBoard event files in `folder` (the run's, not its hparams')."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def assert_events_match_jsonl(out: Path) -> dict[str, dict[int, float]]:
    """Every numeric value of every metrics.jsonl row is in out/tensorboard/<run>/ at its step
    (float32 there), and nothing else is."""
    events = event_scalars(out / "tensorboard" / out.name)
    expected: dict[str, dict[int, float]] = {}
    for row in metrics_rows(out):
        for key, value in tracking.scalars(row).items():
            expected.setdefault(key, {})[row["step"]] = value
    assert set(events) == set(expected)
    for key, by_step in expected.items():
        assert events[key] == pytest.approx(by_step, rel=1e-6, abs=1e-6), key
    return events


needs_tensorboard = pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None,
                                       reason="tensorboard not installed (pip install -e '.[dev]')")


@needs_tensorboard
def test_sft_reports_to_tensorboard_and_prints_lines_in_a_batch_job(tmp_path, capsys):
    out = tmp_path / "sft_run"
    cfg = load_config(SFTConfig, None, SFT_TINY + [f"out_dir={out}", "report_to=[jsonl,tensorboard]",
                                                   "logging_steps=2"])
    run_sft(cfg)
    events = assert_events_match_jsonl(out)
    assert sorted(events["loss"]) == [1, 2, 3, 4] and sorted(events["val/accuracy/text"]) == [2, 4]
    printed = capsys.readouterr().out
    lines = [line for line in printed.splitlines() if line.startswith("step ")]
    # a metrics line at steps 2 and 4 (logging_steps=2), and the validation line of each eval (progress off)
    assert [line.split("  ")[0] for line in lines if "/4" in line.split()[1]] == ["step 2/4", "step 4/4"]
    assert re.search(r"^step 2/4  loss \d+\.\d{4}  lr \S+  grad_norm \S+  ce \S+  flow \S+  [\d.]+ s$",
                     printed, re.M)
    assert re.search(r"^step 2: text acc \d\.\d{3}$", printed, re.M) and "step 4: text acc" in printed


@needs_tensorboard
def test_train_reports_to_tensorboard_with_hparams(tiny_model, tmp_path, capsys):
    out = tmp_path / "opsd_run"
    args = run_overrides(tiny_model, out, TRAIN_RUN, report_to="[jsonl,tensorboard]", logging_steps=2)
    run_train(load_config(TrainConfig, None, args))
    events = assert_events_match_jsonl(out)
    assert sorted(events["loss"]) == [1, 2, 3] and sorted(events["val/accuracy"]) == [0, 3]
    # the config, flattened, as TensorBoard hparams (and accelerate's hparams.yml) beside the run
    assert list((out / "tensorboard" / out.name).glob("*/hparams.yml"))
    printed = capsys.readouterr().out
    assert re.findall(r"^step (\d)/3  loss", printed, re.M) == ["2", "3"]  # every 2 steps, and the last
    assert re.search(r"^step 3/3  loss \S+  lr \S+  grad_norm \S+  correct \S+  length \S+  tokens \d+  [\d.]+ s$",
                     printed, re.M)


def test_jsonl_only_is_the_default_and_writes_no_tracker_folder(tiny_model, tmp_path, capsys):
    out = tmp_path / "plain"
    cfg = load_config(TrainConfig, None, run_overrides(tiny_model, out, {**TRAIN_RUN, "optim.steps": "1"}))
    assert cfg.report_to == ["jsonl"] and cfg.logging_steps == 10
    run_train(cfg)
    assert not {"tensorboard", "wandb", "mlruns"} & {p.name for p in out.iterdir()}
    assert "step 1/1  loss" in capsys.readouterr().out  # the last step prints even off the logging_steps grid


def _hide(monkeypatch, name: str) -> None:
    """Make tracker `name`'s package look uninstalled (it is not, here, unless a developer added it)."""
    if importlib.util.find_spec(name) is not None:
        monkeypatch.setitem(tracking.PACKAGES, name, ((f"{name}_not_installed",), name))


@pytest.mark.parametrize("command", ["train", "sft"])
def test_a_missing_tracker_package_is_one_line_and_writes_nothing(tiny_model, tmp_path, capsys, monkeypatch,
                                                                 command):
    _hide(monkeypatch, "wandb")
    out = tmp_path / "runs" / "out"
    model_key = "init_from" if command == "train" else "model.init_from"
    code = main([command, f"{model_key}={tiny_model}", "report_to=[jsonl,wandb]", f"out_dir={out}"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "report_to: wandb needs the wandb package" in err and "pip install wandb" in err
    assert not out.exists() and not out.parent.exists()


def test_wandb_gets_the_run_name_the_config_and_every_row(tmp_path, monkeypatch):
    """W&B through accelerate's WandBTracker, with a stand-in `wandb` module (not installed here): the
    project, run name (out_dir's name) and folder (out_dir), the flat config, each row at its step."""
    import importlib.machinery
    import sys
    import types

    calls: dict[str, list] = {"init": [], "config": [], "log": [], "finish": []}

    class FakeRun:
        def log(self, values, step=None):
            calls["log"].append((step, values))

        def finish(self):
            calls["finish"].append(True)

    fake = types.ModuleType("wandb")
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    fake.init = lambda **kwargs: calls["init"].append(kwargs) or FakeRun()
    fake.config = types.SimpleNamespace(update=lambda values, **_: calls["config"].append(values))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_PROJECT", raising=False)

    out = tmp_path / "wandb_run"
    out.mkdir()
    cfg = load_config(SFTConfig, None, ["report_to=[jsonl,wandb]", f"out_dir={out}", "optim.lr=0.01"])
    tracking.check_trackers(cfg.report_to)
    reporter = tracking.open_reporter(cfg, out, MetricsLog(out / "metrics.jsonl", None), total=2)
    reporter.write({"step": 1, "loss": 0.5, "tokens": 3, "samples": ["a"]})
    reporter.close()
    assert calls["init"] == [{"project": "visual-opsd", "name": "wandb_run", "dir": str(out)}]
    assert calls["config"][0]["optim.lr"] == 0.01 and calls["config"][0]["report_to"] == '["jsonl", "wandb"]'
    assert calls["log"] == [(1, {"loss": 0.5, "tokens": 3})] and calls["finish"] == [True]
    assert metrics_rows(out) == [{"step": 1, "loss": 0.5, "tokens": 3, "samples": ["a"]}]  # jsonl as it was


def test_tracker_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"report_to\[1\]: 'tensorbord' is not one of .*did you mean 'tensorboard'"):
        load_config(TrainConfig, None, ["report_to=[jsonl,tensorbord]"])
    with pytest.raises(ConfigError, match="logging_steps must be >= 1"):
        load_config(SFTConfig, None, ["logging_steps=0"])
    with pytest.raises(ConfigError, match="report_to names tensorboard twice"):
        load_config(SFTConfig, None, ["report_to=[tensorboard,tensorboard]"])


def test_hparams_are_flat_values_every_tracker_takes():
    flat = tracking.hparams({"seed": 0, "data": {"path": None, "sizes": (3, 6)}, "report_to": ["jsonl"],
                             "progress": False, "options": {}})
    assert flat == {"seed": 0, "data.path": "null", "data.sizes": "[3, 6]", "report_to": '["jsonl"]',
                    "progress": False, "options": "{}"}
    assert json.loads(flat["data.sizes"]) == [3, 6]
    assert tracking.scalars({"step": 3, "loss": 0.5, "tokens": 7, "samples": ["a"], "skipped": "x"}) == {
        "loss": 0.5, "tokens": 7}


def test_mlflow_metric_names_never_collide_as_file_paths():
    """MLflow's file store keeps each metric as a file named by its path: `loss` and `loss/ce` cannot
    both exist (with mlflow 3.18 the run died at its first step). The MLflow tracker gets "." for "/";
    everything else reaches accelerate's tracker unchanged."""

    class Recorder:
        main_process_only = True

        def __init__(self):
            self.rows = []

        def log(self, values, step=None, **kwargs):
            self.rows.append((step, values, kwargs))

    inner = Recorder()
    tracker = tracking.MLflowKeys(inner)
    tracker.main_process_only = False  # as open_trackers sets it: on the wrapped tracker
    tracker.log({"loss": 0.5, "loss/ce": 0.4, "val/accuracy/maze": 1.0}, step=3)
    assert inner.rows == [(3, {"loss": 0.5, "loss.ce": 0.4, "val.accuracy.maze": 1.0}, {})]
    assert inner.main_process_only is False and tracker.main_process_only is False
