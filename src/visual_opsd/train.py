"""The Visual-OPSD training loop: on-policy self-distillation from a privileged-VT teacher.

    visual-opsd train --config configs/train_demo.yaml                  # real VTs
    visual-opsd train --config configs/train_demo.yaml teacher.vt_mode=noise out_dir=runs/opsd_noise
    visual-opsd train --config configs/train_demo.yaml --resume runs/opsd/last

Per optimizer step (method.md section 2):
1. take the next `prompts_per_step` training samples (a fixed permutation per epoch);
2. rollout: sample `rollout.n` completions per prompt from the *current* student on the student
   context C_S (question + problem image), with image-skip injection;
3. teacher: score the same completion ids on the teacher context C_T = C_S + framing + VT images
   (`teacher.vt_mode`: data / noise / shuffled / none) + transition, with the teacher's weights
   (`teacher.mode`: ema / live / frozen) and no gradient; the prefix is encoded once per prompt;
4. update: score them on C_S with gradient; loss = generalized JSD (beta, top-k, clip) per sampled
   completion token, averaged as `loss.reduction` says: `sequence_mean` (the reference's: the mean
   over each completion's tokens, then the mean over the completions of the whole accumulation
   window) or `token_mean` (the sum over the window's tokens divided by their count);
   AdamW step, grad clip, lr warm-up + cosine; EMA teacher update;
5. every `eval.every` steps: greedy text-only accuracy of the student on the validation split
   (never test; one text round, `eval.image_skips` 0, as the final evaluation); `best/` keeps the
   validation best, `last/` the latest state.

Every random stream of step s is seeded from (seed, s, rank), so a run resumed from the checkpoint
of step s replays steps s+1.. exactly as an uninterrupted run would.

Scale-out: the same command runs under `accelerate launch` with N processes (`distributed.py`):
each rank rolls out its shard of the step's prompts, the loss is normalised by the completion
(or token) count of the whole step over all ranks and the gradients are summed, so the update does
not depend on N or on `grad_accum`; rank 0 writes metrics and checkpoints (resumable on any N).
FSDP2 and DeepSpeed ZeRO-1/2/3 hold the weights sharded (`engines.py`); docs/scale.md.

Reliability (docs/failure-modes.md): checkpoints are atomic with a checksum manifest (a corrupt
last/ falls back to last.prev/); a step with a non-finite loss or gradient is skipped and logged
with its sample ids, and `optim.max_bad_steps` consecutive ones abort the run; `limits.*` budgets
fail before anything large is allocated.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from visual_opsd.backends import load_backend, maze_cell_px
from visual_opsd.backends.bagel import BagelLoadOptions
from visual_opsd.backends.base import Backend, Context
from visual_opsd.backends.hf_config import HFOptions
from visual_opsd.budget import LimitsConfig, check_budget, memory_gib
from visual_opsd.checkpoint import CheckpointError, atomic_dir, remove_stale_temporaries, resolve_checkpoint
from visual_opsd.config import ConfigError, to_dict
from visual_opsd.distributed import Dist
from visual_opsd.engines import TorchEngine, ZeroEngine
from visual_opsd.errors import TrainingAborted
from visual_opsd.faults import DUMP_ENV, armed, dump_gradients, maybe_kill
from visual_opsd.losses import (
    fused_linear_generalized_jsd,
    generalized_jsd,
    global_sequence_count,
    global_token_count,
)
from visual_opsd.rollout import Rollout, collect_rollout
from visual_opsd.sample import Sample
from visual_opsd.sft import TaskDataConfig, load_samples, lr_at, predict
from visual_opsd.tasks import get_task
from visual_opsd.teacher import Teacher

logger = logging.getLogger(__name__)


@dataclass
class RolloutConfig:
    n: int = field(default=1, metadata={"help": "completions sampled per prompt"})
    max_new_tokens: int = field(default=160, metadata={"help": "token budget of a completion"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature (paper: 1.0)"})
    max_image_skips: int = field(default=1, metadata={"help": "image-skip injections per completion"})
    source: Literal["sample", "data"] = field(
        default="sample", metadata={"help": "sample (on-policy) or data (text-only traces: deterministic mode)"}
    )

    def __post_init__(self) -> None:
        if self.n < 1 or self.max_new_tokens < 1 or self.max_image_skips < 0 or self.temperature < 0:
            raise ValueError("rollout.n, rollout.max_new_tokens >= 1; max_image_skips, temperature >= 0")


@dataclass
class TeacherConfig:
    mode: Literal["ema", "live", "frozen"] = field(
        default="ema", metadata={"help": "teacher weights: ema of the student, live student, or frozen initial"}
    )
    ema_decay: float = field(default=0.995, metadata={"help": "EMA decay per optimizer step"})
    vt_mode: Literal["data", "noise", "shuffled", "none"] = field(
        default="data", metadata={"help": "VTs in the teacher context: data, or the noise/shuffled/none controls"}
    )

    def __post_init__(self) -> None:
        if not 0.0 <= self.ema_decay <= 1.0:
            raise ValueError(f"teacher.ema_decay must be in [0, 1], got {self.ema_decay}")


@dataclass
class LossConfig:
    beta: float = field(default=0.5, metadata={"help": "JSD interpolation: 0 = KL(T||S), 1 = KL(S||T)"})
    top_k: int | None = field(default=256, metadata={"help": "teacher top-k support (null = full vocabulary)"})
    clip: float | None = field(default=0.05, metadata={"help": "cap per (token, vocab entry) term (null = off)"})
    temperature: float = field(default=1.0, metadata={"help": "divides both logits; loss scaled by T^2"})
    fused: bool = field(default=False, metadata={"help": "chunked loss from hidden states (long completions)"})
    reduction: Literal["sequence_mean", "token_mean"] = field(
        default="sequence_mean",
        metadata={"help": "sequence_mean: mean over each completion's tokens, then over the step's completions "
                          "(the paper's); token_mean: over all the step's tokens"},
    )

    def __post_init__(self) -> None:
        if not 0.0 <= self.beta <= 1.0 or self.temperature <= 0:
            raise ValueError("loss.beta must be in [0, 1] and loss.temperature > 0")
        if self.reduction not in ("sequence_mean", "token_mean"):  # Python callers bypass the config's check
            raise ValueError(f"loss.reduction must be sequence_mean or token_mean, got {self.reduction!r}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"loss.top_k must be >= 1 or null, got {self.top_k}")


@dataclass
class TrainOptimConfig:
    steps: int = field(default=100, metadata={"help": "optimizer steps"})
    prompts_per_step: int = field(default=16, metadata={"help": "prompts per optimizer step (all micro-batches)"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    lr: float = field(default=3e-4, metadata={"help": "peak learning rate"})
    min_lr_ratio: float = field(default=0.01, metadata={"help": "cosine floor as a fraction of lr"})
    warmup_steps: int = field(default=10, metadata={"help": "linear warm-up steps"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    betas: tuple[float, float] = field(default=(0.9, 0.95), metadata={"help": "AdamW betas"})
    grad_clip: float = field(default=1.0, metadata={"help": "max gradient norm (0 = off)"})
    max_bad_steps: int = field(
        default=3, metadata={"help": "abort after this many consecutive steps with a non-finite loss or gradient"}
    )

    def __post_init__(self) -> None:
        if self.max_bad_steps < 1:
            raise ValueError(f"optim.max_bad_steps must be >= 1, got {self.max_bad_steps}")
        if self.steps < 1 or self.grad_accum < 1 or self.prompts_per_step < self.grad_accum:
            raise ValueError("optim.steps, optim.grad_accum >= 1 and optim.prompts_per_step >= optim.grad_accum")
        if self.prompts_per_step % self.grad_accum:
            raise ValueError("optim.prompts_per_step must be a multiple of optim.grad_accum")
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1 or self.warmup_steps < 0 or self.grad_clip < 0:
            raise ValueError("optim.lr > 0, optim.min_lr_ratio in [0, 1], warmup_steps and grad_clip >= 0")


@dataclass
class TrainEvalConfig:
    every: int = field(default=25, metadata={"help": "validate every N steps (and at the start and end)"})
    max_new_tokens: int = field(default=160, metadata={"help": "token budget of validation answers"})
    batch_size: int = field(default=64, metadata={"help": "rows per validation decoding batch"})
    image_skips: int = field(
        default=0, metadata={"help": "image skips per validation answer (0: one text round, as the reference)"}
    )

    def __post_init__(self) -> None:
        if self.every < 1 or self.max_new_tokens < 1 or self.batch_size < 1:
            raise ValueError("eval.every, eval.max_new_tokens and eval.batch_size must be >= 1")
        if self.image_skips < 0:
            raise ValueError(f"eval.image_skips must be >= 0, got {self.image_skips}")


@dataclass
class TrainConfig:
    init_from: str = field(default="runs/sft/final", metadata={"help": "model folder to start from (SFT teacher)"})
    out_dir: str = field(default="runs/opsd", metadata={"help": "output folder (checkpoints, metrics.jsonl)"})
    seed: int = field(default=0, metadata={"help": "seed of data order, sampling and noise"})
    threads: int = field(default=2, metadata={"help": "torch CPU threads"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})
    save_every: int = field(default=25, metadata={"help": "write last/ every N steps (and at the end)"})
    resume: str | None = field(default=None, metadata={"help": "resume from this checkpoint folder (last/)"})
    stop_at_step: int | None = field(
        default=None, metadata={"help": "save and stop after this step (time-limited jobs); the schedule is unchanged"}
    )
    data: TaskDataConfig = field(default_factory=TaskDataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: TrainOptimConfig = field(default_factory=TrainOptimConfig)
    eval: TrainEvalConfig = field(default_factory=TrainEvalConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    hf: HFOptions = field(default_factory=HFOptions)  # Hugging Face models only (init_from an HF folder)
    backend: BagelLoadOptions | None = field(  # BAGEL folders only
        default=None, metadata={"help": "how to open a BAGEL folder; null: the whole model in fp32"}
    )
    shard_weights: bool = field(
        default=False,
        metadata={"help": "FSDP2: shard weights, gradients and optimizer state over the processes (on by itself "
                          "under an accelerate FSDP config; the way to ask for it without one)"},
    )
    deepspeed_stage: int | None = field(
        default=None,
        metadata={"help": "DeepSpeed ZeRO stage 1, 2 or 3 over the processes (taken from an accelerate DeepSpeed "
                          "config by itself; the way to ask for it without one); null: off"},
    )

    def __post_init__(self) -> None:
        if self.threads < 1 or self.save_every < 1:
            raise ValueError("threads and save_every must be >= 1")
        if self.stop_at_step is not None and self.stop_at_step < 1:
            raise ValueError(f"stop_at_step must be >= 1 or null, got {self.stop_at_step}")
        if self.deepspeed_stage not in (None, 1, 2, 3):
            raise ValueError(f"deepspeed_stage must be 1, 2, 3 or null, got {self.deepspeed_stage}")


@contextmanager
def timed(times: dict[str, float], name: str):
    """Add the block's wall time to times[name] (metrics `time/rollout`, `time/teacher`, `time/update`)."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        times[name] = times.get(name, 0.0) + time.perf_counter() - t0


