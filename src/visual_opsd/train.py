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
4. update: score them on C_S with gradient; loss = generalized JSD (beta, top-k, clip) summed over
   the sampled completion tokens and divided by their count over the whole accumulation window;
   AdamW step, grad clip, lr warm-up + cosine; EMA teacher update;
5. every `eval.every` steps: greedy text-only accuracy of the student on the validation split
   (never test); `best/` keeps the validation best, `last/` the latest state.

Every random stream of step s is seeded from (seed, s), so a run resumed from the checkpoint of
step s replays steps s+1.. exactly as an uninterrupted run would.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from visual_opsd.backends.base import Backend, Context
from visual_opsd.backends.mini import MiniBackend
from visual_opsd.checkpoint import atomic_dir
from visual_opsd.config import to_dict
from visual_opsd.losses import fused_linear_generalized_jsd, generalized_jsd, global_token_count
from visual_opsd.rollout import Rollout, collect_rollout
from visual_opsd.sample import Sample
from visual_opsd.sft import TaskDataConfig, accuracy, load_samples, lr_at, predict
from visual_opsd.tasks import get_task
from visual_opsd.teacher import Teacher


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

    def __post_init__(self) -> None:
        if not 0.0 <= self.beta <= 1.0 or self.temperature <= 0:
            raise ValueError("loss.beta must be in [0, 1] and loss.temperature > 0")
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

    def __post_init__(self) -> None:
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

    def __post_init__(self) -> None:
        if self.every < 1 or self.max_new_tokens < 1 or self.batch_size < 1:
            raise ValueError("eval.every, eval.max_new_tokens and eval.batch_size must be >= 1")


@dataclass
class TrainConfig:
    init_from: str = field(default="runs/sft/final", metadata={"help": "model folder to start from (SFT teacher)"})
    out_dir: str = field(default="runs/opsd", metadata={"help": "output folder (checkpoints, metrics.jsonl)"})
    seed: int = field(default=0, metadata={"help": "seed of data order, sampling and noise"})
    threads: int = field(default=2, metadata={"help": "torch CPU threads"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})
    save_every: int = field(default=25, metadata={"help": "write last/ every N steps (and at the end)"})
    resume: str | None = field(default=None, metadata={"help": "resume from this checkpoint folder (last/)"})
    data: TaskDataConfig = field(default_factory=TaskDataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: TrainOptimConfig = field(default_factory=TrainOptimConfig)
    eval: TrainEvalConfig = field(default_factory=TrainEvalConfig)

    def __post_init__(self) -> None:
        if self.threads < 1 or self.save_every < 1:
            raise ValueError("threads and save_every must be >= 1")


@contextmanager
def timed(times: dict[str, float], name: str):
    """Add the block's wall time to times[name] (metrics `time/rollout`, `time/teacher`, `time/update`)."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        times[name] = times.get(name, 0.0) + time.perf_counter() - t0


def step_seed(seed: int, step: int, stream: int) -> torch.Generator:
    """The generator of one random stream of one step: a resumed run replays it exactly."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step * 101 + stream)


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
    """Teacher forward (no grad) + student forward on the same completion ids; the JSD summed over
    sampled tokens divided by `normalizer` (tokens in the whole accumulation window)."""
    output = "hidden" if cfg.fused else "logits"
    with timed(times, "teacher"), teacher.weights():
        t = backend.score(teacher_ctx, rollout.ids, output=output)
        # the head's storage is swapped back when the block ends: keep the teacher's own copy
        t_head = t.head_weight.detach().clone() if cfg.fused else None
    with timed(times, "update"):
        s = backend.score(student_ctx, rollout.ids, output=output)
        mask = s.mask & rollout.loss_mask(s.mask.shape[1])
        options = dict(beta=cfg.beta, temperature=cfg.temperature, top_k=cfg.top_k, clip=cfg.clip)
        if cfg.fused:
            return fused_linear_generalized_jsd(
                s.hidden[mask], t.hidden[mask], s.head_weight, teacher_weight=t_head,
                reduction="token_mean", normalizer=normalizer, **options,
            )
        return generalized_jsd(s.logits, t.logits, mask=mask, reduction="token_mean", normalizer=normalizer, **options)


def run_train(cfg: TrainConfig) -> Path:
    """Run Visual-OPSD; returns the folder of the selected (validation-best) model."""
    torch.set_num_threads(cfg.threads)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    resume = Path(cfg.resume) if cfg.resume else None
    backend = MiniBackend.load(resume / "model" if resume else cfg.init_from)
    model = backend.model
    task = get_task(cfg.data.task)
    patch = backend.cfg.patch_size
    train = load_samples(cfg.data, task, "train", patch)
    val = load_samples(cfg.data, task, "val", patch)
    teacher = Teacher(model, cfg.teacher.mode, cfg.teacher.ema_decay)
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=cfg.optim.lr, betas=cfg.optim.betas, weight_decay=cfg.optim.weight_decay,
    )
    state: dict[str, Any] = {"step": 0, "best": -1.0, "best_step": None}
    if resume:
        state = load_train_state(resume, opt, teacher)
    (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))

    metrics = open(out / "metrics.jsonl", "a" if resume else "w")
    micro = cfg.optim.prompts_per_step // cfg.optim.grad_accum
    bar = tqdm(range(state["step"], cfg.optim.steps), initial=state["step"], total=cfg.optim.steps,
               desc=f"opsd vt={cfg.teacher.vt_mode} teacher={cfg.teacher.mode}", disable=not cfg.progress,
               dynamic_ncols=True)
    if state["step"] == 0 and val:
        state.update(_validate(backend, task, val, cfg, out, step=0, best=state["best"], metrics=metrics))
    for step in bar:
        times: dict[str, float] = {}
        lr = lr_at(step, cfg.optim)
        for group in opt.param_groups:
            group["lr"] = lr
        idx = batch_indices(len(train), step, cfg.optim.prompts_per_step, cfg.seed)
        gen_sample, gen_vt = step_seed(cfg.seed, step, 0), step_seed(cfg.seed, step, 1)

        # 1-2: every rollout of the window first, so the token count is known before any backward
        model.eval()
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
        lengths = max(max((len(i) for i in ro.ids), default=0) for _, _, ro in windows)
        normalizer = global_token_count([ro.loss_mask(lengths) for _, _, ro in windows]).clamp(min=1)

        # 3-4: teacher and student scoring, backward per micro-batch
        model.train()
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for samples, s_ctx, ro in windows:
            with timed(times, "teacher"):
                t_ctx = teacher_contexts(backend, samples, train, cfg.teacher.vt_mode, gen_vt)
            loss = distill_loss(backend, teacher, s_ctx, t_ctx, ro, cfg.loss, normalizer, times)
            with timed(times, "update"):
                loss.backward()
            total += loss.item()
        with timed(times, "update"):
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip or float("inf"))
            if not math.isfinite(total) or not torch.isfinite(grad_norm):
                raise FloatingPointError(
                    f"step {step + 1}: non-finite loss {total} or grad norm {float(grad_norm)} "
                    f"(samples {[train[i].id for i in idx][:8]})"
                )
            opt.step()
            teacher.update()

        record: dict[str, Any] = {"step": step + 1, "lr": lr, "loss": total, "grad_norm": float(grad_norm),
                                  "tokens": int(normalizer)}
        for _, _, ro in windows:
            for k, v in ro.stats(task).items():
                record[k] = record.get(k, 0.0) + v / len(windows)
        record.update({f"time/{k}": v for k, v in times.items()})
        done = step + 1
        if val and (done % cfg.eval.every == 0 or done == cfg.optim.steps):
            state.update(_validate(backend, task, val, cfg, out, step=done, best=state["best"], record=record))
        state["step"] = done
        if done % cfg.save_every == 0 or done == cfg.optim.steps:
            save_train_state(out / "last", backend, opt, teacher, state)
        metrics.write(json.dumps(record) + "\n")
        metrics.flush()
        bar.set_postfix(loss=f"{total:.4f}", acc=f"{record.get('rollout/correct', 0):.2f}")
    metrics.close()
    selected = out / "best" / "model" if (out / "best").exists() else out / "last" / "model"
    print(f"train: done; selected model (validation best, step {state['best_step']}): {selected}")
    return selected


