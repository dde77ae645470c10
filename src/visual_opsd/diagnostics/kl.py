"""KL diagnostic: how much does a privileged VT change what the model predicts, and how much of that
gap does a trained student close?

Definition. For samples x with student context C_S (question + problem image) and teacher context
C_T = C_S + framing + VT images (`vt_mode`: data, or the noise / shuffled / none controls) +
transition, and a completion y = (y_1 .. y_n) of x:

    K(x, y) = 1 / |S(y)| * sum_{t in S(y)} KL( p_T(. | C_T, y_<t) || p_S(. | C_S, y_<t) )
    K       = mean over completions of K(x, y)                                   (nats / token)

with KL(p || q) = sum_v p(v) (log p(v) - log q(v)) over the full vocabulary (no top-k, no clip):
`losses.generalized_jsd(student, teacher, beta=0)`, which is exactly KL(teacher || student). The
*same* completion ids y are scored under both contexts (never decoded and re-tokenised), and
S(y) are its sampled positions (an image-skip `<image_end>` injected by the sampler is not scored;
the position that predicts end-of-sequence is). Completion sources (`sources`, each measured in
full, in order; the first is the headline):
- `data`: the sample's own text-only trace (`Sample.text_only_completion`), the same y for every
  model, so K_pre and K_post are measured on identical tokens: their ratio compares two models on
  one set of ids, and the gap closure is not confounded by what each model chose to write;
- `student`: y ~ p_S(. | C_S) sampled from the measured student weights (temperature 1, image
  skip at most once), `n_completions` per sample; on-policy, as Visual-OPSD trains, but K_pre
  (the base model's samples) and K_post (the trained model's) are then taken on different tokens.
The default is both, `data` first.

Which weights sit on each side:
- K_pre: teacher = student = the base model (the SFT teacher) W0: p_T = p_W0(. | C_T), p_S = p_W0(. | C_S).
- K_post for a trained model W1, with two teacher choices (both are reported):
    teacher=base: p_T = p_W0(. | C_T) (the frozen base with VTs), p_S = p_W1(. | C_S);
    teacher=self: p_T = p_W1(. | C_T) (the trained model with VTs), p_S = p_W1(. | C_S).
  With source=student the completions are sampled from W1 for K_post.
- Gap closure = 1 - K_post / K_pre, per task and pooled, K_pre and K_post of the same source.

Metric keys (flat; `<source>` = data | student, `<side>` = base | self):
    kl/<source>/order                                  0 for the headline source, then 1, ...
    kl/<source>/same_tokens                            1.0 if K_pre and every K_post scored identical ids
    kl/<source>/pre/<task>/{mean, std, ci95_lo, ci95_hi, n, tokens}
    kl/<source>/post/<name>/teacher=<side>/<task>/{...}
    kl/<source>/closure/<name>/teacher=<side>/<task>   a fraction
`run.report_fields` turns them into the study report's `kl` entry (its docstring has the shape).

Sanity mode (`kl_sanity`): with C_T := C_S the per-token KL must be exactly 0; with the contexts
swapped (teacher side C_S, student side C_T) it must equal the reverse KL(p(. | C_S) || p(. | C_T))
computed independently from the unswapped pass with `generalized_jsd(..., beta=1)`.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from visual_opsd.backends.base import Backend, Context
from visual_opsd.diagnostics.common import group_indices, summary, timed
from visual_opsd.losses import generalized_jsd
from visual_opsd.sample import Sample
from visual_opsd.vt import teacher_contexts

# completion sources, in the default order: identical tokens (the headline) first
SOURCES = ("data", "student")


def check_sources(sources: str | Sequence[str]) -> list[str]:
    """`sources` as a list (one name alone is a one-item list); an empty list, a repeated name or an
    unknown one is a ValueError that lists the choices."""
    items = [sources] if isinstance(sources, str) else list(sources)
    if not items:
        raise ValueError(f"kl: no completion source; choose from {list(SOURCES)}")
    unknown = [s for s in items if s not in SOURCES]
    if unknown:
        raise ValueError(f"kl: unknown completion source {unknown[0]!r}; choose from {list(SOURCES)} "
                         "(data: the data's text-only traces, student: samples of the measured model)")
    if len(set(items)) != len(items):
        raise ValueError(f"kl: completion sources repeat: {items}")
    return items


def sources_of(metrics: dict[str, float]) -> list[str]:
    """The completion sources measured in `kl_diagnostic`'s `metrics`, headline first."""
    order = {k.split("/")[1]: v for k, v in metrics.items() if k.startswith("kl/") and k.endswith("/order")
             and k.count("/") == 2}
    return sorted(order, key=order.__getitem__)


