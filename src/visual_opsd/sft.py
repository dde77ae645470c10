"""Supervised fine-tuning of the built-in mini unified model: the ThinkMorph-style teacher and the
text-only SFT baseline, from one command.

    visual-opsd sft --config configs/sft_demo.yaml        # interleaved teacher
    visual-opsd sft --config configs/sft_text_demo.yaml   # text-only baseline (data.trace=text_only)

Per step:
1. draw `batch_size` training samples; each becomes one example (`MiniBackend.training_row`):
   - data.trace=interleaved: the interleaved trace (student context + thoughts with the VT inside);
     cross-entropy on the trace text, rectified-flow loss on the VT patches. A fraction
     `data.teacher_context_fraction` of the examples instead put the ground-truth VT in the
     privileged *teacher context* (framing + VT + transition) followed by the text-only completion,
     so the teacher is also sharp where Visual-OPSD queries it;
     A fraction `data.text_only_fraction` are text-only examples (student context + text-only
     completion), so the model has a working text-only mode; the interleaved examples carry the
     model's interleaved-mode instruction, which asks for a drawn VT (docs/miniature.md);
   - data.trace=text_only: student context + text-only completion (cross-entropy only);
   - data.trace=vt_caption: pretraining (the BAGEL analogue): the VT image alone, then the
     text-only trace, i.e. describe the map and the path drawn on it;
   Each VT enters as `optim.flow_copies` noised copies (own t and noise each; more flow signal
   per forward) before its clean copy, see `MiniBackend.training_row`;
2. loss = CE (mean over completion text tokens) + flow_weight * flow MSE (weighted mean over VT
   patches; patches that differ from the problem image weigh `optim.flow_edit_weight`);
3. AdamW step with gradient clipping; lr = linear warm-up then cosine to lr * min_lr_ratio.
Every `eval.every` steps (and at the end) accuracy on the validation split with the task's scorer,
atomic checkpoints `last/` and `best/` (best = highest validation accuracy of the first eval mode).
The final model goes to `<out_dir>/final/`; `metrics.jsonl` gets one line per step.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm import tqdm

from visual_opsd.backends import BackendOptions, family_of, open_backend
from visual_opsd.backends.base import Backend, SupportsSFT
from visual_opsd.backends.hf_config import HFOptions
from visual_opsd.backends.mini import (
    CAPTION_PROMPT,
    DEFAULT_FRAMING,
    DEFAULT_INTERLEAVED_PROMPT,
    DEFAULT_TRANSITION,
    MiniBackend,
)
from visual_opsd.checkpoint import atomic_dir
from visual_opsd.config import check_choice
from visual_opsd.errors import ConfigError, DataError
from visual_opsd.hub import resolve_folder
from visual_opsd.optim import MetricsLog, adamw, lr_at, set_lr
from visual_opsd.sample import Sample
from visual_opsd.tasks import TASKS, Task, get_task
from visual_opsd.tasks.base import accuracy_by_task, scorer_of
from visual_opsd.tokenizer import build_tokenizer_for_tasks
from visual_opsd.tracking import (
    Tracker,
    check_logging,
    check_trackers,
    logging_steps_field,
    open_reporter,
    report_to_field,
)

EvalMode = Literal["interleaved", "given_vt", "teacher_context", "text", "vt_caption"]


@dataclass
class TaskDataConfig:
    """Where training and validation samples come from (SFT and Visual-OPSD alike)."""

    task: str = field(default="maze", metadata={"help": "task to train on (maze, jigsaw)"})
    path: str | None = field(
        default=None, metadata={"help": "training dataset or Hub dataset id org/name[@rev]; null: generated data"})
    val_path: str | None = field(
        default=None, metadata={"help": "validation dataset (or Hub dataset id); null = generate data.n_val"})
    n_train: int = field(default=4000, metadata={"help": "generated training samples (data.path null)"})
    n_val: int = field(default=64, metadata={"help": "validation samples (accuracy during training, selection)"})
    sizes: tuple[int, int] = field(default=(3, 6), metadata={"help": "maze sizes lo..hi (maze only)"})
    options: dict[str, Any] = field(default_factory=dict, metadata={"help": "extra task generator options"})
    seed: int = field(default=0, metadata={"help": "seed of the generated data"})
    skip_invalid: bool = field(
        default=False, metadata={"help": "skip invalid dataset rows (counted, listed in a warning) instead of stopping"}
    )
    allow_outside: bool = field(
        default=False, metadata={"help": "allow image paths leaving the dataset folder (.., absolute, links)"}
    )

    def __post_init__(self) -> None:
        check_choice("data.task", self.task, TASKS)  # a typo fails with the config, before any work
        if self.n_train < 1 or self.n_val < 0:
            raise ValueError("data.n_train must be >= 1 and data.n_val >= 0")
        if not 2 <= self.sizes[0] <= self.sizes[1]:
            raise ValueError(f"data.sizes must be lo <= hi with lo >= 2, got {self.sizes}")


@dataclass
class DataConfig(TaskDataConfig):
    trace: Literal["interleaved", "text_only", "vt_caption"] = field(
        default="interleaved",
        metadata={"help": "interleaved = teacher with VTs; text_only = baseline; vt_caption = pretraining "
                          "(describe a drawn path from the VT image alone)"},
    )
    teacher_context_fraction: float = field(
        default=0.25,
        metadata={"help": "interleaved only: share of examples with the GT VT in the teacher context"},
    )
    text_only_fraction: float = field(
        default=0.0,
        metadata={"help": "interleaved only: share of examples that are the plain text-only trace (text mode)"},
    )
    vt_options: dict[str, Any] | None = field(
        default=None,
        metadata={"help": "interleaved only: task generator options of the examples that carry a VT (interleaved, "
                          "teacher context), on the same maps; null = data.options (docs/miniature.md)"},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("teacher_context_fraction", "text_only_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"data.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.teacher_context_fraction + self.text_only_fraction > 1.0:
            raise ValueError("data.teacher_context_fraction + data.text_only_fraction must be <= 1")
        if self.vt_options is not None and (self.trace != "interleaved" or self.path is not None):
            raise ValueError("data.vt_options applies to generated data with data.trace=interleaved only")


@dataclass
class ModelConfig:
    init_from: str | None = field(
        default=None, metadata={"help": "start from this saved model folder, or a Hub id org/name[@revision]"})
    d_model: int = field(default=128, metadata={"help": "width"})
    n_layers: int = field(default=4, metadata={"help": "transformer layers"})
    n_heads: int = field(default=4, metadata={"help": "attention heads"})
    mlp_ratio: float = field(default=4.0, metadata={"help": "MLP width / d_model"})
    patch_size: int = field(default=8, metadata={"help": "pixels per patch side (= maze cell_px)"})
    max_grid: int = field(default=8, metadata={"help": "most patches per image side"})
    gen_expert: bool = field(default=True, metadata={"help": "separate norms/MLPs for generation tokens"})
    rope_2d_pairs: int | None = field(
        default=None, metadata={"help": "rotary pairs per head turned by patch row (and column); null: head_dim / 8"}
    )
    location_tokens: bool = field(
        default=True, metadata={"help": "place `( r , c )` tokens at their grid cell (2-D rotary + row/col embedding)"}
    )
    tokenizer_tasks: list[str] = field(
        default_factory=lambda: ["maze", "jigsaw"], metadata={"help": "tasks whose words make the vocabulary"}
    )
    framing_text: str = field(default=DEFAULT_FRAMING, metadata={"help": "teacher text before the VTs"})
    transition_text: str = field(default=DEFAULT_TRANSITION, metadata={"help": "teacher text after the VTs"})
    interleaved_prompt: str = field(
        default=DEFAULT_INTERLEAVED_PROMPT,
        metadata={"help": "instruction after the question that asks for interleaved (drawn-VT) reasoning"},
    )
    backend: BackendOptions | None = field(  # init_from's family; or kind hf with `tiny` for a tiny random HF model
        default=None, metadata={"help": "how to open init_from (kind mini, hf or bagel, and its options)"}
    )

    def __post_init__(self) -> None:
        for name in ("d_model", "n_layers", "n_heads", "patch_size", "max_grid"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.d_model % self.n_heads:
            raise ValueError(f"model.d_model ({self.d_model}) must be divisible by model.n_heads ({self.n_heads})")


@dataclass
class OptimConfig:
    steps: int = field(default=600, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=32, metadata={"help": "examples per step"})
    lr: float = field(default=2e-3, metadata={"help": "peak learning rate"})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "cosine floor as a fraction of lr"})
    warmup_steps: int = field(default=30, metadata={"help": "linear warm-up steps"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay (matrices only)"})
    betas: tuple[float, float] = field(default=(0.9, 0.95), metadata={"help": "AdamW betas"})
    grad_clip: float = field(default=1.0, metadata={"help": "max gradient norm (0 = off)"})
    flow_weight: float = field(default=1.0, metadata={"help": "weight of the flow-matching loss"})
    flow_copies: int = field(
        default=1, metadata={"help": "noised copies of each VT per example (own t and noise each)"}
    )
    flow_edit_weight: float = field(
        default=1.0,
        metadata={
            "help": "flow-loss weight of VT patches that differ from the problem image (5 over-drew at demo scale)"
        },
    )

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.flow_copies < 1:
            raise ValueError("optim.steps, optim.batch_size and optim.flow_copies must be >= 1")
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError("optim.lr must be > 0 and optim.min_lr_ratio in [0, 1]")
        if self.warmup_steps < 0 or self.grad_clip < 0 or self.flow_weight < 0 or self.flow_edit_weight < 0:
            raise ValueError("optim.warmup_steps, grad_clip, flow_weight and flow_edit_weight must be >= 0")


@dataclass
class EvalConfig:
    every: int = field(default=200, metadata={"help": "validate and checkpoint every N steps (and at the end)"})
    modes: list[EvalMode] | None = field(
        default=None,
        metadata={"help": "accuracies to log; the first selects best/. null: interleaved or text by data.trace"},
    )
    vt_steps: int = field(default=50, metadata={"help": "denoising steps of VTs generated during validation"})
    max_new_tokens: int = field(default=320, metadata={"help": "token budget of validation answers"})
    batch_size: int = field(default=64, metadata={"help": "rows per batch of validation decoding"})
    image_skips: int = field(
        default=0, metadata={"help": "text modes: image skips per answer (0: one text round, as the reference)"}
    )

    def __post_init__(self) -> None:
        if self.every < 1 or self.vt_steps < 1 or self.max_new_tokens < 1 or self.batch_size < 1:
            raise ValueError("eval.every, eval.vt_steps, eval.max_new_tokens and eval.batch_size must be >= 1")
        if self.image_skips < 0:
            raise ValueError(f"eval.image_skips must be >= 0, got {self.image_skips}")


@dataclass
class SFTConfig:
    out_dir: str = field(default="runs/sft", metadata={"help": "output folder (checkpoints, metrics.jsonl)"})
    seed: int = field(default=0, metadata={"help": "seed of initialisation, batches and noise"})
    threads: int = field(default=2, metadata={"help": "torch CPU threads"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})
    report_to: list[Tracker] = report_to_field()
    logging_steps: int = logging_steps_field()
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        if self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        check_logging(self.report_to, self.logging_steps)


def load_samples(cfg: TaskDataConfig, task: Task, split: str, patch_size: int) -> list[Sample]:
    """The train or val samples: from `path` / `val_path` (a Hub dataset id `org/name[@rev]`: its
    snapshot in the Hugging Face cache), else generated (mazes with one patch per cell)."""
    path = cfg.path if split == "train" else cfg.val_path
    if path is not None:
        from visual_opsd.data import load_dataset

        key = "data.path" if split == "train" else "data.val_path"
        path = resolve_folder(path, "dataset", key)
        if not Path(path).exists():  # one located line, not a traceback
            raise DataError(f"no such file or folder ({key})", file=path)
        return list(load_dataset(path, skip_invalid=cfg.skip_invalid, allow_outside=cfg.allow_outside))
    options = dict(cfg.options)
    if task.name == "maze":
        options.setdefault("sizes", tuple(cfg.sizes))
        options.setdefault("cell_px", patch_size)
    n = cfg.n_train if split == "train" else cfg.n_val
    return task.generate(n, seed=cfg.seed, split=split, **options)


def load_train_val(cfg: TaskDataConfig, task: Task, patch_size: int) -> tuple[list[Sample], list[Sample]]:
    """The training and validation samples. A training dataset (`path`) without a `val_path` gives
    `n_val` of its own samples to validation, spread evenly over the tasks it mixes
    (`split_by_task`): validation then follows the data (e.g. ThinkMorph's four tasks) rather than
    a generator of one task. Every sample must have a task that can score it (its own, or `task`):
    an unknown one is a DataError naming the sample, before the run writes anything."""
    train = load_samples(cfg, task, "train", patch_size)
    if cfg.path is not None and cfg.val_path is None:
        train, val = split_by_task(train, cfg.n_val, cfg.seed, source=cfg.path)
    else:
        val = load_samples(cfg, task, "val", patch_size)
    for split, samples, where in (("train", train, cfg.path), ("val", val, cfg.val_path or cfg.path)):
        for s in samples:
            try:
                scorer_of(s, task)
            except DataError as e:
                raise DataError(f"{e.reason} ({split} split)", file=where, row=e.row, field=e.field) from None
    return train, val


def split_by_task(samples: list[Sample], n_val: int, seed: int, source: str = "") -> tuple[list[Sample], list[Sample]]:
    """(train, val): `n_val` samples drawn at random (seeded), taken from each task in turn so that
    every task of the mix is validated on; both keep the dataset's order."""
    if n_val <= 0:
        return samples, []
    if n_val >= len(samples):
        raise DataError(f"data.n_val={n_val} would leave no training samples of the {len(samples)} there are; "
                        "lower data.n_val or give data.val_path", file=source or None)
    rng = random.Random(seed)
    by_task: dict[str, list[int]] = {}
    for i, s in enumerate(samples):
        by_task.setdefault(s.task, []).append(i)
    queues = [rng.sample(idx, len(idx)) for _, idx in sorted(by_task.items())]
    picked: set[int] = set()
    while len(picked) < n_val:
        for q in queues:
            if q and len(picked) < n_val:
                picked.add(q.pop())
    return [s for i, s in enumerate(samples) if i not in picked], [samples[i] for i in sorted(picked)]


def check_model_folder(key: str, path: str | Path) -> Path:
    """The model folder of config key `key` (a Hub id `org/name[@rev]`: its snapshot in the Hugging
    Face cache); a ConfigError naming `key` unless it is a folder of a registered family: checked
    before a command writes anything."""
    folder = resolve_folder(path, "model", key)
    try:
        family_of(folder)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{key}: {e}") from None
    return folder


def open_model(key: str, path: str | Path, options: Any = None, resume: bool = False) -> Backend:
    """`open_backend` on the folder of config key `key`; a missing folder or weights file is a
    ConfigError naming the key (one line from the command line, exit 2)."""
    folder = check_model_folder(key, path)
    try:
        return open_backend(folder, options, resume=resume)
    except FileNotFoundError as e:
        raise ConfigError(f"{key}: {e}") from None


def build_backend(cfg: SFTConfig) -> MiniBackend:
    if cfg.model.init_from is not None:  # a mini checkpoint or a Hugging Face folder
        return open_model("model.init_from", cfg.model.init_from, cfg.model.backend)
    options = cfg.model.backend
    if isinstance(options, HFOptions) and options.tiny is not None:
        from visual_opsd.backends.hf import HFBackend

        return HFBackend.tiny(options.tiny, options, seed=cfg.seed)  # sizes: backend.tiny_hidden, tiny_layers
    m = cfg.model
    texts = [m.framing_text, m.transition_text, m.interleaved_prompt, CAPTION_PROMPT]
    tokenizer = build_tokenizer_for_tasks(m.tokenizer_tasks, extra_texts=texts)
    return MiniBackend.new(
        tokenizer,
        seed=cfg.seed,
        d_model=m.d_model,
        n_layers=m.n_layers,
        n_heads=m.n_heads,
        mlp_ratio=m.mlp_ratio,
        patch_size=m.patch_size,
        max_grid=m.max_grid,
        gen_expert=m.gen_expert,
        rope_2d_pairs=m.rope_2d_pairs,
        location_tokens=m.location_tokens,
        framing_text=m.framing_text,
        transition_text=m.transition_text,
        interleaved_prompt=m.interleaved_prompt,
    )


def predict(
    backend: MiniBackend,
    samples: list[Sample],
    mode: EvalMode,
    max_new_tokens: int = 320,
    vt_steps: int = 50,
    batch_size: int = 64,
    seed: int = 0,
    *,
    image_skips: int = 0,
) -> list[str]:
    """Greedy predictions of `samples` (in their order) under one evaluation mode:
    interleaved: the model generates its own VTs (`vt_steps` denoising steps);
    given_vt: interleaved, but each `<image_start>` gets the sample's ground-truth VT;
    teacher_context: text-only decoding after the privileged teacher context (GT VTs);
    text: text-only decoding after the student context;
    vt_caption: (the mini model's pretraining task) describe the sample's VT image shown alone.

    The text-only modes decode one text round by default, as the reference's inferencer does: an
    emitted `<image_start>` ends the answer there (kept in the text, which is scored as it is).
    `image_skips` > 0 instead injects `<image_end>` and goes on, that many times per answer.
    Samples are decoded `batch_size` at a time (left-padded), grouped by size (`batches`)."""
    if image_skips < 0:
        raise ValueError(f"predict: image_skips must be >= 0, got {image_skips}")
    backend.model.eval()
    gen = torch.Generator().manual_seed(seed)
    role = "teacher" if mode == "teacher_context" else "student"
    texts: list[str] = [""] * len(samples)
    for idx in batches(samples, batch_size):
        chunk = [samples[i] for i in idx]
        if mode == "vt_caption":
            contexts = [backend.caption_context(s) for s in chunk]
        else:
            contexts = [backend.build_context(s, role=role) for s in chunk]
        if mode in ("interleaved", "given_vt"):
            outs = backend.generate_interleaved(
                contexts,
                max_new_tokens=max_new_tokens,
                temperature=0.0,
                vt_steps=vt_steps,
                max_images=max(1, max(len(s.vt_images) for s in chunk)),
                given_vts=[s.vt_images for s in chunk] if mode == "given_vt" else None,
                generator=gen,
            )
        else:
            outs = backend.sample(contexts, max_new_tokens=max_new_tokens, temperature=0.0, max_image_skips=image_skips)
        for i, o in zip(idx, outs, strict=True):
            texts[i] = o.text
    return texts


def batches(samples: list[Sample], batch_size: int) -> list[list[int]]:
    """Indices of `samples` in decoding batches of at most `batch_size`: ordered by VT count, image
    area and question length, so that a batch's rows have similar context lengths (little compute
    spent on padding; maze sizes differ 4x in patch count), and never mixing VT counts, so that
    interleaved decoding allows every row exactly as many VTs as it would get alone."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")

    def key(i: int) -> tuple[int, int, int]:
        s = samples[i]
        return len(s.vt_images), sum(im.width * im.height for im in s.problem_images), len(s.question)

    out: list[list[int]] = []
    for i in sorted(range(len(samples)), key=key):
        if out and len(out[-1]) < batch_size and len(samples[out[-1][0]].vt_images) == len(samples[i].vt_images):
            out[-1].append(i)
        else:
            out.append([i])
    return out


def accuracy(task: Task, samples: list[Sample], predictions: list[str]) -> float:
    """The fraction right, each sample scored by its own task (`task` where it has none)."""
    return accuracy_by_task(samples, predictions, task)[""]


def run_sft(cfg: SFTConfig) -> Path:
    """Train; returns the folder of the final model (`<out_dir>/final`)."""
    torch.set_num_threads(cfg.threads)
    out = Path(cfg.out_dir)  # created once the model and the data passed their checks
    check_trackers(cfg.report_to)  # a tracker's missing package fails before the model is even loaded
    task = get_task(cfg.data.task)
    backend = build_backend(cfg)
    if not isinstance(backend, SupportsSFT):
        raise ConfigError(f"sft: the {type(backend).__name__} backend has no SFT examples (training_row / "
                          "sft_losses); fine-tune it with its own tools and start `train` from the result")
    patch = backend.cell_px
    train, val = load_train_val(cfg.data, task, patch)
    vt_train = _vt_variants(cfg.data, task, patch, train)
    if cfg.data.trace in ("interleaved", "vt_caption") and not any(s.vt_images for s in train):
        raise ValueError(f"data.trace={cfg.data.trace} but no training sample has VT images")
    default_mode = {"interleaved": "interleaved", "text_only": "text", "vt_caption": "vt_caption"}
    modes = cfg.eval.modes or [default_mode[cfg.data.trace]]
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(_plain(cfg), indent=2))
    model = backend.model
    opt = adamw(model.parameters(), cfg.optim, decay_matrices_only=True)
    gen = torch.Generator().manual_seed(cfg.seed)
    buckets = _buckets(train)
    weights = torch.tensor([len(b) for b in buckets], dtype=torch.float)
    best, t0 = -1.0, time.perf_counter()
    metrics = open_reporter(cfg, out, MetricsLog(out / "metrics.jsonl", resume_step=None), cfg.optim.steps,
                            keys=("loss/ce", "loss/flow"))
    n_params = sum(p.numel() for p in model.parameters())
    bar = tqdm(range(cfg.optim.steps), desc=f"sft {cfg.data.trace} ({n_params / 1e6:.2f}M params)",
               disable=not cfg.progress, dynamic_ncols=True)
    try:
        for step in bar:
            lr = lr_at(step, cfg.optim)
            set_lr(opt, lr)
            idx = _draw_batch(buckets, weights, cfg.optim.batch_size, gen)
            stats = _sft_step(backend, opt, [train[i] for i in idx], [vt_train[i] for i in idx], cfg, gen)
            record = {"step": step + 1, "lr": lr, **stats, "time/elapsed_s": time.perf_counter() - t0}
            if val and ((step + 1) % cfg.eval.every == 0 or step + 1 == cfg.optim.steps):
                record.update(_sft_validate(backend, task, val, modes, cfg))
                _checkpoint(backend, out / "last", record)
                if record[f"val/accuracy/{modes[0]}"] > best:
                    best = record[f"val/accuracy/{modes[0]}"]
                    _checkpoint(backend, out / "best", record)
                accs = {k[len("val/accuracy/"):]: v for k, v in record.items() if k.startswith("val/accuracy/")}
                bar.write(f"step {step + 1}: " + ", ".join(f"{m} acc {v:.3f}" for m, v in accs.items()))
            metrics.write(record)
            bar.set_postfix(loss=f"{stats['loss']:.3f}", ce=f"{stats['loss/ce']:.3f}", flow=f"{stats['loss/flow']:.3f}")
    finally:
        metrics.close()
    final = out / "final"
    with atomic_dir(final, manifest=True) as tmp:
        backend.save(tmp)
    print(f"sft: {cfg.optim.steps} steps in {time.perf_counter() - t0:.1f} s; final model in {final}")
    return final


def _vt_variants(cfg: DataConfig, task: Task, patch_size: int, train: list[Sample]) -> list[Sample]:
    """The training samples the examples with a VT are built from: `train` itself, or the same maps
    generated with `data.vt_options` (e.g. the text-only traces follow the canonical shortest path
    while the VTs the model learns to read show a random one; docs/miniature.md)."""
    if cfg.vt_options is None:
        return train
    variants = load_samples(replace(cfg, options={**cfg.options, **cfg.vt_options}), task, "train", patch_size)
    if [s.id for s in variants] != [s.id for s in train] or any(
            a.metadata.get("grid") != b.metadata.get("grid") for a, b in zip(variants, train, strict=True)):
        raise ValueError("data.vt_options changed which samples are generated; it may only change how a "
                         "sample is traced (e.g. the maze's path), not the maps")
    return variants


def _sft_step(backend, opt: torch.optim.Optimizer, samples: list[Sample], vt_samples: list[Sample],
              cfg: SFTConfig, gen: torch.Generator) -> dict[str, Any]:
    """One optimizer step on one batch: an example per sample (its kind drawn by the data mixture;
    the kinds with a VT from `vt_samples`, the same maps), loss = cross-entropy + flow_weight * flow
    MSE, clipped AdamW step; the step's metrics."""
    backend.model.train()
    examples = []
    for s, vt_s in zip(samples, vt_samples, strict=True):
        kind = _example_kind(cfg.data, s, gen)
        examples.append(backend.training_row(vt_s if kind in ("interleaved", "teacher_context") else s, kind, gen,
                                             cfg.optim.flow_copies, cfg.optim.flow_edit_weight))
    losses = backend.sft_losses(examples)
    ce = losses["ce_sum"] / losses["n_text"].clamp(min=1)
    flow = losses["flow_sum"] / losses["flow_weight"].clamp(min=1)
    loss = ce + cfg.optim.flow_weight * flow
    opt.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(backend.model.parameters(), cfg.optim.grad_clip or float("inf"))
    opt.step()
    return {"loss": loss.item(), "loss/ce": ce.item(), "loss/flow": flow.item(), "grad_norm": grad_norm.item(),
            "tokens/text": int(losses["n_text"]), "tokens/vt_patches": int(losses["n_patch"])}


def _sft_validate(backend, task: Task, val: list[Sample], modes: list[str], cfg: SFTConfig) -> dict[str, float]:
    """Validation accuracy in each evaluation mode, and the time it took."""
    t0, out = time.perf_counter(), {}
    for mode in modes:
        preds = predict(backend, val, mode, cfg.eval.max_new_tokens, cfg.eval.vt_steps, cfg.eval.batch_size,
                        cfg.seed, image_skips=cfg.eval.image_skips)
        for name, acc in accuracy_by_task(val, preds, task).items():  # and per task, when val mixes tasks
            out[f"val/accuracy/{mode}" + (f"/{name}" if name else "")] = acc
    out["time/eval_s"] = time.perf_counter() - t0
    return out


def _buckets(samples: list[Sample]) -> list[list[int]]:
    """Sample indices grouped by image sizes and VT count: a batch drawn from one group has rows of
    similar length, so little compute goes to padding (maze sizes differ 4x in patch count)."""
    groups: dict[tuple, list[int]] = {}
    for i, s in enumerate(samples):
        groups.setdefault((tuple(im.size for im in s.problem_images), len(s.vt_images)), []).append(i)
    return list(groups.values())


def _draw_batch(buckets: list[list[int]], weights: torch.Tensor, size: int, gen: torch.Generator) -> list[int]:
    """`size` random indices (with replacement) from one group, chosen in proportion to its size,
    so every sample is equally likely overall."""
    group = buckets[int(torch.multinomial(weights, 1, generator=gen))]
    return [group[i] for i in torch.randint(len(group), (size,), generator=gen).tolist()]


def _example_kind(cfg: DataConfig, sample: Sample, gen: torch.Generator) -> str:
    if cfg.trace == "text_only" or not sample.vt_images:
        return "text_only"
    if cfg.trace == "vt_caption":
        return "vt_caption"
    u = float(torch.rand((), generator=gen))
    if u < cfg.teacher_context_fraction:
        return "teacher_context"
    if u < cfg.teacher_context_fraction + cfg.text_only_fraction:
        return "text_only"
    return "interleaved"


def _checkpoint(backend: MiniBackend, path: Path, record: dict[str, Any]) -> None:
    with atomic_dir(path, manifest=True) as tmp:  # the checkpoint format of train.py
        backend.save(tmp)
        (tmp / "trainer_state.json").write_text(json.dumps(record, indent=2))


def _plain(cfg: Any) -> Any:
    from visual_opsd.config import to_dict

    return to_dict(cfg)