def _validate(backend, task, val, cfg: TrainConfig, out: Path, step: int, best: float, record=None, metrics=None):
    """Greedy text-only student accuracy on the validation split; writes best/ on improvement."""
    preds = predict(backend, val, "text", cfg.eval.max_new_tokens, batch_size=cfg.eval.batch_size, seed=cfg.seed)
    acc = accuracy(task, val, preds)
    if record is not None:
        record["val/accuracy"] = acc
    elif metrics is not None:
        metrics.write(json.dumps({"step": step, "val/accuracy": acc}) + "\n")
    result: dict[str, Any] = {}
    if acc > best:
        result = {"best": acc, "best_step": step}
        with atomic_dir(out / "best") as tmp:
            backend.save(tmp / "model")
            (tmp / "trainer_state.json").write_text(json.dumps({"step": step, "val/accuracy": acc}))
    return result


def save_train_state(path: Path, backend: Backend, opt: torch.optim.Optimizer, teacher: Teacher, state: dict) -> None:
    """Everything a resume needs, written atomically: weights, optimizer, teacher, step, best."""
    with atomic_dir(path) as tmp:
        backend.save(tmp / "model")
        torch.save(opt.state_dict(), tmp / "optimizer.pt")
        if teacher.shadow:
            save_file(teacher.state_dict(), str(tmp / "teacher.safetensors"))
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))


def load_train_state(path: Path, opt: torch.optim.Optimizer, teacher: Teacher) -> dict[str, Any]:
    state_file = path / "trainer_state.json"
    if not state_file.is_file():
        raise FileNotFoundError(f"{path}: not a training checkpoint (no trainer_state.json)")
    opt.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))  # no arbitrary unpickling
    if teacher.shadow:
        teacher.load_state_dict(load_file(str(path / "teacher.safetensors")))
    return json.loads(state_file.read_text())