@dataclass
class Completions:
    """Completions of `samples`, context-major: row i * n + j is sample i's j-th."""

    n: int
    ids: list[list[int]]
    scored: list[list[bool]]  # per id: True where the KL is counted (False: injected ids)


def student_completions(
    backend: Backend,
    samples: Sequence[Sample],
    source: str = "student",
    *,
    n: int = 1,
    temperature: float = 1.0,
    max_new_tokens: int = 160,
    max_image_skips: int = 1,
    batch_size: int = 16,
    seed: int = 0,
    model: nn.Module | None = None,
) -> Completions:
    """`source="student"`: `n` samples per prompt from `model` (default: the backend's) on C_S;
    `source="data"`: each sample's text-only trace as ids (`n` is then 1)."""
    if source == "data":
        ids = [backend.encode_completion(s.text_only_completion()) for s in samples]
        return Completions(n=1, ids=ids, scored=[[True] * len(i) for i in ids])
    if source != "student":
        raise ValueError(f"completion source must be one of {list(SOURCES)}, got {source!r}")
    gen = torch.Generator().manual_seed(seed)
    ids, scored = [], []
    with torch.no_grad():
        for i in range(0, len(samples), batch_size):
            contexts = [backend.build_context(s, "student") for s in samples[i : i + batch_size]]
            for c in backend.sample(contexts, n=n, max_new_tokens=max_new_tokens, temperature=temperature,
                                    max_image_skips=max_image_skips, generator=gen, model=model):
                ids.append(c.ids)
                scored.append(c.sampled)
    return Completions(n=n, ids=ids, scored=scored)


@torch.no_grad()
def token_kl(
    backend: Backend,
    teacher_contexts: Sequence[Context],
    student_contexts: Sequence[Context],
    completions: list[list[int]],
    *,
    teacher_model: nn.Module | None = None,
    student_model: nn.Module | None = None,
    batch_size: int = 16,
    beta: float = 0.0,
) -> list[torch.Tensor]:
    """Per completion, the per-token KL(p_T(. | C_T, y_<t) || p_S(. | C_S, y_<t)) (n_i,) in nats.

    `completions` holds g = len(completions) / len(contexts) completions per context (context-major);
    both sides score this very list of ids. `beta=1` gives the reverse KL(p_S || p_T) instead (used
    by the sanity check); other values the generalized JSD of `losses.generalized_jsd`."""
    k = len(teacher_contexts)
    if len(student_contexts) != k or k == 0 or len(completions) % k:
        raise ValueError(f"{k} teacher / {len(student_contexts)} student contexts for {len(completions)} completions")
    g = len(completions) // k
    out: list[torch.Tensor] = []
    for i in range(0, k, batch_size):
        rows = completions[i * g : (i + batch_size) * g]  # one list, passed to both sides
        t = backend.score(list(teacher_contexts[i : i + batch_size]), rows, model=teacher_model)
        s = backend.score(list(student_contexts[i : i + batch_size]), rows, model=student_model)
        if not torch.equal(t.mask, s.mask):
            raise RuntimeError("teacher and student scored different completion lengths")
        kl = generalized_jsd(s.logits, t.logits, beta=beta, mask=s.mask, reduction="none")  # (B, T)
        out += [kl[r, : len(ids)].cpu() for r, ids in enumerate(rows)]
    return out


