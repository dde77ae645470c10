"""What the SFT and Visual-OPSD loops share about optimisation: the AdamW set-up, the learning-rate
schedule, and the metrics log (`metrics.jsonl`, one row per step)."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn


def adamw(params: Iterable[nn.Parameter], cfg: Any, decay_matrices_only: bool = False) -> torch.optim.AdamW:
    """torch's AdamW at `cfg.lr`, `cfg.betas`, `cfg.weight_decay`. With `decay_matrices_only`, weight
    decay applies to matrices only (one group), not to biases and norms (a second group): the SFT's
    choice; Visual-OPSD keeps one group (decay 0 by default), the layout its checkpoints hold."""
    params = list(params)
    if not decay_matrices_only:
        return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


class LRSchedule(Protocol):
    """What the learning-rate schedule reads (the SFT and the Visual-OPSD optim configs both have it)."""

    steps: int
    lr: float
    warmup_steps: int
    min_lr_ratio: float


def lr_at(step: int, cfg: LRSchedule) -> float:
    """Linear warm-up to cfg.lr, then cosine decay to cfg.lr * cfg.min_lr_ratio at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - 1 - cfg.warmup_steps)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class MetricsLog:
    """metrics.jsonl, written by rank 0 only. On resume, rows of steps after the checkpoint (logged
    before a crash, about to be replayed) are dropped first, so every step appears once."""

    def __init__(self, path: Path, resume_step: int | None, enabled: bool = True) -> None:
        self.file = None
        if not enabled:
            return
        if resume_step is not None and path.exists():
            kept = [line for line in path.read_text().splitlines() if _row_step(line) <= resume_step]
            tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, path)
        self.file = open(path, "a" if resume_step is not None else "w")

    def write(self, record: dict[str, Any]) -> None:
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def _row_step(line: str) -> float:
    try:
        return float(json.loads(line).get("step", math.inf))
    except (ValueError, AttributeError):
        return math.inf  # a line torn by a crash mid-write: dropped
