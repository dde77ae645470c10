"""Teacher weights for self-distillation: `live`, `ema` or `frozen`, without a second model copy.

The teacher is the student's own network; only its weights may differ:
- `live`: the current student weights, used under no_grad.
- `ema`: an exponential moving average of the student's trainable weights, initialised from them
  and updated after every optimizer step: ema <- decay * ema + (1 - decay) * student.
- `frozen`: the student's trainable weights as they were at the start.

Only the *trainable* parameters get a shadow copy; everything else is shared. So with LoRA the
teacher costs one copy of the adapters, and `frozen` equals the base model whenever adapters are
initialised to a zero update (as LoRA's are). During a teacher forward the shadow tensors are
swapped into the module by pointer (no copy) and swapped back afterwards; under FSDP2 the shards
are exchanged in place instead (see `_exchange`).

With LoRA (peft) the `frozen` teacher needs no shadow at all: pass `base_weights` (the peft
model's `disable_adapter`) and the teacher forward runs the base model with adapters disabled.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Literal

import torch
from torch import nn

from visual_opsd.distributed import full_tensor, is_sharded, like_param, reshard

TeacherMode = Literal["live", "ema", "frozen"]


class Teacher:
    """The teacher side of one student module. Create it after FSDP2 sharding (the shadow then holds
    shards too) and before any other wrapping."""

    def __init__(
        self,
        student: nn.Module,
        mode: TeacherMode = "ema",
        decay: float = 0.995,
        base_weights: Callable[[], contextlib.AbstractContextManager] | None = None,
    ):
        if mode not in ("live", "ema", "frozen"):
            raise ValueError(f"teacher.mode must be live, ema or frozen, got {mode!r}")
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"teacher.ema_decay must be in [0, 1], got {decay}")
        self.mode = mode
        self.decay = decay
        self.student = student
        # name -> detached copy of a trainable parameter (empty for the live teacher)
        self.shadow: dict[str, torch.Tensor] = {}
        # frozen + LoRA: a context in which the student is its base model (adapters off); no copy
        self.base_weights = base_weights if mode == "frozen" else None
        if mode != "live" and self.base_weights is None:
            self.shadow = {n: p.detach().clone() for n, p in student.named_parameters() if p.requires_grad}
            if not self.shadow:
                raise ValueError("the student has no trainable parameters to shadow")

    @torch.no_grad()
    def update(self) -> None:
        """After an optimizer step: ema <- decay * ema + (1 - decay) * student. No-op unless `ema`."""
        if self.mode != "ema":
            return
        reshard(self.student)  # FSDP2: average the shards
        params = dict(self.student.named_parameters())
        for name, shadow in self.shadow.items():
            # lerp_(end, w) computes shadow + w * (end - shadow): w = 1 - decay keeps `decay` of the old.
            shadow.lerp_(params[name].detach().to(shadow.dtype), 1.0 - self.decay)

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
        sharded = is_sharded(self.student)
        reshard(self.student)  # FSDP2: from here on the registered parameters are the shards
        params = dict(self.student.named_parameters())
        swapped = [(params[name], shadow) for name, shadow in self.shadow.items()]
        _exchange(swapped, sharded)
        try:
            with torch.no_grad():
                yield self.student
        finally:
            reshard(self.student)  # FSDP2: free the teacher's gathered weights; the next forward gathers
            _exchange(swapped, sharded)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The shadow weights, whole, for checkpoints (empty for `live`; a collective under FSDP2)."""
        return {name: full_tensor(t).detach().clone() for name, t in self.shadow.items()}

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
                self.shadow[name].copy_(like_param(t, self.shadow[name]))


@torch.no_grad()
def _exchange(pairs: list[tuple[torch.Tensor, torch.Tensor]], sharded: bool) -> None:
    """Exchange each parameter's values with its shadow's. Plain modules: by pointer (no copy).
    FSDP2 (resharded by the caller): the shards in place, because FSDP gathers from its own shard
    storage, which a pointer swap would not reach."""
    if not sharded:
        for param, shadow in pairs:
            param.data, shadow.data = shadow.data, param.data
        return
    for param, shadow in pairs:
        kept = param.detach().clone()
        param.detach().copy_(shadow)
        shadow.copy_(kept)
