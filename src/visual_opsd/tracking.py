"""Where a training run's metrics go, for `sft` and `train` alike: `metrics.jsonl` (always), the
experiment trackers named in `report_to` (TensorBoard, Weights & Biases, trackio, MLflow, through
accelerate's tracker API) and, in batch jobs, one console line every `logging_steps` steps.

    report_to: [jsonl, tensorboard]   # <out_dir>/tensorboard/<run name>/events.out.tfevents.*
    logging_steps: 10                 # `step 10/100  loss 0.4123  lr 3.00e-04  grad_norm 0.512 ...  12.3 s`

Only rank 0 reports. A tracker whose package is missing is a ConfigError naming what to pip install,
raised by `check_trackers` before the run writes anything. Trackers get the run name (out_dir's
name), the config as hyperparameters, and every numeric value of every metrics row at its step.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from visual_opsd.errors import ConfigError
from visual_opsd.optim import MetricsLog

Tracker = Literal["jsonl", "tensorboard", "wandb", "trackio", "mlflow"]
# tracker -> (modules that provide it, any one; the package to pip install)
PACKAGES: dict[str, tuple[tuple[str, ...], str]] = {
    "tensorboard": (("tensorboard", "tensorboardX"), "tensorboard"),
    "wandb": (("wandb",), "wandb"),
    "trackio": (("trackio",), "trackio"),
    "mlflow": (("mlflow",), "mlflow"),
}
PROJECT = "visual-opsd"  # the W&B / trackio project and MLflow experiment unless their variables say otherwise


def report_to_field() -> Any:
    """The `report_to` config key (top level of the SFT and Visual-OPSD configs)."""
    return field(default_factory=lambda: ["jsonl"], metadata={
        "help": "where metrics go: jsonl (metrics.jsonl, always written), tensorboard, wandb, trackio, mlflow"})


def logging_steps_field() -> Any:
    """The `logging_steps` config key (top level of the SFT and Visual-OPSD configs)."""
    return field(default=10, metadata={
        "help": "print a metrics line every N steps when stdout is not a terminal or progress=false"})


def check_logging(report_to: Sequence[str], logging_steps: int) -> None:
    """The configs' range checks (ValueError, turned into a ConfigError by the config loader)."""
    if logging_steps < 1:
        raise ValueError(f"logging_steps must be >= 1, got {logging_steps}")
    repeated = sorted({t for t in report_to if list(report_to).count(t) > 1})
    if repeated:
        raise ValueError(f"report_to names {', '.join(repeated)} twice")


def check_trackers(report_to: Sequence[str]) -> None:
    """A one-line ConfigError naming the package to install for the first tracker of `report_to`
    that cannot be imported; called at the start of a command, before out_dir is created."""
    for name in report_to:
        if name == "jsonl":
            continue
        modules, package = PACKAGES[name]
        if not any(importlib.util.find_spec(m) is not None for m in modules):
            raise ConfigError(f"report_to: {name} needs the {package} package, which is not installed "
                              f"(pip install {package})")


def console_on(progress: bool) -> bool:
    """Whether to print metrics lines: a batch job (stdout not a terminal) or progress bars off."""
    return not progress or not sys.stdout.isatty()


@dataclass
class Console:
    """One line per `every` steps (and the last): step, loss, lr, grad_norm, `keys`, elapsed seconds."""

    every: int
    total: int
    keys: tuple[str, ...] = ()
    t0: float = field(default_factory=time.perf_counter)

    def line(self, record: dict[str, Any]) -> str | None:
        """The line for metrics row `record`, or None when this step prints none (validation rows
        of step 0 have no loss; validation prints its own line)."""
        step = record.get("step")
        if "loss" not in record or not isinstance(step, int) or (step % self.every and step != self.total):
            return None
        parts = [f"step {step}/{self.total}", f"loss {record['loss']:.4f}"]
        if "lr" in record:
            parts.append(f"lr {record['lr']:.2e}")
        if "grad_norm" in record:
            parts.append(f"grad_norm {record['grad_norm']:.3f}")
        parts += [f"{k.rsplit('/', 1)[-1]} {_short(record[k])}" for k in self.keys if k in record]
        return "  ".join([*parts, f"{time.perf_counter() - self.t0:.1f} s"])


class Reporter:
    """A run's metrics sink (rank 0): metrics.jsonl as before, every tracker of `report_to`, and the
    console lines; `write` and `close` as `MetricsLog`'s, which it wraps."""

    def __init__(self, log: MetricsLog, trackers: list[Any] | None = None, console: Console | None = None) -> None:
        self.log, self.trackers, self.console = log, trackers or [], console

    def write(self, record: dict[str, Any]) -> None:
        self.log.write(record)
        values = scalars(record)
        for tracker in self.trackers:
            tracker.log(values, step=record.get("step"))
        line = self.console.line(record) if self.console is not None else None
        if line is not None:
            print(line, flush=True)

    def close(self) -> None:
        self.log.close()
        trackers, self.trackers = self.trackers, []
        for tracker in trackers:
            tracker.finish()