def step_seed(seed: int, step: int, stream: int, rank: int = 0) -> torch.Generator:
    """The generator of one random stream of one step on one rank: a resumed run replays it exactly."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step * 101 + stream + rank * 1_000_000_007)


def prompts_per_rank(optim: TrainOptimConfig, world: int) -> int:
    """Prompts each process handles per step; the global batch must split evenly over ranks x micro-batches."""
    if optim.prompts_per_step % (world * optim.grad_accum):
        raise ConfigError(
            f"optim.prompts_per_step={optim.prompts_per_step} must be a multiple of processes x optim.grad_accum "
            f"= {world} x {optim.grad_accum} = {world * optim.grad_accum}"
        )
    return optim.prompts_per_step // world


def batch_indices(n_samples: int, step: int, prompts_per_step: int, seed: int) -> list[int]:
    """Sample indices of a step: consecutive slices of a fresh permutation every epoch."""
    out = []
    start = step * prompts_per_step
    for pos in range(start, start + prompts_per_step):
        epoch, offset = divmod(pos, n_samples)
        perm = torch.randperm(n_samples, generator=torch.Generator().manual_seed(seed + 7919 * epoch))
        out.append(int(perm[offset]))
    return out


def teacher_contexts(
    backend: Backend, samples: list[Sample], pool: list[Sample], vt_mode: str, gen: torch.Generator
) -> list[Context]:
    """C_T per sample; `shuffled` draws each sample's VTs from another sample of `pool`."""
    contexts = []
    for s in samples:
        partner = None
        if vt_mode == "shuffled":
            while partner is None or partner.id == s.id:
                partner = pool[int(torch.randint(len(pool), (1,), generator=gen))]
        contexts.append(backend.build_context(s, "teacher", vt_mode, shuffled_from=partner, generator=gen))
    return contexts


