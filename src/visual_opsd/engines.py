"""How the training loop holds, steps and checkpoints the student's weights, one class per engine.

- `TorchEngine`: torch's AdamW. One process; data parallel (the gradients summed explicitly, see
  `distributed.py`); or FSDP2 (`shard_weights`, an accelerate FSDP config), where weights,
  gradients and optimizer state are shards.
- `ZeroEngine`: DeepSpeed ZeRO stage 1, 2 or 3 (the `deepspeed_stage` key, an accelerate DeepSpeed
  config). DeepSpeed's engine owns the backward, the gradient reduction, the clipping, the
  overflow check and the optimizer step; the loop keeps its own forwards (a backend calls its
  network several times per micro-batch and reads the output head, which `engine(...)` cannot
  express). Under ZeRO-3 the module hooks that would gather weights submodule by submodule are
  removed once: the engine gathers all weights explicitly, once before the step's rollouts (ranks
  that decode different lengths must issue no collectives), and partitions them before the
  optimizer step. So every backend runs under ZeRO; between steps ZeRO-3 holds 1/N of the
  weights, during a step all of them (as FSDP2 here).

The loop's contract with an engine is the `Engine` protocol, per step: `begin_step(step, lr)`,
`layout.gather()` before rollouts, `zero_grad()`, `backward(loss, last)` per micro-batch,
`step(loss_finite)` -> (gradient norm, applied); for checkpoints `train_state(teacher)` (whole
tensors in torch's layout, a collective) and `load_optimizer(state)`, or, where
`sharded_checkpoints` (FSDP2, ZeRO), `named_state(teacher)`: this rank's shards by name, which
`sharded_checkpoint.py` writes (and, FSDP2, loads in place). `make_engine` picks the engine for a run (and
wraps it in the fault injector of `faults.py` only when a test asks for faults). Either kind of
checkpoint resumes on any engine and any number of processes.

A *layout* says where a parameter's values live on this rank (`local`), how to make them whole
(`full`) and back (`to_local`), and how to gather and release the weights; the EMA teacher keeps
its shadow in the same layout (`teacher.py`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Iterator
from typing import Any, Protocol

import torch
import torch.distributed as torch_dist
from torch import nn

from visual_opsd.distributed import Dist, full_state_dict, full_tensor, like_param, reshard, unshard
from visual_opsd.optim import adamw, set_lr

ADAM_STATE = ("exp_avg", "exp_avg_sq")
# a sharded checkpoint's key for a piece of a tensor that starts at element N: `<name>#N` (ZeRO-1/2)
FRAGMENT = "#"


class Replicated:
    """Whole weights on every rank (one process, data parallel, ZeRO-1/2): nothing to gather; the
    teacher swaps its shadow in by pointer."""

    in_place = False  # a pointer swap reaches the module

    def local(self, param: torch.Tensor) -> torch.Tensor:
        return param

    def full(self, local: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
        return local

    def to_local(self, full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """`full` as this rank's share, laid out like the share `like`."""
        return full

    def gather(self) -> None:
        pass

    def release(self) -> None:
        pass


