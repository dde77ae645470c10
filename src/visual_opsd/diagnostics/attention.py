"""Attention diagnostic: once a VT is in the context, where does the text look, per layer?

Definition (per layer l, for a query span Q and a key span K of one sequence):

    frac_l(Q -> K) = 1 / (H * |Q|) * sum_{h < H} sum_{q in Q} sum_{k in K} A_l[h, q, k]

where A_l[h, q, :] is head h's softmax attention distribution of query position q over all key
positions (it sums to 1 over the keys q may see). So: the fraction of attention mass that the
span's tokens send to the image span, averaged over heads and query tokens. It lies in [0, 1].

Sequences are the model's own greedy interleaved traces: student context (start token, problem
image block, question), then the generated text, the VT as an image block between `<image_start>`
and `<image_end>`, and the text generated after it. Spans (positions of that sequence):
- `input_image`: the problem image's own positions (its markers excluded);
- `vt`: the positions of the VT image(s) (markers excluded);
- `text_before_vt`: generated text tokens before the first VT (the question is not included);
- `text_after_vt`: generated text tokens after the first VT, the final end-of-sequence included;
  image markers are never text.
Reported spans: text_before_vt -> input_image, text_after_vt -> vt, text_after_vt -> input_image,
for `generated` VTs (the trace of the `interleaved` intervention) and for `noise` VTs (the trace of
the `noise` intervention: the model continues after reading a Gaussian-noise image of the
generated VT's shape). A sample without a VT in its trace, or without text on a span's query side,
is left out of that span's statistics; `/n` says how many samples each number averages. Layers
are numbered from 0 (the first transformer layer).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image

from visual_opsd.backends.base import Backend, Context, Interleaved
from visual_opsd.diagnostics.common import decode_interleaved, summary, timed
from visual_opsd.sample import Sample
from visual_opsd.vt import noise_image

ATTENTION_SPANS: tuple[tuple[str, str, str], ...] = (
    # (name, query span, key span)
    ("text_before_vt->input_image", "text_before_vt", "input_image"),
    ("text_after_vt->vt", "text_after_vt", "vt"),
    ("text_after_vt->input_image", "text_after_vt", "input_image"),
)
VT_KINDS: tuple[str, ...] = ("generated", "noise")


def span_fraction(attention: torch.Tensor, queries: torch.Tensor, keys: torch.Tensor) -> float:
    """frac(Q -> K) of one layer (module docstring): `attention` (H, S, S) rows = queries, columns =
    keys; `queries`, `keys` 1-D position indices. NaN when `queries` or `keys` is empty."""
    if queries.numel() == 0 or keys.numel() == 0:
        return float("nan")
    a = attention.detach().float()[:, queries][:, :, keys]  # (H, |Q|, |K|)
    return float(a.sum(-1).mean())  # sum over keys, mean over heads and queries


def _positions(spans: list[tuple[int, int]]) -> torch.Tensor:
    return torch.cat([torch.arange(a, b) for a, b in spans]) if spans else torch.zeros(0, dtype=torch.long)


def split_trace(ids: list[int], n_images: int, image_start_id: int, image_end_id: int) -> int:
    """The length of the trace prefix that ends with the `<image_end>` of the last VT that holds an
    image (the `n_images`-th `<image_start>`); 0 when the trace has no VT."""
    seen, cut = 0, 0
    for j, i in enumerate(ids):
        if i == image_start_id:
            seen += 1
        elif i == image_end_id and 0 < seen <= n_images:
            cut = j + 1
    return cut


def trace_spans(backend: Backend, context: Context, completion: list[int]) -> dict[str, torch.Tensor]:
    """Position indices of every span of `context` (from `build_trace_context`) + `completion`."""
    n_ctx = context.num_tokens
    vt = context.spans("vt_image")
    first_vt = vt[0][0] if vt else n_ctx
    trace_text = _positions(context.spans("trace_text"))
    markers = (backend.image_start_id, backend.image_end_id)
    tail = torch.tensor([n_ctx + j for j, i in enumerate(completion) if i not in markers], dtype=torch.long)
    return {
        "input_image": _positions(context.spans("problem_image")),
        "vt": _positions(vt),
        "text_before_vt": trace_text[trace_text < first_vt],
        "text_after_vt": torch.cat([trace_text[trace_text > first_vt], tail]),
    }


@torch.no_grad()
def trace_fractions(backend: Backend, sample: Sample, trace: Interleaved) -> dict[str, list[float]] | None:
    """Per-layer fractions of every reported span for one trace; None when the trace has no VT."""
    cut = split_trace(trace.ids, len(trace.images), backend.image_start_id, backend.image_end_id)
    if cut == 0:
        return None
    context = backend.build_trace_context(sample, trace.ids[:cut], trace.images)
    completion = trace.ids[cut:]
    scores = backend.score([context], [completion or [backend.eos_id]], output_attentions=True)
    layers = scores.attentions[0]  # per layer (H, S, S) over context + completion
    if not completion:  # nothing after the VT: the placeholder id is not part of any span
        layers = [a[:, :-1, :-1] for a in layers]
    spans = trace_spans(backend, context, completion)
    return {name: [span_fraction(a, spans[q], spans[k]) for a in layers] for name, q, k in ATTENTION_SPANS}


def attention_fractions(
    backend: Backend,
    samples: list[Sample],
    *,
    vts: Sequence[str] = VT_KINDS,
    vt_steps: int = 50,
    max_new_tokens: int = 160,
    max_images: int = 1,
    batch_size: int = 16,
    seed: int = 0,
    records: list[dict] | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """Per-layer attention fractions (module docstring) over `samples`.

    Returns `attention/<vt>/<span>/layer_<l>/{mean, std, ci95_lo, ci95_hi, n}` (mean and spread over
    samples), `attention/<vt>/<span>/all_layers/mean` (the mean of the per-layer means),
    `attention/<vt>/no_vt` (samples whose trace had no VT), `attention/n_layers` and
    `time/attention/...`. Per-sample per-layer fractions go to `records` if given.
    """
    unknown = [v for v in vts if v not in VT_KINDS]
    if unknown or not vts:
        raise ValueError(f"unknown VT kinds {unknown}; choose from {VT_KINDS}")
    backend.model.eval()
    times: dict[str, float] = {}
    decode = dict(max_images=max_images, vt_steps=vt_steps, max_new_tokens=max_new_tokens, batch_size=batch_size,
                  seed=seed, progress=progress)
    with timed(times, "decode_generated"):
        generated = decode_interleaved(backend, samples, desc="attention: interleaved", **decode)
    traces = {"generated": generated}
    if "noise" in vts:
        gen = torch.Generator().manual_seed(seed + 1)
        given: list[list[Image.Image]] = []
        for s, g in zip(samples, generated, strict=True):
            sizes = [im.size for im in g.images] or [s.problem_images[0].size]
            given.append([noise_image(sizes[min(k, len(sizes) - 1)], gen) for k in range(max_images)])
        with timed(times, "decode_noise"):
            traces["noise"] = decode_interleaved(backend, samples, given=given, desc="attention: noise", **decode)

    metrics: dict[str, float] = {}
    n_layers = 0
    for kind in vts:
        per_span: dict[str, list[list[float]]] = {name: [] for name, _, _ in ATTENTION_SPANS}
        no_vt = 0
        with timed(times, f"score_{kind}"):
            for s, trace in zip(samples, traces[kind], strict=True):
                fractions = trace_fractions(backend, s, trace)
                if fractions is None:
                    no_vt += 1
                    continue
                for name, values in fractions.items():
                    per_span[name].append(values)
                if records is not None:
                    records.append({"id": s.id, "task": s.task, "vt": kind, "fractions": fractions})
        metrics[f"attention/{kind}/no_vt"] = no_vt
        for name, rows in per_span.items():
            if not rows:
                continue
            n_layers = len(rows[0])
            means = []
            for layer in range(n_layers):
                stats = summary([r[layer] for r in rows], f"attention/{kind}/{name}/layer_{layer:02d}")
                metrics.update(stats)
                means.append(stats[f"attention/{kind}/{name}/layer_{layer:02d}/mean"])
            metrics[f"attention/{kind}/{name}/all_layers/mean"] = sum(means) / len(means)
    metrics["attention/n_layers"] = n_layers
    metrics["attention/n_samples"] = len(samples)
    for name, seconds in times.items():
        metrics[f"time/attention/{name}_s"] = seconds
    metrics["time/attention_s"] = sum(times.values())
    return metrics
