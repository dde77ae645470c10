"""Fault injection for the reliability suite (tests/test_faults.py); inert unless the env var is set.

    VISUAL_OPSD_FAULT="kill:rollout@3"            SIGKILL this process in step 3's rollout
    VISUAL_OPSD_FAULT="kill:optimizer@2,nan:loss@4"  several faults, comma-separated
    VISUAL_OPSD_FAULT="nan:loss@2/1"              only on the process of rank 1 (RANK, set by the launcher)

Points: `kill:rollout` (after the step's rollouts, before any gradient), `kill:optimizer` (after
the weights changed, before the teacher update), `kill:checkpoint` (half way through writing
last/), `nan:loss`, `inf:grad`. All but `kill:checkpoint` are injected by `FaultInjector`, the
wrapper `engines.make_engine` puts around the engine only when one of the variables is set; the
production loop has no fault code (the checkpoint writer keeps its one `maybe_kill` line, since a
half-written checkpoint can only be made from inside the writer).
Steps count from 1 (the step being run). A real SIGKILL is used, not an exception, so nothing in
the program gets a chance to clean up: exactly what a preempted or OOM-killed job looks like.

`VISUAL_OPSD_DUMP_GRADS=DIR` (a test hook too) writes every step's synced gradients to DIR.
"""

from __future__ import annotations

import math
import os
import signal
from typing import Any

import torch

ENV = "VISUAL_OPSD_FAULT"
DUMP_ENV = "VISUAL_OPSD_DUMP_GRADS"


def armed(point: str, step: int) -> bool:
    """True when `point@step` (every process) or `point@step/R` (the process of rank R only) is among
    the injected faults (one dictionary lookup when unset)."""
    spec = os.environ.get(ENV)
    if not spec:
        return False
    items = {item.strip() for item in spec.split(",")}
    return f"{point}@{step}" in items or f"{point}@{step}/{os.environ.get('RANK', '0')}" in items


def maybe_kill(point: str, step: int) -> None:
    """SIGKILL the current process if `kill:<point>@<step>` is armed."""
    if armed(f"kill:{point}", step):
        os.kill(os.getpid(), signal.SIGKILL)


def dump_gradients(step: int, named_grads: list[tuple[str, torch.Tensor]]) -> None:
    """With VISUAL_OPSD_DUMP_GRADS=DIR, write the step's synced (whole) gradients to
    DIR/grads-{step}.safetensors (the distributed tests compare them across process counts)."""
    folder = os.environ.get(DUMP_ENV)
    if not folder:
        return
    from safetensors.torch import save_file

    grads = {n: g.detach().contiguous() for n, g in named_grads}
    os.makedirs(folder, exist_ok=True)
    save_file(grads, os.path.join(folder, f"grads-{step}.safetensors"))


def active() -> bool:
    """Whether a test asked for faults or gradient dumps."""
    return bool(os.environ.get(ENV) or os.environ.get(DUMP_ENV))


class FaultInjector:
    """An engine (`engines.Engine`) with the armed faults injected at their points, and the step's
    synced gradients dumped under `VISUAL_OPSD_DUMP_GRADS`; everything else is the engine's."""

    def __init__(self, engine: Any, dist: Any) -> None:
        self.engine, self.dist, self.step_no = engine, dist, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)

    def begin_step(self, step: int, lr: float) -> None:
        self.step_no = step
        self.engine.begin_step(step, lr)

    def zero_grad(self) -> None:
        maybe_kill("rollout", self.step_no)  # the loop clears gradients once its rollouts are done
        self.engine.zero_grad()

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        if armed("nan:loss", self.step_no):
            poisoned = loss * math.nan  # NaN gradients, as a real non-finite loss gives
            loss.data.fill_(math.nan)  # and the value the loop logs
            loss = poisoned
        self.engine.backward(loss, last)

    def step(self, loss_finite: bool) -> tuple[float, bool]:
        if os.environ.get(DUMP_ENV):  # whole gradients (a collective when sharded)
            grads = self.engine.whole_grads()
            if self.dist.is_main:
                dump_gradients(self.step_no, grads)
        if armed("inf:grad", self.step_no):
            next(p for p in self.engine.params if p.grad is not None).grad.view(-1)[0] = float("inf")
        norm, applied = self.engine.step(loss_finite)
        if applied:
            maybe_kill("optimizer", self.step_no)
        return norm, applied