def distill_loss(
    backend: Backend,
    teacher: Teacher,
    student_ctx: list[Context],
    teacher_ctx: list[Context],
    rollout: Rollout,
    cfg: LossConfig,
    normalizer: torch.Tensor,
    times: dict[str, float],
) -> torch.Tensor:
    """Teacher forward (no grad) + student forward on the same completion ids; the JSD per sampled
    token, reduced by `cfg.reduction` with `normalizer` (`loss_normalizer`: the whole accumulation
    window's completions for "sequence_mean", its tokens for "token_mean"):
        sequence_mean: sum over this micro-batch's completions c of (mean of c's per-token JSD) / normalizer
        token_mean:    sum over this micro-batch's tokens of the per-token JSD / normalizer
    so that the losses of the window's micro-batches (and ranks) add up to the window's mean."""
    output = "hidden" if cfg.fused else "logits"
    with timed(times, "teacher"), teacher.weights():
        t = backend.score(teacher_ctx, rollout.ids, output=output)
        # the teacher swaps storages by pointer: a detached view taken here keeps the teacher's head
        # storage after the block ends (no copy: ~1 GiB for a 7B model's head in bf16); a sharded
        # run frees the gathered teacher weights when the block ends, so it keeps a copy
        t_head = t.head_weight.detach() if cfg.fused else None
        if t_head is not None and teacher.layout.in_place:
            t_head = t_head.clone()
    with timed(times, "update"):
        s = backend.score(student_ctx, rollout.ids, output=output)
        mask = s.mask & rollout.loss_mask(s.mask.shape[1]).to(s.mask.device)
        options = dict(beta=cfg.beta, temperature=cfg.temperature, top_k=cfg.top_k, clip=cfg.clip)
        if cfg.fused:
            # (B, T, H) with the mask, not the flattened scored rows: sequence_mean needs to know
            # which completion each row belongs to (only scored rows are computed either way)
            return fused_linear_generalized_jsd(
                s.hidden, t.hidden, s.head_weight, teacher_weight=t_head, mask=mask,
                reduction=cfg.reduction, normalizer=normalizer, **options,
            )
        return generalized_jsd(s.logits, t.logits, mask=mask, reduction=cfg.reduction, normalizer=normalizer, **options)