def open_reporter(cfg: Any, out: Path, log: MetricsLog, total: int, keys: tuple[str, ...] = (),
                  enabled: bool = True, resume_step: int | None = None) -> Reporter:
    """The `Reporter` of a run of config `cfg` (its `report_to`, `logging_steps`, `progress`) writing
    under `out` (which exists): trackers and console on rank 0 only (`enabled`)."""
    if not enabled:
        return Reporter(log)
    from visual_opsd.config import to_dict

    trackers = open_trackers(cfg.report_to, out, to_dict(cfg), resume_step)
    console = Console(cfg.logging_steps, total, keys) if console_on(cfg.progress) else None
    return Reporter(log, trackers, console)


def open_trackers(report_to: Sequence[str], out: Path, config: dict[str, Any],
                  resume_step: int | None = None) -> list[Any]:
    """accelerate trackers of `report_to` (jsonl aside), started, with `config` as hyperparameters.
    The caller is rank 0 already, so they skip accelerate's own main-process check."""
    if any(name != "jsonl" for name in report_to):
        from accelerate import PartialState

        # accelerate's trackers log through accelerate's logger, which needs its process state: `train`
        # has it (`Dist.create`'s Accelerator; this returns it), a one-process `sft` gets it here
        PartialState()
    trackers = []
    for name in report_to:
        if name == "jsonl":
            continue
        tracker = _make_tracker(name, out, resume_step)
        tracker.main_process_only = False
        if hasattr(tracker, "start"):  # accelerate >= 1.4 starts in start(), older ones in __init__
            tracker.start()
        tracker.store_init_configuration(hparams(config))
        trackers.append(tracker)
    return trackers


def _make_tracker(name: str, out: Path, resume_step: int | None) -> Any:
    """One accelerate tracker, writing under `out` where the tracker allows it; run name = out's name."""
    from accelerate import tracking

    run = out.resolve().name
    if name == "tensorboard":
        # a resumed run drops the events of the steps it replays, as metrics.jsonl drops their rows
        extra = {"purge_step": resume_step + 1} if resume_step is not None else {}
        return tracking.TensorBoardTracker(run, out / "tensorboard", **extra)
    if name == "wandb":
        return tracking.WandBTracker(os.environ.get("WANDB_PROJECT", PROJECT), name=run, dir=str(out))
    if name == "trackio":
        return tracking.TrackioTracker(os.environ.get("TRACKIO_PROJECT", PROJECT), name=run)
    if name == "mlflow":
        import mlflow

        if not os.environ.get("MLFLOW_TRACKING_URI"):  # else the server or store the user set up
            # a folder beside the run's other outputs; MLflow 3 refuses its file store unless asked
            # for it (it would rather have a database, which mlflow-skinny cannot open)
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            mlflow.set_tracking_uri((out / "mlruns").resolve().as_uri())
        return MLflowKeys(tracking.MLflowTracker(os.environ.get("MLFLOW_EXPERIMENT_NAME", PROJECT), run_name=run))
    raise ConfigError(f"report_to: unknown tracker {name!r}")


class MLflowKeys:
    """An MLflow tracker whose metric names have "." for "/" (`loss/ce` -> `loss.ce`): MLflow's file
    store keeps a metric as a file named by its path, so `loss` and `loss/ce` cannot both exist (the
    run stopped at its first step). Everything else goes to the wrapped tracker as it is."""

    def __init__(self, tracker: Any) -> None:
        self.tracker = tracker

    def log(self, values: dict[str, Any], step: int | None = None, **kwargs: Any) -> None:
        self.tracker.log({k.replace("/", "."): v for k, v in values.items()}, step=step, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.tracker, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "tracker":
            object.__setattr__(self, name, value)
        else:
            setattr(self.tracker, name, value)


def scalars(record: dict[str, Any]) -> dict[str, float | int]:
    """The numeric values of a metrics row, its step aside (lists, strings: metrics.jsonl only)."""
    return {k: v for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


def hparams(config: dict[str, Any], prefix: str = "") -> dict[str, bool | int | float | str]:
    """The config as flat `section.key` hyperparameters of the types every tracker takes: numbers,
    strings and booleans as they are, anything else (lists, null) as its JSON text."""
    flat: dict[str, bool | int | float | str] = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            flat.update(hparams(value, f"{prefix}{key}."))
        elif isinstance(value, (bool, int, float, str)):
            flat[prefix + key] = value
        else:
            flat[prefix + key] = json.dumps(value)
    return flat


def _short(value: Any) -> str:
    """A metric in a console line: integers as they are, other numbers to 4 significant digits."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return f"{value:.4g}" if isinstance(value, float) else str(value)
