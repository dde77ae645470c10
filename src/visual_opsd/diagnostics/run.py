"""`visual-opsd diagnose <what>`: the config and the one function behind the command.

    visual-opsd diagnose interventions --model runs/sft_demo/final --config configs/diagnose_demo.yaml
    visual-opsd diagnose attention     --model runs/sft_demo/final data.n=16
    visual-opsd diagnose kl --model runs/sft_demo/final --post runs/opsd/best --post noise=runs/opsd_noise/best
    visual-opsd diagnose all --model runs/sft_demo/final --post runs/opsd/best

Samples come from `data.path` (any format `load_dataset` reads; the first `data.n` of each task) or
are generated (`data.tasks`, `data.n` each, split `data.split`; mazes with one patch per cell).
Each diagnostic writes `<what>.json`, `<what>.md` and `<what>.png` under `out_dir` (kl also
`kl_tokens.html`); the exit status is 1 when the KL sanity check fails. The KL diagnostic measures
every completion source of `kl.sources` in one run (default `[data, student]`: the data's traces,
identical tokens before and after, as the headline; the measured models' own samples beside it).

`report_fields` gives the study report's `interventions` and `kl` entries; the `kl` entry is
    {"headline": "closure",                       # which of the two entries below leads (kl.sources[0])
     "closure": {                                 # identical tokens: completions = the data's traces
         "completions": "data", "same_tokens": true,
         "teacher_side": "base",                  # base: the frozen SFT teacher with the data's VTs;
                                                  # self: each trained model with the VTs
         "k_pre": 2.12,                           # nats/token, base model on both sides
         "k_post": {"opsd": 0.89, ...},           # nats/token per trained model
         "per_model": {"opsd": 0.58, ...}},       # gap closure 1 - k_post / k_pre, a fraction
     "closure_student_samples": {                 # the same fields; completions = "student": K_pre on
         "completions": "student", ...}}          # the base model's samples, K_post on each model's own
Figures are pooled over tasks (`all`) when there are several; an entry whose source was not
measured is left out.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from visual_opsd.backends.base import Backend
from visual_opsd.config import check_choice, to_dict
from visual_opsd.diagnostics.attention import VT_KINDS, attention_fractions
from visual_opsd.diagnostics.common import load_backend, model_folder
from visual_opsd.diagnostics.interventions import INTERVENTION_MODES, interventions
from visual_opsd.diagnostics.kl import SOURCES, check_sources, kl_diagnostic, kl_sanity, sources_of
from visual_opsd.diagnostics.output import write_diagnostic
from visual_opsd.errors import ConfigError
from visual_opsd.sample import Sample

WHATS = ("interventions", "attention", "kl")


@dataclass
class DiagnoseDataConfig:
    path: str | None = field(default=None, metadata={"help": "dataset to diagnose on; null = generate (tasks, n)"})
    tasks: list[str] = field(default_factory=lambda: ["maze"], metadata={"help": "tasks to generate (path null)"})
    n: int | None = field(default=32, metadata={"help": "samples per task (null with a path: all)"})
    split: Literal["train", "val", "test"] = field(default="test", metadata={"help": "split to generate"})
    seed: int = field(default=3, metadata={"help": "seed of the generated samples"})
    sizes: tuple[int, int] = field(default=(3, 6), metadata={"help": "maze sizes lo..hi (maze only)"})
    options: dict[str, Any] = field(default_factory=dict, metadata={"help": "extra task generator options"})

    def __post_init__(self) -> None:
        if self.n is not None and self.n < 1:
            raise ValueError(f"data.n must be >= 1 or null, got {self.n}")
        if not self.tasks:
            raise ValueError("data.tasks must name at least one task")
        from visual_opsd.tasks import TASKS

        for name in self.tasks:  # a typo fails with the config, before the model is loaded
            check_choice("data.tasks", name, TASKS)


@dataclass
class InterventionsConfig:
    modes: list[Literal["interleaved", "text_only", "noise", "shuffled", "oracle"]] = field(
        default_factory=lambda: list(INTERVENTION_MODES), metadata={"help": "modes to evaluate"})
    vt_steps: int = field(default=50, metadata={"help": "denoising steps per generated VT (paper: 50)"})
    max_new_tokens: int = field(default=160, metadata={"help": "token budget of an answer"})
    max_images: int | None = field(default=None, metadata={"help": "VTs per answer; null = most VTs in the data"})
    batch_size: int = field(default=16, metadata={"help": "samples decoded together"})

    def __post_init__(self) -> None:
        if not self.modes or self.vt_steps < 1 or self.max_new_tokens < 1 or self.batch_size < 1:
            raise ValueError("interventions: modes non-empty; vt_steps, max_new_tokens, batch_size >= 1")
        if self.max_images is not None and self.max_images < 1:
            raise ValueError(f"interventions.max_images must be >= 1 or null, got {self.max_images}")


@dataclass
class AttentionConfig:
    vts: list[Literal["generated", "noise"]] = field(
        default_factory=lambda: list(VT_KINDS), metadata={"help": "VT kinds: the model's own, and noise"})
    n: int | None = field(default=None, metadata={"help": "use only the first n samples (null = all)"})
    vt_steps: int = field(default=50, metadata={"help": "denoising steps per generated VT"})
    max_new_tokens: int = field(default=160, metadata={"help": "token budget of a trace"})
    max_images: int = field(default=1, metadata={"help": "VTs per trace (later requests are image-skipped)"})
    batch_size: int = field(default=16, metadata={"help": "samples decoded together"})

    def __post_init__(self) -> None:
        if not self.vts or self.vt_steps < 1 or self.max_new_tokens < 1 or self.batch_size < 1 or self.max_images < 1:
            raise ValueError("attention: vts non-empty; vt_steps, max_new_tokens, max_images, batch_size >= 1")
        if self.n is not None and self.n < 1:
            raise ValueError(f"attention.n must be >= 1 or null, got {self.n}")


@dataclass
class KLConfig:
    sources: list[Literal["data", "student"]] = field(
        default_factory=lambda: list(SOURCES),
        metadata={"help": "completions, each measured, the first is the headline: data = the data's text-only "
                          "traces (identical tokens before and after), student = the measured model's samples"})
    vt_mode: Literal["data", "noise", "shuffled", "none"] = field(
        default="data", metadata={"help": "VTs in the teacher context C_T"})
    n_completions: int = field(default=1, metadata={"help": "student completions per sample"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature of student completions"})
    max_new_tokens: int = field(default=160, metadata={"help": "token budget of a completion"})
    max_image_skips: int = field(default=1, metadata={"help": "image-skip injections per completion"})
    batch_size: int = field(default=16, metadata={"help": "samples scored together"})
    sanity: bool = field(default=True, metadata={"help": "run the sanity checks (identical = 0, swapped = reverse)"})
    sanity_samples: int = field(default=8, metadata={"help": "samples the sanity checks use (the first ones)"})
    top_tokens: int = field(default=20, metadata={"help": "rows of the per-token attribution table"})
    show: int = field(default=8, metadata={"help": "completions in the highlighted-text view"})

    def __post_init__(self) -> None:
        if self.n_completions < 1 or self.max_new_tokens < 1 or self.batch_size < 1 or self.temperature <= 0:
            raise ValueError("kl: n_completions, max_new_tokens, batch_size >= 1 and temperature > 0")
        if self.max_image_skips < 0 or self.top_tokens < 0 or self.show < 0 or self.sanity_samples < 1:
            raise ValueError("kl: max_image_skips, top_tokens, show >= 0 and sanity_samples >= 1")
        check_sources(self.sources)  # non-empty, known, no repeats


@dataclass
class DiagnoseConfig:
    what: Literal["interventions", "attention", "kl", "all"] | None = field(
        default=None, metadata={"help": "the diagnostic (the command's positional argument)"})
    model: str | None = field(default=None, metadata={"help": "model folder diagnosed (the SFT teacher); --model"})
    post: list[str] = field(
        default_factory=list, metadata={"help": "kl: trained models [NAME=]DIR for K_post and gap closure; --post"})
    out_dir: str = field(default="runs/diagnose", metadata={"help": "output folder"})
    seed: int = field(default=0, metadata={"help": "seed of sampling, noise and shuffling"})
    threads: int = field(default=2, metadata={"help": "torch CPU threads"})
    progress: bool = field(default=True, metadata={"help": "show progress bars"})
    data: DiagnoseDataConfig = field(default_factory=DiagnoseDataConfig)
    interventions: InterventionsConfig = field(default_factory=InterventionsConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    kl: KLConfig = field(default_factory=KLConfig)

    def __post_init__(self) -> None:
        if self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")


def diagnose_samples(cfg: DiagnoseDataConfig, backend: Backend) -> list[Sample]:
    """The samples to diagnose on: the first `n` of each task of `path`, or `n` generated per task."""
    if cfg.path is not None:
        from visual_opsd.data import load_dataset
        from visual_opsd.hub import resolve_folder

        out, seen = [], {}
        for s in load_dataset(resolve_folder(cfg.path, "dataset", key="data.path")):
            seen[s.task] = seen.get(s.task, 0) + 1
            if cfg.n is None or seen[s.task] <= cfg.n:
                out.append(s)
        return out
    from visual_opsd.tasks import get_task

    patch = backend.cell_px
    samples = []
    for name in cfg.tasks:
        options = dict(cfg.options)
        if name == "maze":
            options.setdefault("sizes", tuple(cfg.sizes))
            options.setdefault("cell_px", patch)  # one patch (or image token) per maze cell
        samples += get_task(name).generate(cfg.n or 32, seed=cfg.seed, split=cfg.split, **options)
    return samples


def post_models(specs: list[str]) -> dict[str, str]:
    """`[NAME=]DIR` items as {name: dir}; a bare DIR is named after its run folder (the path without a
    trailing model/, best/, last/, final/), made unique with a suffix."""
    out: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            path = spec
            parts = [p for p in Path(spec).parts if p not in ("/", "")]
            while len(parts) > 1 and parts[-1] in ("model", "best", "last", "final"):
                parts.pop()
            name = parts[-1] if parts else "post"
        name = name.replace("/", "_").replace("=", "_")
        base, k = name, 2
        while name in out:
            name, k = f"{base}_{k}", k + 1
        out[name] = path
    return out


def run_diagnose(cfg: DiagnoseConfig) -> int:
    """The command: `diagnose(cfg)`; the exit status is 1 when the KL sanity check failed, else 0."""
    results = diagnose(cfg)
    if results.get("kl", {}).get("kl/sanity/passed", 1.0) != 1.0:
        print("diagnose kl: SANITY CHECK FAILED (see kl.md)", file=sys.stderr)
        return 1
    return 0


def diagnose(cfg: DiagnoseConfig) -> dict[str, dict[str, float]]:
    """Run `cfg.what` (or all three), write each one's outputs under `cfg.out_dir` and return
    {what: flat metrics}."""
    if cfg.what is None:
        raise ConfigError("say what to diagnose: visual-opsd diagnose {interventions,attention,kl,all} --model DIR")
    if cfg.model is None:
        raise ConfigError("no model: pass --model DIR (or model=DIR)")
    torch.set_num_threads(cfg.threads)
    backend = load_backend(cfg.model)
    samples = diagnose_samples(cfg.data, backend)
    whats = WHATS if cfg.what == "all" else (cfg.what,)
    out = Path(cfg.out_dir)
    counts = {t: sum(s.task == t for s in samples) for t in dict.fromkeys(s.task for s in samples)}
    base_meta = {"model": str(model_folder(cfg.model)), "samples": counts, "seed": cfg.seed,
                 "data": to_dict(cfg.data)}
    results: dict[str, dict[str, float]] = {}
    for what in whats:
        t0 = time.perf_counter()
        records: list[dict] = []
        meta = {**base_meta, what: to_dict(getattr(cfg, what))}
        if what == "interventions":
            c = cfg.interventions
            metrics = interventions(backend, samples, modes=c.modes, vt_steps=c.vt_steps,
                                    max_new_tokens=c.max_new_tokens, max_images=c.max_images,
                                    batch_size=c.batch_size, seed=cfg.seed, records=records, progress=cfg.progress)
        elif what == "attention":
            c = cfg.attention
            metrics = attention_fractions(backend, samples[: c.n], vts=c.vts, vt_steps=c.vt_steps,
                                          max_new_tokens=c.max_new_tokens, max_images=c.max_images,
                                          batch_size=c.batch_size, seed=cfg.seed, records=records,
                                          progress=cfg.progress)
        else:
            c = cfg.kl
            posts = post_models(cfg.post)
            meta["post"] = {name: str(model_folder(p)) for name, p in posts.items()}
            metrics = {}
            if c.sanity:  # on the headline source's completions
                t_sanity = time.perf_counter()
                metrics.update(kl_sanity(backend, samples[: c.sanity_samples], source=c.sources[0],
                                         vt_mode=c.vt_mode, max_new_tokens=c.max_new_tokens,
                                         batch_size=c.batch_size, seed=cfg.seed))
                metrics["time/kl/sanity_s"] = time.perf_counter() - t_sanity
            metrics.update(kl_diagnostic(
                backend, samples, post={name: load_backend(p) for name, p in posts.items()}, sources=c.sources,
                vt_mode=c.vt_mode, n_completions=c.n_completions, temperature=c.temperature,
                max_new_tokens=c.max_new_tokens, max_image_skips=c.max_image_skips, batch_size=c.batch_size,
                seed=cfg.seed, records=records, progress=cfg.progress))
        metrics[f"time/{what}/total_s"] = time.perf_counter() - t0
        paths = write_diagnostic(what, metrics, out, meta=meta, records=records, backend=backend,
                                 top_tokens=cfg.kl.top_tokens, show=cfg.kl.show)
        print(f"diagnose {what}: {metrics[f'time/{what}/total_s']:.1f} s; wrote "
              + ", ".join(str(p) for p in paths.values()))
        print(_summary_line(what, metrics))
        results[what] = metrics
    return results


# report.json's key for the gap closure of each completion source
CLOSURE_KEYS = {"data": "closure", "student": "closure_student_samples"}


def report_fields(results: dict[str, dict[str, float]], teacher_side: str = "base") -> dict[str, Any]:
    """The `interventions` and `kl` entries of the study's report.json (report.py) from `diagnose`'s
    results: pooled over tasks (`all`) when there are several, else the one task's numbers; the gap
    closures with the teacher side `teacher_side` ("base": the frozen base model, i.e. the SFT
    teacher, with the data's VTs; "self": each trained model with them). The `kl` shape is in the
    module docstring: `closure` = identical tokens (the data's traces), `closure_student_samples` =
    the models' own samples, `headline` = the key of the first measured source."""
    if teacher_side not in ("base", "self"):
        raise ValueError(f"teacher_side must be 'base' or 'self', got {teacher_side!r}")
    out: dict[str, Any] = {"interventions": {}, "kl": {}}
    inter = results.get("interventions", {})
    for mode in INTERVENTION_MODES:
        key = _pooled(inter, f"interventions/{{task}}/{mode}/accuracy")
        if key:
            out["interventions"][mode] = {"accuracy": inter[key], "ci95": [inter[key.replace("accuracy", "ci95_lo")],
                                                                          inter[key.replace("accuracy", "ci95_hi")]]}
    kl = results.get("kl", {})
    for source in sources_of(kl):
        head = f"kl/{source}"
        pre = _pooled(kl, f"{head}/pre/{{task}}/mean")
        if not pre:
            continue
        names = list(dict.fromkeys(k.split("/")[3] for k in kl if k.startswith(f"{head}/post/")))
        side = f"teacher={teacher_side}"
        out["kl"].setdefault("headline", CLOSURE_KEYS[source])
        out["kl"][CLOSURE_KEYS[source]] = {
            "completions": source,
            "same_tokens": kl.get(f"{head}/same_tokens") == 1.0,
            "teacher_side": teacher_side,
            "k_pre": kl[pre],
            "k_post": {n: kl[_pooled(kl, f"{head}/post/{n}/{side}/{{task}}/mean")] for n in names},
            "per_model": {n: kl[_pooled(kl, f"{head}/closure/{n}/{side}/{{task}}")] for n in names},
        }
    return out


def _pooled(metrics: dict[str, float], pattern: str) -> str | None:
    """The key of `pattern` for task `all` if present, else for the only task; None when absent."""
    head, tail = pattern.split("{task}")
    tasks = {k[len(head) : len(k) - len(tail)] for k in metrics if k.startswith(head) and k.endswith(tail)}
    tasks = {t for t in tasks if "/" not in t}
    if "all" in tasks:
        return head + "all" + tail
    return head + tasks.pop() + tail if len(tasks) == 1 else None


def _summary_line(what: str, metrics: dict[str, float]) -> str:
    """A few headline numbers for the terminal."""
    if what == "interventions":
        items = [(k.split("/")[1] + "/" + k.split("/")[2], v) for k, v in metrics.items() if k.endswith("/accuracy")]
        return "  " + "  ".join(f"{k} {v:.1f}%" for k, v in items)
    if what == "attention":
        items = [(k[len("attention/") : -len("/all_layers/mean")], v) for k, v in metrics.items()
                 if k.endswith("/all_layers/mean")]
        return "  " + "  ".join(f"{k} {100 * v:.2f}%" for k, v in items)
    items = [(k, v) for k, v in metrics.items() if k.startswith("kl/") and k.endswith("/mean")
             and k.split("/")[2] in ("pre", "post")]
    items += [(k, v) for k, v in metrics.items() if k.startswith("kl/") and k.split("/")[2:3] == ["closure"]]
    return "\n".join(f"  {k} = {v:.4f}" for k, v in items)