def loss_normalizer(masks: list[torch.Tensor], reduction: str) -> torch.Tensor:
    """The denominator of `distill_loss` for one optimizer step: over the micro-batches' loss masks
    ((R, T) each, one row per completion) of the whole accumulation window and all ranks (an
    all-reduce: every rank must call it), the number of completions with at least one scored token
    ("sequence_mean") or of scored tokens ("token_mean"); at least 1. Dividing each micro-batch's
    sum by the window's count, not by its own, keeps the gradient independent of how the step is
    split over micro-batches and processes."""
    count = global_sequence_count(masks) if reduction == "sequence_mean" else global_token_count(masks)
    return count.clamp(min=1)


def run_train(cfg: TrainConfig) -> Path:
    """Run Visual-OPSD; returns the folder of the selected (validation-best) model."""
    torch.set_num_threads(cfg.threads)
    dist = Dist.create()
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # a truncated or altered checkpoint is never loaded: the previous good one, or a clear stop
    resume = resolve_checkpoint(cfg.resume) if cfg.resume else None
    backend = load_backend(resume / "model" if resume else cfg.init_from, cfg.hf, resume=resume is not None,
                           bagel=cfg.backend)
    kind = dist.check_engine(backend, cfg.shard_weights, cfg.deepspeed_stage)
    model = backend.model
    task = get_task(cfg.data.task)
    patch = maze_cell_px(backend)
    train = load_samples(cfg.data, task, "train", patch)
    val = load_samples(cfg.data, task, "val", patch)
    per_rank = prompts_per_rank(cfg.optim, dist.world)
    micro = per_rank // cfg.optim.grad_accum
    check_budget(cfg, backend, train, micro * cfg.rollout.n)  # before the optimizer state exists
    # the engine lays the weights out (FSDP2 shards, ZeRO partitions) before the teacher's shadow
    # is taken, so the shadow follows the same layout
    engine = (ZeroEngine(dist, model, cfg.optim, int(kind[-1]), micro * cfg.rollout.n, dist.precision)
              if kind.startswith("zero") else TorchEngine(dist, model, cfg.optim, sharded=kind == "fsdp"))
    teacher = Teacher(model, cfg.teacher.mode, cfg.teacher.ema_decay, layout=engine.layout,
                      base_weights=getattr(backend, "adapters_disabled", None))  # LoRA: frozen = adapters off
    if dist.is_main and dist.world > 1:
        print(f"train: {dist.world} processes, engine {kind}", flush=True)
    model_device = engine.params[0].device if engine.params else torch.device("cpu")
    state: dict[str, Any] = {"step": 0, "best": -1.0, "best_step": None, "bad_steps": 0}
    if resume:
        state = {"bad_steps": 0, **load_train_state(resume, engine, teacher)}
    log = MetricsLog(out / "metrics.jsonl", resume_step=state["step"] if resume else None, enabled=dist.is_main)
    if dist.is_main:
        remove_stale_temporaries(out)  # half-written checkpoints of a killed run (never resumed from)
        (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))

    bar = tqdm(range(state["step"], cfg.optim.steps), initial=state["step"], total=cfg.optim.steps,
               desc=f"opsd vt={cfg.teacher.vt_mode} teacher={cfg.teacher.mode}",
               disable=not cfg.progress or not dist.is_main, dynamic_ncols=True)
    if state["step"] == 0 and val:
        state.update(_validate(backend, engine, task, val, cfg, out, dist, step=0, best=state["best"], log=log))
    for step in bar:
        done = step + 1
        times: dict[str, float] = {}
        lr = lr_at(step, cfg.optim)
        engine.set_lr(lr)
        step_idx = batch_indices(len(train), step, cfg.optim.prompts_per_step, cfg.seed)
        idx = dist.shard(step_idx)  # this rank's contiguous share of the global batch
        gen_sample, gen_vt = step_seed(cfg.seed, step, 0, dist.rank), step_seed(cfg.seed, step, 1, dist.rank)

        # 1-2: every rollout of the window first, so the loss's denominator (the window's completion
        # or token count) is known before any backward
        model.eval()
        engine.layout.gather()  # sharded: the weights once, so decoding issues no collectives
        windows = []
        for m in range(cfg.optim.grad_accum):
            samples = [train[i] for i in idx[m * micro : (m + 1) * micro]]
            s_ctx = [backend.build_context(s, "student") for s in samples]
            with timed(times, "rollout"):
                ro = collect_rollout(
                    backend, samples, s_ctx, n=cfg.rollout.n, max_new_tokens=cfg.rollout.max_new_tokens,
                    temperature=cfg.rollout.temperature, max_image_skips=cfg.rollout.max_image_skips,
                    source=cfg.rollout.source, generator=gen_sample,
                )
            windows.append((samples, s_ctx, ro))
            maybe_kill("rollout", done)
        lengths = max(max((len(i) for i in ro.ids), default=0) for _, _, ro in windows)
        masks = [ro.loss_mask(lengths).to(dist.device) for _, _, ro in windows]  # the process group's device
        local_tokens = int(sum(int(m.sum()) for m in masks))
        # completion tokens of the whole step: all micro-batches, all ranks (an all-reduce); with
        # sequence_mean the loss divides by the step's completions instead (a second all-reduce)
        token_count = global_token_count(masks)
        tokens = int(token_count)
        normalizer = (token_count.clamp(min=1) if cfg.loss.reduction == "token_mean"
                      else loss_normalizer(masks, cfg.loss.reduction)).to(model_device)

        # 3-4: teacher and student scoring, backward per micro-batch; gradients summed over ranks
        model.train()
        engine.zero_grad()
        total = 0.0
        for m, (samples, s_ctx, ro) in enumerate(windows):
            with timed(times, "teacher"):
                t_ctx = teacher_contexts(backend, samples, train, cfg.teacher.vt_mode, gen_vt)
            with dist.autocast():
                loss = distill_loss(backend, teacher, s_ctx, t_ctx, ro, cfg.loss, normalizer, times)
            if armed("nan:loss", done):  # fault injection
                loss = loss * float("nan")
            with timed(times, "update"):
                engine.backward(loss, last=m == len(windows) - 1)  # the last one reduces over ranks
            total += loss.item()
        with timed(times, "update"):
            if os.environ.get(DUMP_ENV):  # test hook: whole gradients (a collective when sharded)
                grads = engine.whole_grads()
                if dist.is_main:
                    dump_gradients(done, grads)
            if armed("inf:grad", done):  # fault injection
                next(p for p in engine.params if p.grad is not None).grad.view(-1)[0] = float("inf")
            total = dist.sum(total)
            grad_norm, finite = engine.step(loss_finite=math.isfinite(total))
            if finite:
                maybe_kill("optimizer", done)
                teacher.update()
                state["bad_steps"] = 0
            else:
                state["bad_steps"] += 1

        record: dict[str, Any] = {"step": done, "lr": lr, "loss": total, "grad_norm": float(grad_norm),
                                  "tokens": tokens}
        if dist.world > 1:
            record["tokens/per_rank"] = dist.gather_int(local_tokens)
        stats: dict[str, float] = {}
        for _, _, ro in windows:
            for k, v in ro.stats(task).items():
                stats[k] = stats.get(k, 0.0) + v / len(windows)
        record.update(dist.mean_dict(stats))  # equal shards: the mean of rank means is the global mean
        record.update(dist.max_dict(memory_gib(model_device)))  # the fullest rank, after the step
        record.update({f"time/{k}": v for k, v in times.items()})
        if not finite:
            # the weights are still those of the last good step: log, and save below as usual (a
            # checkpoint after a skipped step is good); abort without saving after too many in a row
            ids = [train[i].id for i in step_idx]
            record.update(skipped="non-finite loss or gradient", samples=ids, bad_steps=state["bad_steps"])
            message = (f"step {done}: non-finite loss {total} or grad norm {float(grad_norm)}; step skipped "
                       f"(samples {ids[:16]}); {state['bad_steps']} consecutive of at most {cfg.optim.max_bad_steps}")
            if dist.is_main:
                logger.warning(message)
            if state["bad_steps"] >= cfg.optim.max_bad_steps:
                log.write(record)
                log.close()
                last = out / "last"
                kept = f"the last good checkpoint is {last} (step {_checkpoint_step(last)})" if (
                    last / "trainer_state.json").is_file() else "no checkpoint was written yet"
                raise TrainingAborted(
                    f"{message}. Aborting after {state['bad_steps']} consecutive non-finite steps "
                    f"(optim.max_bad_steps={cfg.optim.max_bad_steps}); {kept}. Lower optim.lr or check those samples."
                )
        elif val and (done % cfg.eval.every == 0 or done == cfg.optim.steps):
            state.update(_validate(backend, engine, task, val, cfg, out, dist, step=done, best=state["best"],
                                   record=record))
        state["step"] = done
        stopping = cfg.stop_at_step is not None and done >= cfg.stop_at_step
        if done % cfg.save_every == 0 or done == cfg.optim.steps or stopping:
            with engine.whole_weights() as weights:  # every rank (collectives when sharded)
                whole = engine.train_state(teacher, dist.is_main)
                if whole is not None:
                    save_train_state(out / "last", backend, weights, whole, state)
            dist.barrier()  # no rank runs ahead of a checkpoint being written
        log.write(record)
        bar.set_postfix(loss=f"{total:.4f}", acc=f"{record.get('rollout/correct', 0):.2f}")
        if stopping:
            break
    log.close()
    dist.close()
    selected = out / "best" / "model" if (out / "best").exists() else out / "last" / "model"
    if dist.is_main:
        print(f"train: done at step {state['step']}; selected model (validation best, step {state['best_step']}): "
              f"{selected}")
    return selected


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


