"""The Visual-OPSD training loop: on-policy self-distillation from a privileged-VT teacher.

    visual-opsd train --config configs/train_demo.yaml                  # real VTs
    visual-opsd train --config configs/train_demo.yaml teacher.vt_mode=noise out_dir=runs/opsd_noise
    visual-opsd train --config configs/train_demo.yaml --resume runs/opsd/last

Per optimizer step (docs/method.md section 2):
1. take the next `prompts_per_step` training samples (a fixed permutation per epoch);
2. rollout: sample `rollout.n` completions per prompt from the *current* student on the student
   context C_S (question + problem image), with image-skip injection, through the rollout engine
   `rollout.engine` (`rollout_engines.py`: native, or a colocated vLLM that gets the weights after
   every optimizer step);
3. teacher: score the same completion ids on the teacher context C_T = C_S + framing + VT images
   (`teacher.vt_mode`: data / noise / shuffled / none) + transition, with the teacher's weights
   (`teacher.mode`: ema / live / frozen) and no gradient; the prefix is encoded once per prompt.
   A backend with a length limit (HF `max_length`) gets each completion cut once, to the room C_T
   leaves (`rollout.fit_rollout`): both sides score the very same ids, as the reference does;
4. update: score them on C_S with gradient (dropout off: the policy that sampled them,
   `Backend.disable_dropout`); loss = generalized JSD (beta, top-k, clip) per sampled
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
FSDP2 and DeepSpeed ZeRO-1/2/3 hold the weights sharded (`engines.py`); under FSDP2 and ZeRO every
rank writes its own shards of `last/` (`sharded_checkpoint.py`; `visual-opsd export` turns them into a
model folder); docs/scale.md.

Reliability (docs/failure-modes.md): checkpoints are atomic with a checksum manifest (a corrupt
last/ falls back to last.prev/); a step with a non-finite loss or gradient is skipped and logged
with its sample ids, and `optim.max_bad_steps` consecutive ones abort the run; `limits.*` budgets
fail before anything large is allocated.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from visual_opsd import sharded_checkpoint
from visual_opsd.backends import BackendOptions
from visual_opsd.backends.base import Backend, Context
from visual_opsd.budget import LimitsConfig, check_budget, memory_gib
from visual_opsd.checkpoint import atomic_dir, remove_stale_temporaries, resolve_checkpoint
from visual_opsd.config import to_dict
from visual_opsd.distributed import Dist
from visual_opsd.engines import Engine, make_engine
from visual_opsd.errors import CheckpointError, ConfigError, TrainingAborted
from visual_opsd.faults import maybe_kill
from visual_opsd.losses import (
    fused_linear_generalized_jsd,
    generalized_jsd,
    global_sequence_count,
    global_token_count,
)
from visual_opsd.optim import MetricsLog, lr_at
from visual_opsd.rollout import Rollout, collect_rollout, fit_rollout
from visual_opsd.rollout_engines import RolloutEngine, make_rollout_engine
from visual_opsd.sample import Sample
from visual_opsd.sft import TaskDataConfig, check_model_folder, load_train_val, open_model, predict
from visual_opsd.tasks import Task, get_task
from visual_opsd.tasks.base import scorer_of
from visual_opsd.teacher import Teacher
from visual_opsd.tracking import (
    Reporter,
    Tracker,
    check_logging,
    check_trackers,
    logging_steps_field,
    open_reporter,
    report_to_field,
)
from visual_opsd.vt import teacher_contexts

logger = logging.getLogger(__name__)
TRAIN_KEYS = ("rollout/correct", "rollout/length", "tokens")  # in the console line beside loss, lr, grad_norm


@dataclass
class RolloutConfig:
    n: int = field(default=1, metadata={"help": "completions sampled per prompt"})
    max_new_tokens: int = field(default=160, metadata={"help": "token budget of a completion"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature (paper: 1.0)"})
    max_image_skips: int = field(default=1, metadata={"help": "image-skip injections per completion"})
    source: Literal["sample", "data"] = field(
        default="sample", metadata={"help": "sample (on-policy) or data (text-only traces: deterministic mode)"}
    )
    engine: Literal["native", "vllm"] = field(
        default="native",
        metadata={"help": "what samples the rollouts: native (the backend's own decoder on the training weights) or "
                          "vllm (a colocated vLLM engine, HF backends, one process; docs/scale.md)"},
    )
    vllm_gpu_memory_utilization: float = field(
        default=0.3, metadata={"help": "vllm on a GPU: share of its memory for vLLM's weights and KV cache"}
    )
    vllm_cpu_kv_cache_gib: int = field(default=1, metadata={"help": "vllm on a CPU: GiB of KV cache"})

    def __post_init__(self) -> None:
        if self.n < 1 or self.max_new_tokens < 1 or self.max_image_skips < 0 or self.temperature < 0:
            raise ValueError("rollout.n, rollout.max_new_tokens >= 1; max_image_skips, temperature >= 0")
        if not 0 < self.vllm_gpu_memory_utilization < 1 or self.vllm_cpu_kv_cache_gib < 1:
            raise ValueError("rollout.vllm_gpu_memory_utilization in (0, 1), rollout.vllm_cpu_kv_cache_gib >= 1")


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
    init_from: str = field(
        default="runs/sft/final",
        metadata={"help": "model folder to start from (SFT teacher), or a Hub id org/name[@revision]"})
    out_dir: str = field(default="runs/opsd", metadata={"help": "output folder (checkpoints, metrics.jsonl)"})
    seed: int = field(default=0, metadata={"help": "seed of data order, sampling and noise"})
    threads: int = field(default=2, metadata={"help": "torch CPU threads"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})
    report_to: list[Tracker] = report_to_field()
    logging_steps: int = logging_steps_field()
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
    backend: BackendOptions | None = field(
        default=None,
        metadata={"help": "how to open the model folder: a section with the family's kind (mini, hf, bagel) and "
                          "options; null: the family's defaults (docs/architecture.md)"},
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
        check_logging(self.report_to, self.logging_steps)


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
        # trained only where both sides have real scores: a position one side cut holds zeros there
        # (a uniform teacher target); `fit_rollout` cuts both sides alike beforehand, so none is cut here
        mask = s.mask & t.mask.to(s.mask.device) & rollout.loss_mask(s.mask.shape[1]).to(s.mask.device)
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


@dataclass
class TrainState:
    """Where a run stands (`trainer_state.json` of a checkpoint): the last finished step, the best
    validation accuracy and its step, and the count of consecutive skipped (non-finite) steps."""

    step: int = 0
    best: float = -1.0
    best_step: int | None = None
    bad_steps: int = 0

    @classmethod
    def from_json(cls, saved: dict[str, Any]) -> TrainState:
        return cls(step=saved["step"], best=saved["best"], best_step=saved["best_step"],
                   bad_steps=saved.get("bad_steps", 0))


@dataclass
class Run:
    """Everything a training run holds, set up once by `open_run`."""

    cfg: TrainConfig
    dist: Dist
    out: Path
    backend: Backend
    engine: Engine
    teacher: Teacher
    task: Task
    train: list[Sample]
    val: list[Sample]
    log: Reporter  # metrics.jsonl, the trackers of report_to, the console lines
    state: TrainState
    micro: int  # prompts per micro-batch on this rank
    device: torch.device  # where the model's parameters live
    rollout_engine: RolloutEngine | None = None  # what samples the rollouts (`rollout.engine`)

    def close(self, clean: bool) -> None:
        """The metrics file always; the process group only after a clean end (after a failure the
        other ranks may never reach its barrier)."""
        if self.rollout_engine is not None:
            self.rollout_engine.close()
        self.log.close()
        if clean:
            self.dist.close()


class Window(NamedTuple):
    """One micro-batch of a step: its prompts, their student and teacher contexts, the sampled
    completions (`rollout`, its statistics) and the same completions fitted to both contexts
    (`scored`, what the loss scores: `fit_rollout`)."""

    samples: list[Sample]
    contexts: list[Context]
    teacher_contexts: list[Context]
    rollout: Rollout
    scored: Rollout


def run_train(cfg: TrainConfig) -> Path:
    """Run Visual-OPSD (docs/method.md section 2); returns the folder of the selected
    (validation-best) model."""
    run = open_run(cfg)
    clean = False
    try:
        if run.state.step == 0 and run.val:
            run.log.write({"step": 0, **validate(run, step=0)})
        bar = tqdm(range(run.state.step, cfg.optim.steps), initial=run.state.step, total=cfg.optim.steps,
                   desc=f"opsd vt={cfg.teacher.vt_mode} teacher={cfg.teacher.mode}",
                   disable=not cfg.progress or not run.dist.is_main, dynamic_ncols=True)
        for step in bar:
            done, times = step + 1, {}
            run.engine.begin_step(done, lr_at(step, cfg.optim))
            prompts = batch_indices(len(run.train), step, cfg.optim.prompts_per_step, cfg.seed)
            # 1. rollouts: every micro-batch's first, so the loss's denominator is known before any backward
            windows = rollouts(run, run.dist.shard(prompts), step_seed(cfg.seed, step, 0, run.dist.rank),
                               step_seed(cfg.seed, step, 1, run.dist.rank), times)
            normalizer, tokens, local_tokens = loss_denominator(run, windows)
            # 2-3. teacher scores (privileged VT context), student scores, JSD loss, backward
            loss = distill_backward(run, windows, normalizer, times)
            # 4. optimizer step (skipped when not finite), then the teacher update
            grad_norm, finite = update(run, loss, times)
            # 5. metrics, validation, checkpoint
            record = step_record(run, done, windows, loss, grad_norm, tokens, local_tokens, times)
            if not finite:
                skip_step(run, done, record, [run.train[i].id for i in prompts], loss, grad_norm)
            elif run.val and (done % cfg.eval.every == 0 or done == cfg.optim.steps):
                record.update(validate(run, done))
            run.state.step = done
            stopping = cfg.stop_at_step is not None and done >= cfg.stop_at_step
            if done % cfg.save_every == 0 or done == cfg.optim.steps or stopping:
                save_last(run)
            run.log.write(record)
            bar.set_postfix(loss=f"{loss:.4f}", acc=f"{record.get('rollout/correct', 0):.2f}")
            if stopping:
                break
        clean = True
    finally:
        run.close(clean)
    selected = run.out / "best" / "model" if (run.out / "best").exists() else run.out / "last" / "model"
    if not selected.exists() and sharded_checkpoint.is_sharded(run.out / "last"):
        selected = run.out / "last"  # shards only: `visual-opsd export` makes a model folder of it
    if run.dist.is_main:
        hint = "" if selected.name == "model" else f" (sharded: visual-opsd export {selected} --out DIR)"
        print(f"train: done at step {run.state.step}; selected model (validation best, step "
              f"{run.state.best_step}): {selected}{hint}")
    return selected


def open_run(cfg: TrainConfig) -> Run:
    """Set-up: processes, the student (from `init_from`, or the checkpoint to resume), data, budget
    check, engine, teacher, metrics log. `out_dir` is created only once the inputs passed their
    checks: a bad input ends the command with one line and leaves nothing behind."""
    torch.set_num_threads(cfg.threads)
    check_trackers(cfg.report_to)  # a tracker's missing package fails before anything is loaded or written
    dist = Dist.create()
    out = Path(cfg.out_dir)
    # a truncated or altered checkpoint is never loaded: the previous good one, or a clear stop
    resume = resolve_resume(dist, cfg.resume) if cfg.resume else None
    if resume and not sharded_checkpoint.is_sharded(resume):
        backend = open_model("resume", resume / "model", cfg.backend, resume=True)
    else:  # a missing or unusable folder: a ConfigError naming init_from (nothing written yet)
        backend = open_model("init_from", cfg.init_from, cfg.backend)
        if resume:  # a sharded checkpoint has no model folder: init_from's model, the shards' weights
            sharded_checkpoint.load_model(resume, backend.model)  # whole, before the engine lays them out
    backend.disable_dropout()  # on-policy: the student is scored by the policy that sampled (no dropout)
    task = get_task(cfg.data.task)
    patch = backend.cell_px
    train, val = load_train_val(cfg.data, task, patch)
    micro = prompts_per_rank(cfg.optim, dist.world) // cfg.optim.grad_accum
    check_budget(cfg, backend, train, micro * cfg.rollout.n)  # before the optimizer state exists
    # the engine lays the weights out (FSDP2 shards, ZeRO partitions) before the teacher's shadow
    # is taken, so the shadow follows the same layout
    engine = make_engine(dist, backend, cfg, micro * cfg.rollout.n)
    teacher = Teacher(backend.model, cfg.teacher.mode, cfg.teacher.ema_decay, layout=engine.layout,
                      base_weights=backend.adapters_disabled)  # LoRA: frozen = adapters off
    state = TrainState.from_json(load_train_state(resume, engine, teacher)) if resume else TrainState()
    out.mkdir(parents=True, exist_ok=True)
    resume_step = state.step if resume else None
    log = open_reporter(cfg, out, MetricsLog(out / "metrics.jsonl", resume_step=resume_step, enabled=dist.is_main),
                        cfg.optim.steps, keys=TRAIN_KEYS, enabled=dist.is_main, resume_step=resume_step)
    if dist.is_main:
        remove_stale_temporaries(out)  # half-written checkpoints of a killed run (never resumed from)
        (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    device = engine.params[0].device if engine.params else torch.device("cpu")
    rollout_engine = make_rollout_engine(cfg.rollout.engine, backend, world=dist.world,
                                         gpu_memory_utilization=cfg.rollout.vllm_gpu_memory_utilization,
                                         cpu_kv_cache_gib=cfg.rollout.vllm_cpu_kv_cache_gib)
    return Run(cfg, dist, out, backend, engine, teacher, task, train, val, log, state, micro, device, rollout_engine)


def resolve_resume(dist: Dist, path: str | Path) -> Path:
    """`resolve_checkpoint` on rank 0 alone, its answer (the folder, or the `CheckpointError`) on
    every rank: the manifest check reads every file of the checkpoint once, not once per process
    (a sharded checkpoint of a 7B model is a few hundred GB)."""
    answer = None
    if dist.is_main:
        try:
            answer = ("ok", str(resolve_checkpoint(path)))
        except CheckpointError as e:
            answer = ("error", str(e))
    kind, value = dist.gather_objects(answer)[0]
    if kind == "error":
        raise CheckpointError(value)
    return Path(value)


def rollouts(run: Run, idx: list[int], gen: torch.Generator, gen_vt: torch.Generator,
             times: dict[str, float]) -> list[Window]:
    """On-policy completions of this rank's prompts `idx`, one `Window` per micro-batch, sampled from
    the current student on the student context, with image-skip injection (`rollout.py`); the
    teacher contexts (the VTs of `teacher.vt_mode`, noise drawn from `gen_vt`), and the completions
    cut once to the room both contexts leave (`fit_rollout`: both sides score the same ids)."""
    cfg, backend = run.cfg, run.backend
    backend.model.eval()
    run.engine.layout.gather()  # sharded: the weights once, so decoding issues no collectives
    windows = []
    for m in range(cfg.optim.grad_accum):
        samples = [run.train[i] for i in idx[m * run.micro : (m + 1) * run.micro]]
        contexts = [backend.build_context(s, "student") for s in samples]
        with timed(times, "rollout"):
            ro = collect_rollout(
                backend, samples, contexts, n=cfg.rollout.n, max_new_tokens=cfg.rollout.max_new_tokens,
                temperature=cfg.rollout.temperature, max_image_skips=cfg.rollout.max_image_skips,
                source=cfg.rollout.source, generator=gen, engine=run.rollout_engine,
            )
        with timed(times, "teacher"):
            t_ctx = teacher_contexts(backend, samples, run.train, cfg.teacher.vt_mode, gen_vt)
        windows.append(Window(samples, contexts, t_ctx, ro, fit_rollout(backend, ro, contexts, t_ctx)))
    if run.rollout_engine is not None:
        run.rollout_engine.sleep()  # training next: vLLM releases its memory where it can (docs/scale.md)
    return windows


def loss_denominator(run: Run, windows: list[Window]) -> tuple[torch.Tensor, int, int]:
    """(the loss's normaliser, the step's completion tokens, this rank's), the first two over all
    micro-batches and ranks (all-reduces): the normaliser counts the step's completions for
    `sequence_mean`, its tokens for `token_mean`."""
    length = max(max((len(i) for i in w.scored.ids), default=0) for w in windows)
    masks = [w.scored.loss_mask(length).to(run.dist.device) for w in windows]  # the process group's device
    token_count = global_token_count(masks)
    normalizer = (token_count.clamp(min=1) if run.cfg.loss.reduction == "token_mean"
                  else loss_normalizer(masks, run.cfg.loss.reduction))
    return normalizer.to(run.device), int(token_count), int(sum(int(m.sum()) for m in masks))


def distill_backward(run: Run, windows: list[Window], normalizer: torch.Tensor, times: dict[str, float]) -> float:
    """Per micro-batch: the JSD loss on the sampled tokens of the fitted completions (`distill_loss`),
    backward; gradients summed over ranks at the last one. Returns the step's loss, summed over
    micro-batches and ranks."""
    run.backend.model.train()  # gradient checkpointing is gated on train mode (dropout is off: open_run)
    run.engine.zero_grad()
    total = 0.0
    for m, w in enumerate(windows):
        with run.dist.autocast():
            loss = distill_loss(run.backend, run.teacher, w.contexts, w.teacher_contexts, w.scored, run.cfg.loss,
                                normalizer, times)
        with timed(times, "update"):
            run.engine.backward(loss, last=m == len(windows) - 1)  # the last one reduces over ranks
        total += loss.item()
    return run.dist.sum(total)


def update(run: Run, loss: float, times: dict[str, float]) -> tuple[float, bool]:
    """The optimizer step and, when it was applied, the teacher update: (gradient norm, applied).
    A step whose loss or gradient is not finite leaves weights and teacher as they were."""
    with timed(times, "update"):
        grad_norm, finite = run.engine.step(loss_finite=math.isfinite(loss))
        if finite:
            run.teacher.update()
            if run.rollout_engine is not None:
                run.rollout_engine.weights_changed()  # the next rollouts sample from the new weights
            run.state.bad_steps = 0
        else:
            run.state.bad_steps += 1
    return grad_norm, finite


def step_record(run: Run, done: int, windows: list[Window], loss: float, grad_norm: float, tokens: int,
                local_tokens: int, times: dict[str, float]) -> dict[str, Any]:
    """The step's row of metrics.jsonl: loss, lr, gradient norm, tokens, rollout statistics (means
    over ranks), memory of the fullest rank, time per phase."""
    record: dict[str, Any] = {"step": done, "lr": lr_at(done - 1, run.cfg.optim), "loss": loss,
                              "grad_norm": float(grad_norm), "tokens": tokens}
    if run.dist.world > 1:
        record["tokens/per_rank"] = run.dist.gather_int(local_tokens)
    stats: dict[str, float] = {}
    for w in windows:
        # tokens per completion cut to fit the teacher context (`fit_rollout`; HF max_length)
        cut = sum(len(a) - len(b) for a, b in zip(w.rollout.ids, w.scored.ids, strict=True))
        for k, v in {**w.rollout.stats(run.task), "rollout/cut_tokens": cut / max(1, len(w.rollout.ids))}.items():
            stats[k] = stats.get(k, 0.0) + v / len(windows)
    record.update(run.dist.mean_dict(stats))  # equal shards: the mean of rank means is the global mean
    record.update(run.dist.max_dict(memory_gib(run.device)))  # the fullest rank, after the step
    record.update({f"time/{k}": v for k, v in times.items()})
    return record


def skip_step(run: Run, done: int, record: dict[str, Any], ids: list[str], loss: float, grad_norm: float) -> None:
    """Log a step skipped for a non-finite loss or gradient (the weights are still those of the last
    good step, so the run goes on and saves as usual); abort after `optim.max_bad_steps` in a row,
    leaving the last good checkpoint as it was."""
    bad, limit = run.state.bad_steps, run.cfg.optim.max_bad_steps
    record.update(skipped="non-finite loss or gradient", samples=ids, bad_steps=bad)
    message = (f"step {done}: non-finite loss {loss} or grad norm {float(grad_norm)}; step skipped "
               f"(samples {ids[:16]}); {bad} consecutive of at most {limit}")
    if run.dist.is_main:
        logger.warning(message)
    if bad >= limit:
        run.log.write(record)
        last = run.out / "last"
        kept = (f"the last good checkpoint is {last} (step {_checkpoint_step(last)})"
                if (last / "trainer_state.json").is_file() else "no checkpoint was written yet")
        raise TrainingAborted(
            f"{message}. Aborting after {bad} consecutive non-finite steps (optim.max_bad_steps={limit}); "
            f"{kept}. Lower optim.lr or check those samples."
        )


def save_last(run: Run) -> None:
    """`last/`: weights, optimizer, teacher and state, for an exact resume (every rank takes part).
    FSDP2 and DeepSpeed ZeRO: every rank writes its own shards (`sharded_checkpoint.py`), nothing is
    gathered; else (one process, data parallel) whole tensors, written by rank 0."""
    if run.engine.sharded_checkpoints:
        backend = dataclasses.asdict(run.cfg.backend) if run.cfg.backend is not None else None
        sharded_checkpoint.save(run.out / "last", run.engine, run.teacher, run.dist,
                                check_model_folder("init_from", run.cfg.init_from), backend,
                                dataclasses.asdict(run.state))
        run.dist.barrier()  # no rank runs ahead of the checkpoint being published
        return
    with run.engine.whole_weights() as weights:
        whole = run.engine.train_state(run.teacher, run.dist.is_main)
        if whole is not None:
            save_train_state(run.out / "last", run.backend, weights, whole, dataclasses.asdict(run.state))
    run.dist.barrier()  # no rank runs ahead of a checkpoint being written


def validate(run: Run, step: int) -> dict[str, float]:
    """Greedy text-only accuracy of the student on the validation split (never test), sharded over
    ranks; one text round (`eval.image_skips` 0), as the final evaluation: `val/accuracy`, and
    `val/accuracy/<task>` when the split mixes tasks (each sample scored by its own). A new best is
    kept in `best/` (every rank takes part; rank 0 writes)."""
    cfg, dist = run.cfg, run.dist
    run.engine.layout.gather()  # sharded: gathered before decoding (ranks decode different lengths)
    mine = run.val[dist.rank :: dist.world]
    preds = predict(run.backend, mine, "text", cfg.eval.max_new_tokens, batch_size=cfg.eval.batch_size,
                    seed=cfg.seed, image_skips=cfg.eval.image_skips)
    hits: dict[str, int] = {}  # right answers per task on this rank, summed over ranks below
    for s, p in zip(mine, preds, strict=True):
        task = scorer_of(s, run.task)
        hits[task.name] = hits.get(task.name, 0) + bool(task.is_correct(s, p))
    counts = collections.Counter(scorer_of(s, run.task).name for s in run.val)
    right = {name: dist.sum(hits.get(name, 0)) for name in sorted(counts)}  # every rank, every task: collective
    acc = sum(right.values()) / max(1, len(run.val))
    out = {"val/accuracy": acc}
    if len(counts) > 1:
        out.update({f"val/accuracy/{name}": right[name] / counts[name] for name in counts})
    if dist.is_main:  # above the progress bar, or a plain line in a batch job's log
        tqdm.write(f"step {step}: val accuracy {acc:.3f}" + "".join(f", {k[13:]} {v:.3f}" for k, v in out.items()
                                                                   if k != "val/accuracy"))
    if acc > run.state.best:
        run.state.best, run.state.best_step = acc, step
        with run.engine.whole_weights() as whole:  # every rank (a collective when sharded)
            if dist.is_main:
                with atomic_dir(run.out / "best", manifest=True) as tmp:
                    run.backend.save(tmp / "model", state=whole)
                    (tmp / "trainer_state.json").write_text(json.dumps({"step": step, "val/accuracy": acc}))
    return out


def _checkpoint_step(path: Path) -> int | None:
    try:
        return int(json.loads((path / "trainer_state.json").read_text())["step"])
    except (OSError, ValueError, KeyError):
        return None


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


def load_train_state(path: Path, engine: Engine, teacher: Teacher) -> dict[str, Any]:
    """The optimizer and teacher state and the trainer state of checkpoint `path` (already verified
    against its manifest); anything unreadable is a `CheckpointError` naming the file. A sharded
    checkpoint's state goes in place into this run's layout (`sharded_checkpoint.load_state`)."""
    if sharded_checkpoint.is_sharded(path):
        return sharded_checkpoint.load_state(path, engine, teacher)
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
