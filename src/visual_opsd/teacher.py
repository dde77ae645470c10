"""Teacher weights for self-distillation: `live`, `ema` or `frozen`, without a second model copy.

The teacher is the student's own network; only its weights may differ:
- `live`: the current student weights, used under no_grad.
- `ema`: an exponential moving average of the student's trainable weights, initialised from them
  and updated after every optimizer step: ema <- decay * ema + (1 - decay) * student.
- `frozen`: the student's trainable weights as they were at the start.

Only the *trainable* parameters get a shadow copy; everything else is shared. So with LoRA the
teacher costs one copy of the adapters, and `frozen` equals the base model whenever adapters are
initialised to a zero update (as LoRA's are). During a teacher forward the shadow tensors are
swapped into the module by pointer (no copy) and swapped back afterwards. When the weights are
sharded (FSDP2 shards, ZeRO-3 partitions: the `layout` of `engines.py`) the shadow holds this rank's
share only, and the shares are exchanged in place, between releasing and gathering the weights.

With LoRA (peft) the `frozen` teacher needs no shadow at all: pass `base_weights` (the peft
model's `disable_adapter`) and the teacher forward runs the base model with adapters disabled.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Literal

import torch
from torch import nn

from visual_opsd.engines import Replicated

TeacherMode = Literal["live", "ema", "frozen"]


class Teacher:
    """The teacher side of one student module. Create it after the engine laid the weights out
    (`engines.py`: FSDP2 sharding, DeepSpeed partitioning), passing its `layout`, so the shadow
    holds the same shares."""

    def __init__(
        self,
        student: nn.Module,
        mode: TeacherMode = "ema",
        decay: float = 0.995,
        base_weights: Callable[[], contextlib.AbstractContextManager] | None = None,
        layout: Replicated | None = None,
    ):
        if mode not in ("live", "ema", "frozen"):
            raise ValueError(f"teacher.mode must be live, ema or frozen, got {mode!r}")
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"teacher.ema_decay must be in [0, 1], got {decay}")
        self.mode = mode
        self.decay = decay
        self.student = student
        self.layout = layout or Replicated()
        # name -> detached copy of a trainable parameter (empty for the live teacher)
        self.shadow: dict[str, torch.Tensor] = {}
        # frozen + LoRA: a context in which the student is its base model (adapters off); no copy
        self.base_weights = base_weights if mode == "frozen" else None
        if mode != "live" and self.base_weights is None:
            self.shadow = {n: self.layout.local(p).detach().clone()
                           for n, p in student.named_parameters() if p.requires_grad}
            if not self.shadow:
                raise ValueError("the student has no trainable parameters to shadow")

    @torch.no_grad()
    def update(self) -> None:
        """After an optimizer step: ema <- decay * ema + (1 - decay) * student. No-op unless `ema`."""
        if self.mode != "ema":
            return
        self.layout.release()  # sharded: average this rank's shares
        params = dict(self.student.named_parameters())
        for name, shadow in self.shadow.items():
            # lerp_(end, w) computes shadow + w * (end - shadow): w = 1 - decay keeps `decay` of the old.
            shadow.lerp_(self.layout.local(params[name]).detach().to(shadow.dtype), 1.0 - self.decay)

    @contextlib.contextmanager
    def weights(self) -> Iterator[nn.Module]:
        """Within the block the student module carries the teacher's weights (and no gradient)."""
        if self.base_weights is not None:
            with torch.no_grad(), self.base_weights():
                yield self.student
            return
        if not self.shadow:
            with torch.no_grad():
                yield self.student
            return
        layout = self.layout
        layout.release()  # sharded: from here on each parameter's share is its only copy
        params = dict(self.student.named_parameters())
        swapped = [(layout.local(params[name]), shadow) for name, shadow in self.shadow.items()]
        _exchange(swapped, layout.in_place)
        layout.gather()
        try:
            with torch.no_grad():
                yield self.student
        finally:
            layout.release()  # free the teacher's gathered weights
            _exchange(swapped, layout.in_place)
            layout.gather()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The shadow weights, whole, for checkpoints (empty for `live`; a collective when sharded)."""
        params = dict(self.student.named_parameters())
        return {name: self.layout.full(t, params[name]).detach().clone() for name, t in self.shadow.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.shadow) - set(state)
        unexpected = set(state) - set(self.shadow)
        if missing or unexpected:
            raise ValueError(
                f"teacher state does not match the student: missing {sorted(missing)[:5]}, "
                f"unexpected {sorted(unexpected)[:5]}"
            )
        with torch.no_grad():
            for name, t in state.items():
                self.shadow[name].copy_(self.layout.to_local(t, self.shadow[name]))


@torch.no_grad()
def _exchange(pairs: list[tuple[torch.Tensor, torch.Tensor]], in_place: bool) -> None:
    """Exchange each parameter's values with its shadow's. Plain modules: by pointer (no copy).
    Sharded (released by the caller): the shares in place, because FSDP2 and ZeRO-3 gather from
    their own shard storage, which a pointer swap would not reach."""
    if not in_place:
        for param, shadow in pairs:
            param.data, shadow.data = shadow.data, param.data
        return
    for param, shadow in pairs:
        kept = param.detach().clone()
        param.detach().copy_(shadow)
        shadow.copy_(kept)