def _checkpoint_step(path: Path) -> int | None:
    try:
        return int(json.loads((path / "trainer_state.json").read_text())["step"])
    except (OSError, ValueError, KeyError):
        return None


def _validate(backend, engine: TorchEngine, task, val, cfg: TrainConfig, out: Path, dist: Dist, step: int,
              best: float, record=None, log: MetricsLog | None = None):
    """Greedy text-only student accuracy on the validation split, sharded over ranks; rank 0 writes
    best/ on improvement."""
    engine.layout.gather()  # sharded: gathered before decoding (ranks decode different lengths)
    mine = val[dist.rank :: dist.world]
    preds = predict(backend, mine, "text", cfg.eval.max_new_tokens, batch_size=cfg.eval.batch_size, seed=cfg.seed,
                    image_skips=cfg.eval.image_skips)  # one text round by default, as the final evaluation
    correct = dist.sum(sum(task.is_correct(s, p) for s, p in zip(mine, preds, strict=True)))
    acc = correct / max(1, len(val))
    if record is not None:
        record["val/accuracy"] = acc
    elif log is not None:
        log.write({"step": step, "val/accuracy": acc})
    result: dict[str, Any] = {}
    if acc > best:
        result = {"best": acc, "best_step": step}
        with engine.whole_weights() as whole:  # every rank (a collective when sharded)
            if dist.is_main:
                with atomic_dir(out / "best", manifest=True) as tmp:
                    backend.save(tmp / "model", state=whole)
                    (tmp / "trainer_state.json").write_text(json.dumps({"step": step, "val/accuracy": acc}))
    return result


