"""Fault injection for the reliability suite (tests/test_faults.py); inert unless the env var is set.

    VISUAL_OPSD_FAULT="kill:rollout@3"            SIGKILL this process in step 3's rollout
    VISUAL_OPSD_FAULT="kill:optimizer@2,nan:loss@4"  several faults, comma-separated
    VISUAL_OPSD_FAULT="nan:loss@2/1"              only on the process of rank 1 (RANK, set by the launcher)

Points the training loop offers: `kill:rollout`, `kill:optimizer` (after the weights changed, before
the teacher update), `kill:checkpoint` (half way through writing last/), `nan:loss`, `inf:grad`.
Steps count from 1 (the step being run). A real SIGKILL is used, not an exception, so nothing in
the program gets a chance to clean up: exactly what a preempted or OOM-killed job looks like.

`VISUAL_OPSD_DUMP_GRADS=DIR` (a test hook too) writes every step's synced gradients to DIR.
"""

from __future__ import annotations

import os
import signal

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