def contexts_for(
    backend: Backend, samples: Sequence[Sample], vt_mode: str = "data", seed: int = 0
) -> tuple[list[Context], list[Context]]:
    """(teacher contexts C_T, student contexts C_S). `shuffled` takes each sample's VTs from another
    sample (`vt.shuffled_partner`, a reproducible draw); `noise` draws its noise from `seed`."""
    teacher = teacher_contexts(backend, samples, samples, vt_mode, torch.Generator().manual_seed(seed))
    student = [backend.build_context(s, "student") for s in samples]
    return teacher, student


def _measure(
    backend: Backend,
    samples: Sequence[Sample],
    teacher_ctx: list[Context],
    student_ctx: list[Context],
    comps: Completions,
    prefix: str,
    *,
    teacher_model: nn.Module | None,
    student_model: nn.Module | None,
    batch_size: int,
    label: str,
    source: str,
    records: list[dict] | None,
) -> dict[str, float]:
    """K per task under one (teacher weights, student weights) pair; `prefix/<task>/{mean, ...}`."""
    per_token = token_kl(backend, teacher_ctx, student_ctx, comps.ids, teacher_model=teacher_model,
                         student_model=student_model, batch_size=batch_size)
    per_completion = []
    for r, (kl, scored) in enumerate(zip(per_token, comps.scored, strict=True)):
        mask = torch.tensor(scored, dtype=torch.bool)
        per_completion.append(float(kl[mask].double().mean()) if mask.any() else float("nan"))
        if records is not None:
            s = samples[r // comps.n]
            records.append({"measure": label, "source": source, "id": s.id, "task": s.task, "k": per_completion[-1],
                            "ids": comps.ids[r], "scored": scored, "kl": kl.tolist()})
    metrics: dict[str, float] = {}
    groups = group_indices(samples)
    for task, idx in groups.items():
        rows = [i * comps.n + j for i in idx for j in range(comps.n)]
        metrics.update(summary([per_completion[r] for r in rows], f"{prefix}/{task}"))
        metrics[f"{prefix}/{task}/tokens"] = sum(sum(comps.scored[r]) for r in rows)
    return metrics


def kl_diagnostic(
    backend: Backend,
    samples: list[Sample],
    *,
    post: dict[str, Backend] | None = None,
    sources: str | Sequence[str] = SOURCES,
    vt_mode: str = "data",
    n_completions: int = 1,
    temperature: float = 1.0,
    max_new_tokens: int = 160,
    max_image_skips: int = 1,
    batch_size: int = 16,
    seed: int = 0,
    records: list[dict] | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """For each completion source in `sources` (module docstring; the first is the headline): K_pre
    of `backend` (the base model), and for each trained model in `post` K_post with the teacher side
    on the base weights and on its own weights, and the gap closures.

    Returns the keys listed in the module docstring (`kl/<source>/...`) and `time/kl/...`.
    Per-completion per-token values go to `records` (`source`, and `measure` = "<source>/pre" or
    "<source>/<name>/teacher=<base|self>") if given. Post models must share the base model's
    tokenizer. An unknown source fails before anything is computed."""
    sources = check_sources(sources)
    if not samples:
        raise ValueError("kl: no samples")
    post = post or {}
    models = [backend.model, *[b.model for b in post.values()]]
    for m in models:
        m.eval()
    for name, other in post.items():
        _check_same_tokens(backend, other, samples[0], name)
    times: dict[str, float] = {}
    teacher_ctx, student_ctx = contexts_for(backend, samples, vt_mode, seed)
    # measurement -> (completion weights, teacher weights, student weights)
    plan: list[tuple[str, nn.Module, nn.Module, nn.Module]] = [("pre", *[backend.model] * 3)]
    for name, other in post.items():
        plan.append((f"post/{name}/teacher=base", other.model, backend.model, other.model))
        plan.append((f"post/{name}/teacher=self", other.model, other.model, other.model))
    metrics: dict[str, float] = {}
    # completions per (source, sampling model): both teacher sides share them, and the data's
    # traces are one set for every model (so K_pre and K_post score the very same id lists)
    cache: dict[tuple[str, int], Completions] = {}
    steps = [(source, *item) for source in sources for item in plan]
    for order, source in enumerate(sources):
        metrics[f"kl/{source}/order"] = float(order)
    scored_ids: dict[str, list[list[list[int]]]] = {source: [] for source in sources}
    for source, measure, sampler, teacher_model, student_model in tqdm(steps, desc="kl", disable=not progress,
                                                                        leave=False):
        key = (source, 0 if source == "data" else id(sampler))
        if key not in cache:
            with timed(times, "completions"):
                cache[key] = student_completions(
                    backend, samples, source, n=n_completions, temperature=temperature,
                    max_new_tokens=max_new_tokens, max_image_skips=max_image_skips, batch_size=batch_size,
                    seed=seed, model=sampler)
        comps = cache[key]
        scored_ids[source].append(comps.ids)
        label = f"{source}/{measure.removeprefix('post/')}"
        with timed(times, "score"):
            metrics.update(_measure(backend, samples, teacher_ctx, student_ctx, comps, f"kl/{source}/{measure}",
                                    teacher_model=teacher_model, student_model=student_model,
                                    batch_size=batch_size, label=label, source=source, records=records))
    tasks = list(group_indices(samples))
    for source in sources:
        # checked, not assumed: the identical-token claim of source=data is in the output
        metrics[f"kl/{source}/same_tokens"] = float(all(ids == scored_ids[source][0] for ids in scored_ids[source]))
        for name in post:
            for side in ("base", "self"):
                for task in tasks:
                    pre = metrics[f"kl/{source}/pre/{task}/mean"]
                    k_post = metrics[f"kl/{source}/post/{name}/teacher={side}/{task}/mean"]
                    metrics[f"kl/{source}/closure/{name}/teacher={side}/{task}"] = (
                        1.0 - k_post / pre if pre > 0 else float("nan"))
    metrics.update({f"time/kl/{k}_s": v for k, v in times.items()})
    metrics["time/kl_s"] = sum(times.values())
    return metrics


def kl_sanity(
    backend: Backend,
    samples: list[Sample],
    *,
    source: str = "student",
    vt_mode: str = "data",
    max_new_tokens: int = 160,
    batch_size: int = 16,
    seed: int = 0,
    tolerance: float = 1e-5,
) -> dict[str, float]:
    """The pipeline's self-checks (module docstring) on `samples`:
    `kl/sanity/identical/max_abs` (must be exactly 0), `kl/sanity/swapped/max_abs_diff` (swapped
    contexts vs the independently computed reverse KL; must be <= tolerance * (1 + |reverse KL|)),
    `kl/sanity/forward/mean` (the K of this check's completions, > 0 when VTs matter) and
    `kl/sanity/passed` (1.0 or 0.0)."""
    backend.model.eval()
    teacher_ctx, student_ctx = contexts_for(backend, samples, vt_mode, seed)
    comps = student_completions(backend, samples, source, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                seed=seed)
    identical = token_kl(backend, student_ctx, student_ctx, comps.ids, batch_size=batch_size)
    forward = token_kl(backend, teacher_ctx, student_ctx, comps.ids, batch_size=batch_size)
    swapped = token_kl(backend, student_ctx, teacher_ctx, comps.ids, batch_size=batch_size)
    reverse = token_kl(backend, teacher_ctx, student_ctx, comps.ids, batch_size=batch_size, beta=1.0)
    max_identical = max(float(x.abs().max()) for x in identical)
    diff = max(float((a - b).abs().max()) for a, b in zip(swapped, reverse, strict=True))
    scale = max(float(x.abs().max()) for x in reverse)
    passed = max_identical == 0.0 and diff <= tolerance * (1.0 + scale)
    return {
        "kl/sanity/identical/max_abs": max_identical,
        "kl/sanity/swapped/max_abs_diff": diff,
        "kl/sanity/reverse/max": scale,
        "kl/sanity/forward/mean": float(torch.cat(forward).double().mean()),
        "kl/sanity/passed": float(passed),
    }


def _check_same_tokens(base: Backend, other: Backend, sample: Sample, name: str) -> None:
    """Post models score the base model's ids: their tokenizers must agree (checked on real text)."""
    for text in (sample.question, sample.text_only_completion()):
        if base.encode_completion(text) != other.encode_completion(text):
            raise ValueError(f"post model {name!r} tokenizes text differently from the base model")


# --------------------------------------------------------------------------------------------
# per-token attribution


def token_table(backend: Backend, records: list[dict], measure: str = "data/pre", top: int = 20) -> list[dict]:
    """Which tokens carry the KL of one measure: per token string, occurrences, mean KL, and share of
    the measure's total KL mass (sum over all scored tokens), sorted by that share."""
    totals: dict[str, list[float]] = {}
    for r in records:
        if r["measure"] != measure:
            continue
        for i, flag, v in zip(r["ids"], r["scored"], r["kl"], strict=True):
            if flag:
                totals.setdefault(_piece(backend, i), []).append(v)
    mass = sum(sum(v) for v in totals.values()) or 1.0
    rows = [{"token": t, "count": len(v), "mean_kl": sum(v) / len(v), "share": sum(v) / mass}
            for t, v in totals.items()]
    return sorted(rows, key=lambda r: -r["share"])[:top]


def _piece(backend: Backend, i: int) -> str:
    """One id as text; ids that decode to nothing (end-of-sequence, padding) get a visible name."""
    return backend.decode([i]) or ("<eos>" if i == backend.eos_id else f"<id {i}>")


def highlight_html(backend: Backend, records: list[dict], measure: str = "data/pre", limit: int = 8) -> str:
    """An HTML page showing `limit` completions of one measure, each token's background as red as its
    KL (scale: the 99th percentile of the measure's per-token KL); hover shows the value."""
    rows = [r for r in records if r["measure"] == measure]
    values = sorted(v for r in rows for v, f in zip(r["kl"], r["scored"], strict=True) if f)
    vmax = values[min(len(values) - 1, int(0.99 * len(values)))] if values else 1.0
    vmax = vmax if vmax > 0 else 1.0
    parts = [
        "<!doctype html><meta charset='utf-8'><title>KL per token</title>",
        "<style>body{font-family:monospace;max-width:60em;margin:2em auto} .t{white-space:pre-wrap}"
        " span{border-radius:2px}</style>",
        f"<h1>Per-token KL(p(. | C_T, y&lt;t) || p(. | C_S, y&lt;t)), measure <code>{html.escape(measure)}</code></h1>",
        f"<p>Colour scale: white = 0, full red = {vmax:.3f} nats (99th percentile). Grey = not scored "
        "(injected id). Hover a token for its value.</p>",
    ]
    for r in rows[:limit]:
        spans = []
        for i, flag, v in zip(r["ids"], r["scored"], r["kl"], strict=True):
            piece = html.escape(_piece(backend, i))
            if not flag:
                spans.append(f"<span style='background:#ddd' title='not scored'>{piece}</span>")
                continue
            alpha = min(1.0, max(0.0, v / vmax))
            spans.append(f"<span style='background:rgba(255,0,0,{alpha:.3f})' title='{v:.4f} nats'>{piece}</span>")
        k = "nan" if math.isnan(r["k"]) else f"{r['k']:.4f}"
        parts.append(f"<h3>{html.escape(r['id'])} ({html.escape(r['task'])}): K = {k} nats/token</h3>")
        parts.append("<div class='t'>" + "".join(spans) + "</div>")
    return "\n".join(parts) + "\n"


__all__ = [
    "SOURCES",
    "Completions",
    "check_sources",
    "contexts_for",
    "highlight_html",
    "kl_diagnostic",
    "kl_sanity",
    "sources_of",
    "student_completions",
    "token_kl",
    "token_table",
]