def save_train_state(path: Path, backend: Backend, weights: dict[str, torch.Tensor] | None, whole: dict[str, Any],
                     state: dict) -> None:
    """Everything a resume needs, written atomically with a checksum manifest: weights, optimizer,
    teacher, step, best. The checkpoint it replaces is kept as `<path>.prev` (the fallback).
    `weights`, `whole`: the engine's `whole_weights()` and `train_state` (whole tensors)."""
    with atomic_dir(path, manifest=True, keep_previous=True) as tmp:
        backend.save(tmp / "model", state=weights)
        maybe_kill("checkpoint", state["step"])  # fault injection: a half-written checkpoint
        torch.save(whole["optimizer"], tmp / "optimizer.pt")
        if whole["teacher"]:
            save_file(whole["teacher"], str(tmp / "teacher.safetensors"))
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))


def load_train_state(path: Path, engine: TorchEngine, teacher: Teacher) -> dict[str, Any]:
    """The optimizer and teacher state and the trainer state of checkpoint `path` (already verified
    against its manifest); anything unreadable is a `CheckpointError` naming the file."""
    state_file = path / "trainer_state.json"
    if not state_file.is_file():
        raise CheckpointError(f"{path}: not a training checkpoint (no trainer_state.json)")
    file = path / "optimizer.pt"
    try:
        # weights_only: tensors and plain containers only, never arbitrary unpickling
        engine.load_optimizer(torch.load(file, weights_only=True))  # whole tensors -> this rank's shares
        if teacher.shadow:
            file = path / "teacher.safetensors"
            teacher.load_state_dict(load_file(str(file)))
        file = state_file
        return json.loads(state_file.read_text())
    except Exception as e:  # a bad pickle, a safetensors header, a mismatched shape: one clear message
        raise CheckpointError(f"{file}: cannot be loaded ({type(e).__name__}: {str(e)[:300]})") from e
