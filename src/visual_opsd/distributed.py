"""Data-parallel training under `accelerate launch`: ranks, data shards, gradient and metric reductions.

    accelerate launch --config_file configs/accelerate/ddp.yaml -m visual_opsd.cli train --config ...

The same command without `accelerate launch` is one process and does no communication. With N
processes (any launcher accelerate supports: DDP, multi-node; gloo on CPU, NCCL on GPUs):
- every rank takes a contiguous shard of each step's prompts and rolls them out itself;
- the loss of each micro-batch is divided by the number of completion tokens of the whole step on
  *all* ranks (`losses.global_token_count` all-reduces it), and the gradients are *summed* over
  ranks once per step, after the last micro-batch. So the gradient is the token mean over the
  global batch whatever its split into ranks and micro-batches (no world-size factor: a sum, not
  DDP's average);
- parameters without a gradient on every rank stay without one (as in one process, where AdamW
  skips them), so N processes reproduce one process exactly up to float summation order;
- metrics are reduced (sums for loss and token counts, means for rollout statistics) and written
  by rank 0, which alone writes unsharded checkpoints (full weights and optimizer state: resumable on
  any number of processes).

Gradient sync is explicit rather than through a DDP wrapper because a backend's `score` calls its
network more than once per micro-batch (context prefix, then completion) and reads the output head
directly; the wrapper's hooks would see only some of those calls.

Sharded training (`shard_weights`, or an accelerate FSDP config) uses torch's FSDP2 `fully_shard`
(a unit per decoder layer, one for the rest), for backends that declare `supports_sharding` (their
every gradient-carrying network call goes through the root module's forward, or `in_forward`):
weights, gradients and optimizer state live sharded between steps; the weights are gathered once
before the step's rollouts (`unshard`), so ranks that decode different numbers of tokens issue no
collectives; FSDP reduce-scatters the gradients (an average over ranks: the loss is scaled by the
world size to keep the sum rule above); every rank writes its own shards of `last/`
(`sharded_checkpoint.py`), while `best/` gathers full tensors (`full_state_dict`) for rank 0 to
write in the unsharded layout.

DeepSpeed ZeRO (`deepspeed_stage`, or an accelerate DeepSpeed config) runs over the same process
group; its engine owns the backward, the reduction and the step (`engines.py`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


class Dist:
    """The process topology of a run. `Dist.create()` inside `accelerate launch`, plain otherwise."""

    def __init__(self, accelerator: Any = None) -> None:
        self.accelerator = accelerator
        if accelerator is not None:
            self.rank, self.world = accelerator.process_index, accelerator.num_processes
            self.device = accelerator.device
        else:
            self.rank, self.world, self.device = 0, 1, torch.device("cpu")

    @classmethod
    def create(cls) -> Dist:
        """Use accelerate when installed (it reads the launcher's environment); else one process."""
        try:
            from accelerate import Accelerator
        except ImportError:
            if int(os.environ.get("WORLD_SIZE", "1")) > 1:
                raise RuntimeError("launched with several processes but accelerate is not installed") from None
            return cls(None)
        return cls(Accelerator())

    @property
    def engine(self) -> str:
        """accelerate's distributed type: NO, MULTI_CPU, MULTI_GPU, FSDP, DEEPSPEED, ... On a CPU
        accelerate resolves FSDP and DeepSpeed configs to MULTI_CPU but still hands them to the
        workers in the environment: they are honoured, so a shipped config runs as it says (not
        silently replicated)."""
        if self.accelerator is None:
            return "NO"
        kind = str(self.accelerator.distributed_type).split(".")[-1]
        if kind == "MULTI_CPU":
            if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
                return "DEEPSPEED"
            if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
                return "FSDP"
        return kind

    def check_engine(self, backend: Any, shard_weights: bool = False, deepspeed_stage: int | None = None) -> str:
        """The engine of this run (`engines.py`): "torch" (one process, or data parallel), "fsdp"
        (FSDP2; asked for by `shard_weights` or an accelerate FSDP config) or "zero1".."zero3"
        (DeepSpeed; asked for by `deepspeed_stage` or an accelerate DeepSpeed config, whose ZeRO stage
        it takes). Refuses contradictions, and FSDP for backends that cannot be sharded, rather than
        silently replicating. With one process nothing is sharded: "torch"."""
        from visual_opsd.errors import ConfigError

        stage = deepspeed_stage
        if self.engine == "DEEPSPEED":
            plugin = getattr(self.accelerator.state, "deepspeed_plugin", None)
            if plugin is None:  # a CPU: accelerate built none, the launcher's environment has it all
                from accelerate.utils import DeepSpeedPlugin

                plugin = DeepSpeedPlugin()
            if stage is not None and stage != plugin.zero_stage:
                raise ConfigError(f"deepspeed_stage={stage} contradicts the accelerate config's ZeRO stage "
                                  f"{plugin.zero_stage}; drop one")
            stage = plugin.zero_stage
            zero = plugin.deepspeed_config.get("zero_optimization", {})
            offload = [k for k in ("offload_optimizer", "offload_param")
                       if str(zero.get(k, {}).get("device", "none")) not in ("none", "None")]
            if offload:
                raise ConfigError(f"the accelerate DeepSpeed config offloads ({', '.join(offload)}), which visual-opsd "
                                  "train does not support (it steps torch's AdamW on the accelerator); set the "
                                  "offload devices to none (configs/accelerate/deepspeed_zero3.yaml)")
        if stage is not None:
            if shard_weights or self.engine == "FSDP":
                raise ConfigError("both FSDP (shard_weights or an accelerate FSDP config) and DeepSpeed ZeRO were "
                                  "asked for; choose one (docs/scale.md)")
            if stage not in (1, 2, 3):
                raise ConfigError(f"DeepSpeed ZeRO stage must be 1, 2 or 3, got {stage}")
            try:
                import deepspeed  # noqa: F401
            except ImportError:
                raise ConfigError("DeepSpeed ZeRO was asked for but deepspeed is not installed: "
                                  "pip install 'visual-opsd[deepspeed]'") from None
            return f"zero{stage}" if self.world > 1 else "torch"
        shard = shard_weights or self.engine == "FSDP"
        if shard and not backend.supports_sharding:
            raise ConfigError(
                f"sharded training (FSDP) was asked for, but the {type(backend).__name__} backend calls parts of its "
                "network outside the root module's forward and cannot be sharded by FSDP2; use DeepSpeed ZeRO-3 "
                "(configs/accelerate/deepspeed_zero3.yaml) or data parallel (ddp.yaml) for it (docs/scale.md)"
            )
        return "fsdp" if shard and self.world > 1 else "torch"

    @property
    def precision(self) -> str:
        """accelerate's mixed precision: no, bf16 or fp16."""
        return "no" if self.accelerator is None else str(self.accelerator.mixed_precision)

    def shard_model(self, model: nn.Module) -> None:
        """FSDP2 over all ranks: one unit per decoder layer (the items of every ModuleList named in
        `LAYER_LISTS`: a language model's layers, a ViT's layers or blocks), one for the rest (the
        root: embeddings, output head, whatever sits outside the layers). Weights stay gathered after
        a forward until `reshard` (a step's many forwards gather once); each layer's gradients are
        reduce-scattered as soon as its backward is done, so no whole unsharded gradient ever exists.
        `in_forward` runs a computation inside the root's forward hooks (for backends that call
        their network's parts directly)."""
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

        for name, module in model.named_modules():
            if isinstance(module, nn.ModuleList) and name.rsplit(".", 1)[-1] in LAYER_LISTS:
                for layer in module:
                    fully_shard(layer, reshard_after_forward=False)
        fully_shard(model, reshard_after_forward=False)
        # FSDP2 takes the first unit to run a forward as the root; decoding may call a layer directly
        # (outside the model's forward), so make the model the root now (torch has no public call)
        model._get_fsdp_state()._lazy_init()
        # an instance attribute (not a module or parameter), wrapped in the root's forward hooks
        object.__setattr__(model, _IN_FORWARD, _call)
        register_fsdp_forward_method(model, _IN_FORWARD)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, items: Sequence[Any]) -> list[Any]:
        """This rank's contiguous share of `items` (len(items) must be a multiple of the world size)."""
        if len(items) % self.world:
            raise ValueError(f"{len(items)} items do not split evenly over {self.world} processes")
        k = len(items) // self.world
        return list(items[self.rank * k : (self.rank + 1) * k])

    def autocast(self) -> contextlib.AbstractContextManager:
        """Mixed precision as configured in the accelerate config (a no-op for `no`)."""
        return self.accelerator.autocast() if self.accelerator is not None else contextlib.nullcontext()

    def _active(self) -> bool:
        return self.world > 1 and dist.is_available() and dist.is_initialized()

    def all_reduce(self, value: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Sum or max of `value` over ranks (in place; returned for chaining)."""
        if self._active():
            dist.all_reduce(value, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
        return value

    def sum(self, x: float) -> float:
        return float(self.all_reduce(torch.tensor(float(x), dtype=torch.float64, device=self.device)))

    def max_dict(self, values: dict[str, float]) -> dict[str, float]:
        """Largest value over ranks of each value (keys must be the same on every rank)."""
        if not self._active():
            return dict(values)
        keys = sorted(values)
        t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=self.device)
        return dict(zip(keys, self.all_reduce(t, op="max").tolist(), strict=True))

    def mean_dict(self, values: dict[str, float]) -> dict[str, float]:
        """Mean over ranks of each value (keys must be the same on every rank)."""
        if not self._active():
            return dict(values)
        keys = sorted(values)
        t = self.all_reduce(torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=self.device))
        return {k: float(v) / self.world for k, v in zip(keys, t.tolist(), strict=True)}

    def gather_int(self, x: int) -> list[int]:
        """Every rank's `x`, in rank order."""
        if not self._active():
            return [int(x)]
        out = [torch.zeros((), dtype=torch.int64, device=self.device) for _ in range(self.world)]
        dist.all_gather(out, torch.tensor(int(x), dtype=torch.int64, device=self.device))
        return [int(t) for t in out]

    @torch.no_grad()
    def sum_gradients(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Sum `.grad` over ranks in one flat all-reduce; a parameter that has no gradient on any rank
        keeps none (on ranks where it has none but others do, it counts as zeros)."""
        if not self._active():
            return
        params = list(params)
        has = self.all_reduce(torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=self.device))
        live = [p for p, h in zip(params, has.tolist(), strict=True) if h]
        if not live:
            return
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in live])
        self.all_reduce(flat)
        offset = 0
        for p in live:
            n = p.numel()
            summed = flat[offset : offset + n].view_as(p)
            if p.grad is not None:
                p.grad.copy_(summed)  # in place: no second copy of every gradient
            else:
                p.grad = summed.clone()
            offset += n

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's picklable `obj`, in rank order (e.g. each rank's decoded answers)."""
        if not self._active():
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self._active():
            dist.barrier()

    def close(self) -> None:
        """End of run: wait for every rank, then shut the process group down cleanly (gloo may abort
        at interpreter exit otherwise)."""
        if self._active():
            dist.barrier()
            dist.destroy_process_group()

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (e.g. writes a file), the others after it is done."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()


# ModuleLists whose items become FSDP2 units: decoder layers (mini, BAGEL, Hugging Face language
# models and CLIP towers) and ViT blocks (the Qwen-VL vision towers)
LAYER_LISTS = ("layers", "blocks")
_IN_FORWARD = "_visual_opsd_in_forward"


def _call(fn, *args, **kwargs):
    return fn(*args, **kwargs)


def in_forward(model: nn.Module, fn, *args, **kwargs):
    """`fn(*args, **kwargs)` run as a forward of `model`. Under FSDP2 (`Dist.shard_model`) it runs
    inside the root unit's pre- and post-forward hooks: the root's weights (embeddings, output head,
    ...) are gathered before it and stay gathered after it, and the gradients of everything it
    computes are reduce-scattered at the end of the backward. A plain call otherwise. For backends
    that call their network's parts (the inner model, then the output head) rather than the
    model's own `forward` (the HF backend; BAGEL has `BagelModel.forward` for the same purpose)."""
    method = model.__dict__.get(_IN_FORWARD)
    return method(fn, *args, **kwargs) if method is not None else fn(*args, **kwargs)


def is_sharded(model: nn.Module) -> bool:
    """Whether `model` was sharded by FSDP2 (`Dist.shard_model`)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _units(model: nn.Module) -> list[nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)] if is_sharded(model) else []


def unshard(model: nn.Module) -> None:
    """Gather a sharded model's weights now, every unit (collectives: every rank at the same point);
    no-op otherwise."""
    for unit in _units(model):
        unit.unshard()


def reshard(model: nn.Module) -> None:
    """Free a sharded model's gathered weights, every unit (the shards remain); no-op otherwise."""
    for unit in _units(model):
        unit.reshard()


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a sharded DTensor (a collective), or `t` itself."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def like_param(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`full` laid out as `like` (this rank's shard when `like` is a sharded DTensor)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(like, DTensor):
        return distribute_tensor(full.to(like.dtype), like.device_mesh, like.placements)
    return full


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's whole state (every rank must call it when sharded), on CPU."""
    return {k: full_tensor(v).detach().cpu().contiguous() for k, v in model.state_dict().items()}