class Fsdp2Layout(Replicated):
    """FSDP2: the registered parameters are DTensor shards between `gather` (unshard every unit)
    and after `release` (reshard); values are exchanged in the shard storage FSDP gathers from."""

    in_place = True

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def full(self, local: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
        return full_tensor(local)

    def to_local(self, full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return like_param(full, like)

    def gather(self) -> None:
        unshard(self.model)

    def release(self) -> None:
        reshard(self.model)


class Zero3Layout(Replicated):
    """ZeRO-3: each parameter's partition is `param.ds_tensor`, a flat slice of its flattened values
    (rank r holds elements [r*n, (r+1)*n), the last one zero-padded); `gather` makes every weight
    whole (deepspeed.zero.GatheredParameters, entered until `release`)."""

    in_place = True

    def __init__(self, model: nn.Module) -> None:
        self.params = list(model.parameters())
        self._gathered: contextlib.ExitStack | None = None

    def local(self, param: torch.Tensor) -> torch.Tensor:
        return param.ds_tensor

    def full(self, local: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
        parts = local.new_empty(local.numel() * torch_dist.get_world_size())
        torch_dist.all_gather_into_tensor(parts, local.contiguous())
        return parts[: param.ds_numel].view(param.ds_shape)

    def to_local(self, full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        n = like.numel()
        flat = full.reshape(-1).to(like.dtype)
        start = torch_dist.get_rank() * n
        out = torch.zeros(n, dtype=flat.dtype, device=like.device)
        k = max(0, min(n, flat.numel() - start))
        out[:k] = flat[start : start + k]
        return out

    def gather(self) -> None:
        if self._gathered is None:
            import deepspeed

            stack = contextlib.ExitStack()
            stack.enter_context(deepspeed.zero.GatheredParameters(self.params))
            self._gathered = stack

    def release(self) -> None:
        if self._gathered is not None:
            stack, self._gathered = self._gathered, None
            stack.close()


def _own_storage(t: torch.Tensor) -> torch.Tensor:
    """Contiguous CPU tensor `t` as a tensor on the same memory whose storage is exactly its bytes.
    DeepSpeed's partitions, and ZeRO-1/2's weights, are views into flat buffers; DCP's file writer
    clones every tensor whose storage is larger than itself and keeps each clone until the rank's
    file is written, which copied the rank's share of the checkpoint during a save (measured: ZeRO-3
    563 MiB per rank of 736, ZeRO-2 192). Anything else comes back as it is."""
    if t.device.type != "cpu" or not t.is_contiguous() or t.untyped_storage().nbytes() == t.nbytes:
        return t
    return torch.from_numpy(t.view(torch.uint8).numpy()).view(t.dtype)


class Engine(Protocol):
    """What the training loop asks of the engine that holds and steps the student's weights."""

    layout: Replicated
    params: list[nn.Parameter]

    def begin_step(self, step: int, lr: float) -> None:
        """Start optimizer step `step` (counted from 1) at learning rate `lr`."""

    def zero_grad(self) -> None: ...

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        """Backward of one micro-batch's loss; `last`: the step's last one (gradients reduced over ranks)."""

    def whole_grads(self) -> list[tuple[str, torch.Tensor]]: ...

    def step(self, loss_finite: bool) -> tuple[float, bool]:
        """Clip and step unless the loss or the gradient is not finite: (gradient norm, applied)."""

    def train_state(self, teacher: Any, is_main: bool) -> dict[str, Any] | None: ...

    def whole_weights(self) -> contextlib.AbstractContextManager[dict[str, torch.Tensor] | None]: ...

    def load_optimizer(self, state: dict[str, Any]) -> None: ...

    # sharded checkpoints (`sharded_checkpoint.py`): whether `last/` is written as every rank's shards,
    # and this rank's state by name
    sharded_checkpoints: bool

    def named_state(self, teacher: Any, model: bool = True) -> dict[str, torch.Tensor]: ...

    # whole shapes of the tensors `named_state` holds flattened (ZeRO-3's partitions); {} otherwise
    def whole_shapes(self, teacher: Any) -> dict[str, list[int]]: ...

    # optimizer param groups in torch's layout, without their parameters (checkpoints)
    def param_groups(self) -> list[dict[str, Any]]: ...


def make_engine(dist: Dist, backend: Any, cfg: Any, micro_batch: int) -> Engine:
    """The engine of a training run (`cfg`: a TrainConfig): DeepSpeed ZeRO, FSDP2 or plain torch, as
    the launcher's accelerate config and `cfg.shard_weights` / `cfg.deepspeed_stage` ask
    (`Dist.check_engine`). `micro_batch`: completions per micro-batch on one rank. Under
    `VISUAL_OPSD_FAULT` / `VISUAL_OPSD_DUMP_GRADS` (tests) it comes wrapped in the fault injector."""
    from visual_opsd import faults

    kind = dist.check_engine(backend, cfg.shard_weights, cfg.deepspeed_stage)
    if kind.startswith("zero"):
        engine: Engine = ZeroEngine(dist, backend.model, cfg.optim, int(kind.removeprefix("zero")), micro_batch,
                                    dist.precision)
    else:
        engine = TorchEngine(dist, backend.model, cfg.optim, sharded=kind == "fsdp")
    if dist.is_main and dist.world > 1:
        print(f"train: {dist.world} processes, engine {kind}", flush=True)
    return faults.FaultInjector(engine, dist) if faults.active() else engine


class TorchEngine:
    """torch's AdamW over the trainable parameters; FSDP2 when `sharded` (the model is sharded here)."""

    # checkpoints: FSDP2 runs write `last/` as every rank's shards (`sharded_checkpoint.py`); this
    # engine's optimizer state can be loaded in place, as this rank's shares (`named_state`)
    in_place_state = True

    def __init__(self, dist: Dist, model: nn.Module, optim: Any, sharded: bool) -> None:
        if sharded:
            dist.shard_model(model)  # before the teacher's shadow and the optimizer: both follow the shards
        self.dist, self.model, self.sharded = dist, model, sharded
        self.layout: Replicated = Fsdp2Layout(model) if sharded else Replicated()
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]  # the optimizer's parameters by name (checkpoints)
        self.params = [p for _, p in named]
        self.optimizer = adamw(self.params, optim)
        self.grad_clip = optim.grad_clip

    def begin_step(self, step: int, lr: float) -> None:
        set_lr(self.optimizer, lr)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        # FSDP averages gradients over ranks; the loop's loss rule (token mean over the global
        # batch) wants their sum
        (loss * self.dist.world if self.sharded else loss).backward()
        if last and not self.sharded:
            self.dist.sum_gradients(self.params)  # (FSDP reduce-scattered them during the backward)

    def whole_grads(self) -> list[tuple[str, torch.Tensor]]:
        """Every whole gradient after the last backward (a collective when sharded)."""
        return [(n, full_tensor(p.grad)) for n, p in self.model.named_parameters() if p.grad is not None]

    def step(self, loss_finite: bool) -> tuple[float, bool]:
        """Clip, then step when the loss and gradient norm are finite; (norm, applied)."""
        norm = float(full_tensor(torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip or float("inf"))))
        applied = loss_finite and math.isfinite(norm)
        if applied:
            self.optimizer.step()
        else:
            self.zero_grad()
        return norm, applied

    def train_state(self, teacher: Any, is_main: bool) -> dict[str, Any] | None:
        """Optimizer and teacher state as whole tensors in torch's layout, on rank 0 (None elsewhere).
        Every rank calls it: sharded state is gathered."""
        if not self.sharded:
            if not is_main:
                return None
            return {"optimizer": self.optimizer.state_dict(), "teacher": teacher.state_dict()}
        optim = self.optimizer.state_dict()
        optim["state"] = {i: {k: full_tensor(v).cpu() for k, v in st.items()} for i, st in optim["state"].items()}
        shadow = teacher.state_dict()
        return {"optimizer": optim, "teacher": shadow} if is_main else None

    @property
    def sharded_checkpoints(self) -> bool:
        """Whether `last/` is written as each rank's shards (FSDP2) rather than whole on rank 0."""
        return self.sharded

    def named_state(self, teacher: Any, model: bool = True) -> dict[str, torch.Tensor]:
        """Everything a resume needs, by name, as this rank holds it (FSDP2: DTensor shards; else
        whole tensors): `model/NAME` (the model's state dict, frozen weights and buffers included),
        `optim/NAME/KEY` (AdamW's state of each trainable parameter that has one) and
        `teacher/NAME` (the shadow). The live tensors, not copies: a sharded checkpoint is written
        from them and loaded into them in place (`sharded_checkpoint.py`)."""
        state = {f"model/{k}": v for k, v in self.model.state_dict().items()} if model else {}
        for name, p in zip(self.names, self.params, strict=True):
            for key, value in self.optimizer.state.get(p, {}).items():
                state[f"optim/{name}/{key}"] = value
        state.update({f"teacher/{k}": v for k, v in teacher.shadow.items()})
        return state

    def whole_shapes(self, teacher: Any) -> dict[str, list[int]]:
        return {}  # FSDP2's DTensors and whole tensors carry their own shapes

    def param_groups(self) -> list[dict[str, Any]]:
        return [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]

    def add_optimizer_state(self, saved: dict[str, dict[str, tuple[list[int], torch.dtype]]]) -> None:
        """Zero AdamW state for the parameters `saved` names, {name: {key: (whole shape, dtype)}}
        (a sharded checkpoint's), laid out as the parameter (FSDP2: this rank's shard; a scalar such
        as `step` whole), so that it can be loaded into in place."""
        params = dict(zip(self.names, self.params, strict=True))
        for name, keys in saved.items():
            p = params[name]
            self.optimizer.state[p] = {
                # AdamW keeps `step` as a CPU scalar (not capturable), the moments like the parameter
                key: (torch.zeros_like(p.detach(), dtype=dtype) if key != "step" and list(shape) == list(p.shape)
                      else torch.zeros(shape, dtype=dtype))
                for key, (shape, dtype) in keys.items()
            }

    @contextlib.contextmanager
    def whole_weights(self) -> Iterator[dict[str, torch.Tensor] | None]:
        """Every rank enters it; within it rank 0 saves the model: `backend.save(dir, state=yielded)`.
        Yields None when the live model holds the whole weights, else a whole state dict."""
        yield full_state_dict(self.model) if self.sharded else None

    def load_optimizer(self, state: dict[str, Any]) -> None:
        # a sharded checkpoint's groups come without their parameters: this run's (the same layout)
        for group, live in zip(state.get("param_groups", []), self.optimizer.state_dict()["param_groups"], strict=True):
            group.setdefault("params", live["params"])
        for i, st in state.get("state", {}).items():  # whole tensors -> this rank's shards (FSDP2)
            if isinstance(i, int) and i < len(self.params):
                st.update({k: like_param(v, self.params[i]) for k, v in st.items() if torch.is_tensor(v) and v.dim()})
        self.optimizer.load_state_dict(state)


class ZeroEngine(TorchEngine):
    """DeepSpeed ZeRO-`stage` over the process group accelerate (or torchrun) set up. Every rank
    writes what it holds of `last/` (`named_state`, `sharded_checkpoint.py`): ZeRO-3 its partitions,
    ZeRO-1/2 its pieces of AdamW's state (their weights, whole on every rank, are written once). Any
    checkpoint's optimizer and teacher state is loaded as whole tensors (`in_place_state` False)
    through DeepSpeed's own setters."""

    in_place_state = False

    def __init__(self, dist: Dist, model: nn.Module, optim: Any, stage: int, micro_batch: int,
                 precision: str = "no") -> None:
        """`micro_batch`: rows per micro-batch on one rank (DeepSpeed's bookkeeping only)."""
        if dist.device.type == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed picks an accelerator
        import deepspeed

        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        super().__init__(dist, model, optim, sharded=False)
        # torch's layout of the optimizer state, which checkpoints use (DeepSpeed flattens the groups)
        self.groups = self.optimizer.state_dict()["param_groups"]
        config = {
            "train_micro_batch_size_per_gpu": micro_batch,
            # DeepSpeed's micro-step counter marks the last micro-batch (its gradients are reduced
            # and accumulated there); the loop's loss is already normalised over the whole step, so
            # the backward is not scaled again (scale_wrt_gas=False)
            "gradient_accumulation_steps": optim.grad_accum,
            "zero_optimization": {"stage": stage},
            "zero_allow_untested_optimizer": True,  # torch's AdamW, as in one process
            "gradient_clipping": self.grad_clip or 1e30,  # 1e30: never clips, but the norm is computed
            "bf16": {"enabled": precision == "bf16"},
            "fp16": {"enabled": precision == "fp16"},
            "steps_per_print": 2**31 - 1,
        }
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=self.optimizer, config=config)
        self.grad_accum, self.stage = optim.grad_accum, stage
        self._mesh: Any = None  # ZeRO-3 checkpoints: the device mesh their DTensors live on
        if stage == 3:
            # the loop gathers all weights itself (Zero3Layout); the per-submodule fetch/release
            # hooks would issue collectives per decoded token
            self.engine.optimizer.parameter_offload.destroy()
            self.layout = Zero3Layout(model)

    def zero_grad(self) -> None:
        pass  # DeepSpeed clears its (partitioned) gradients after every step

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        # what `engine(...)` does first, which the loop does not call: marks a new micro-batch (ZeRO-3
        # then accumulates this backward's gradients onto the previous ones instead of replacing them)
        self.engine.optimizer.clear_backward_seen_flag()
        # DeepSpeed averages gradients over ranks: the world-size factor makes it the loop's sum
        self.engine.backward(loss * self.dist.world, scale_wrt_gas=False)
        if not last:
            self.engine.step()  # not at the boundary: advances the micro-step counter only

    def whole_grads(self) -> list[tuple[str, torch.Tensor]]:
        from deepspeed.utils import safe_get_full_grad

        return [(n, safe_get_full_grad(p)) for n, p in self.model.named_parameters() if p.requires_grad]

    def step(self, loss_finite: bool) -> tuple[float, bool]:
        """DeepSpeed clips and steps; it skips a step whose gradients are not finite (a non-finite
        loss makes them so) on every rank."""
        self.layout.release()  # ZeRO-3 steps on the partitions
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        norm = float("nan") if norm is None else float(norm)
        return norm, bool(self.engine.was_step_applied())

    def _adam_step(self) -> torch.Tensor | None:
        states = [st for st in self.optimizer.optimizer.state.values() if "step" in st]
        return states[0]["step"] if states else None

    @property
    def sharded_checkpoints(self) -> bool:
        """Every rank writes what it holds: ZeRO-3 its partitions, ZeRO-1/2 its fragments of AdamW's
        state (the whole weights and shadow, the same on every rank, are written once)."""
        return True

    def param_groups(self) -> list[dict[str, Any]]:
        lr = self.optimizer.param_groups[0]["lr"]  # DeepSpeed's groups are its flat partitions
        return [{**{k: v for k, v in g.items() if k != "params"}, "lr": lr} for g in self.groups]

    def _flat(self, local: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
        """This rank's partition `local` of `param` (ZeRO-3: elements [r*n, (r+1)*n) of the flattened
        tensor, the last rank's zero-padded) as a 1-D DTensor of the whole flattened tensor: DTensor's
        uneven Shard(0) chunks are exactly DeepSpeed's partitions, so DCP can write them as they lie and
        reshard them on load. The view shares `local`'s storage (no copy)."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import DTensor, Shard

        if self._mesh is None:
            self._mesh = init_device_mesh(self.dist.device.type, (self.dist.world,))
        n, numel = local.numel(), param.ds_numel
        k = max(0, min(n, numel - self.dist.rank * n))
        return DTensor.from_local(_own_storage(local.reshape(-1)[:k]), self._mesh, [Shard(0)], run_check=False,
                                  shape=torch.Size([numel]), stride=(1,))

    def _partitioned(self, teacher: Any, model: bool) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """ZeRO-3: checkpoint name -> (this rank's partition, its parameter) of every partitioned
        tensor: the weights (`model/NAME`; under bf16 the bf16 weights, as whole checkpoints hold),
        AdamW's moments (`optim/NAME/KEY`, DeepSpeed's fp32 partitions) and the teacher's shadow."""
        from deepspeed.utils import safe_get_local_optimizer_state

        params = dict(self.model.named_parameters(remove_duplicate=False))  # tied weights under each name
        out = {}
        if model:
            out.update({f"model/{k}": (params[k].ds_tensor, params[k]) for k in self.model.state_dict()
                        if k in params and hasattr(params[k], "ds_tensor")})
        if self._adam_step() is not None:
            for name, p in zip(self.names, self.params, strict=True):
                out.update({f"optim/{name}/{key}": (safe_get_local_optimizer_state(p, key), p) for key in ADAM_STATE})
        out.update({f"teacher/{name}": (t, params[name]) for name, t in teacher.shadow.items()})
        return out

    def _fragments(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """ZeRO-1/2: the pieces of AdamW's moments this rank holds, `optim/NAME/KEY#START` ->
        (the piece, its parameter). DeepSpeed partitions the flat fp32 groups evenly over the ranks, so
        a parameter's moments may be split between ranks at any element: a piece is the elements
        [START, START + n) of the flattened moment, a view into DeepSpeed's flat buffer."""
        out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        if self._adam_step() is None:
            return out
        for name, p in zip(self.names, self.params, strict=True):
            mapping = getattr(p, "_hp_mapping", None)
            if mapping is None:  # no element of this parameter lies in this rank's partition
                continue
            start = mapping.lp_fragment_address.start
            out.update({f"optim/{name}/{key}{FRAGMENT}{start}": (mapping.get_hp_fragment(key), p)
                        for key in ADAM_STATE})
        return out

    def named_state(self, teacher: Any, model: bool = True) -> dict[str, torch.Tensor]:
        """What a sharded checkpoint writes. ZeRO-3: the partitioned tensors as flat DTensors
        (`_flat`), buffers whole. ZeRO-1/2: the weights and the shadow whole (the same on every rank:
        DCP writes a replicated tensor once), AdamW's moments as this rank's pieces (`_fragments`).
        AdamW's `step` whole."""
        state = {f"model/{k}": _own_storage(v) for k, v in self.model.state_dict().items()} if model else {}
        if self.stage == 3:
            state.update({key: self._flat(local, p) for key, (local, p) in self._partitioned(teacher, model).items()})
        else:
            state.update({f"teacher/{k}": v for k, v in teacher.shadow.items()})
            state.update({key: _own_storage(piece.reshape(-1)) for key, (piece, _) in self._fragments().items()})
        step = self._adam_step()
        if step is not None:
            state.update({f"optim/{name}/step": step.detach().clone().cpu() for name in self.names})
        return state

    def whole_shapes(self, teacher: Any) -> dict[str, list[int]]:
        if self.stage == 3:
            return {key: list(p.ds_shape) for key, (_, p) in self._partitioned(teacher, True).items()}
        if self._adam_step() is None:
            return {}
        return {f"optim/{name}/{key}": list(p.shape) for name, p in zip(self.names, self.params, strict=True)
                for key in ADAM_STATE}

    @contextlib.contextmanager
    def whole_weights(self) -> Iterator[dict[str, torch.Tensor] | None]:
        # the live model holds the whole weights (ZeRO-3: while gathered). Under bf16 these are the
        # bf16 weights: DeepSpeed's fp32 master copy is rebuilt from them on resume
        self.layout.gather()
        yield None

    def load_optimizer(self, state: dict[str, Any]) -> None:
        """AdamW state of a checkpoint (torch's layout, whole tensors) into DeepSpeed's partitions.
        DeepSpeed creates its optimizer state at the first step, so a step at lr 0 on zero
        gradients comes first: it leaves the weights unchanged and creates zero states."""
        from deepspeed.utils import safe_set_full_optimizer_state

        saved = {i: st for i, st in state.get("state", {}).items() if isinstance(i, int) and i < len(self.params)}
        if not saved:
            return
        set_lr(self.optimizer, 0.0)
        self.layout.gather()
        for m in range(self.grad_accum):
            self.backward(sum((p * 0).sum() for p in self.params), last=m == self.grad_accum - 1)
        self.step(loss_finite=True)
        step = max(float(st["step"]) for st in saved.values())
        for st in self.optimizer.optimizer.state.values():
            st["step"] = torch.as_tensor(step, dtype=st["step"].dtype) if torch.is_tensor(st["step"]) else step
        for i, st in saved.items():
            for k in ADAM_STATE:
                safe_set_full_optimizer_state(self.params[i], st[k], k)
