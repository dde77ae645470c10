"""VT interventions: does the unified model's accuracy depend on the pixels of its visual thoughts?

Every mode decodes greedily from the student context (question + problem image), one batch at a
time, and scores the final text with the task's scorer. They differ only in what is inserted where
the model emits `<image_start>`:

    interleaved  the VT the model generates itself (`vt_steps` denoising steps);
    text_only    nothing: text-only decoding with image skip (an injected `<image_end>`, at most once);
    noise        Gaussian noise of the generated VT's shape (`vt.noise_image`, a fresh draw per VT);
    shuffled     the VT the model generated (in `interleaved`) for another sample of the same image
                 size where possible, else for any other sample;
    oracle       the ground-truth VT from the data.

Greedy decoding makes every mode's text identical up to the first `<image_start>`, so the modes
differ only by what the model reads from the inserted image. Accuracy is the fraction of samples
scored correct, in percent, with a 95% Wilson interval, per task and (with several tasks) pooled.
At most `max_images` VTs are inserted per sample (default: the most any sample of the data has).
When a mode needs an image that does not exist (noise / shuffled after an interleaved run produced
no VT for the sample or its partner), a noise image of the problem image's size stands in and
`interventions/<mode>/fallback_images` counts it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image

from visual_opsd.backends.base import Backend, Interleaved
from visual_opsd.diagnostics.common import (
    decode_interleaved,
    group_indices,
    pad_images,
    tasks_of,
    timed,
)
from visual_opsd.sample import Sample
from visual_opsd.stats import wilson_interval
from visual_opsd.vt import noise_image, shuffled_partner

INTERVENTION_MODES: tuple[str, ...] = ("interleaved", "text_only", "noise", "shuffled", "oracle")


def interventions(
    backend: Backend,
    samples: list[Sample],
    *,
    modes: Sequence[str] = INTERVENTION_MODES,
    vt_steps: int = 50,
    max_new_tokens: int = 160,
    max_images: int | None = None,
    batch_size: int = 16,
    seed: int = 0,
    records: list[dict] | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """Accuracy of each intervention mode (module docstring) per task.

    Returns flat metrics: `interventions/<task>/<mode>/{accuracy, ci95_lo, ci95_hi}` (percent),
    `.../correct`, `.../n`, `.../vts` (mean VTs inserted per sample), `.../tokens` (mean generated ids),
    `interventions/<mode>/fallback_images` and `time/interventions/<mode>_s` (the interleaved run that
    noise and shuffled reuse counts for `interleaved`). Per-sample rows go to `records` if given.
    """
    unknown = [m for m in modes if m not in INTERVENTION_MODES]
    if unknown or not modes:
        raise ValueError(f"unknown intervention modes {unknown}; choose from {INTERVENTION_MODES}")
    if not samples:
        raise ValueError("interventions: no samples")
    if max_images is None:
        max_images = max(1, max(len(s.vt_images) for s in samples))
    backend.model.eval()
    gen = torch.Generator().manual_seed(seed)
    times: dict[str, float] = {}
    fallbacks: dict[str, int] = {}
    decode = dict(max_images=max_images, vt_steps=vt_steps, max_new_tokens=max_new_tokens, batch_size=batch_size,
                  seed=seed, progress=progress)

    generated: list[Interleaved] | None = None
    if any(m in ("interleaved", "noise", "shuffled") for m in modes):
        with timed(times, "interleaved"):
            generated = decode_interleaved(backend, samples, desc="interleaved", **decode)

    outputs: dict[str, list[tuple[str, int, int]]] = {}  # mode -> (text, VTs inserted, ids) per sample
    partners: list[int | None] = [None] * len(samples)
    for mode in modes:
        with timed(times, mode):
            if mode == "interleaved":
                outs = generated
            elif mode == "text_only":
                outs = _decode_text_only(backend, samples, max_new_tokens, batch_size)
            else:
                if mode == "noise":
                    given, n_fallback = _noise_vts(samples, generated, max_images, gen)
                elif mode == "shuffled":
                    partners = shuffle_partners(samples, generated, gen)
                    given, n_fallback = _shuffled_vts(samples, generated, partners, max_images, gen)
                else:  # oracle
                    given, n_fallback = _oracle_vts(samples, max_images)
                fallbacks[mode] = n_fallback
                outs = decode_interleaved(backend, samples, given=given, desc=mode, **decode)
        outputs[mode] = [(o.text, len(getattr(o, "images", ())), len(o.ids)) for o in outs]

    metrics: dict[str, float] = {}
    scorers = tasks_of(samples)
    verdicts = {m: [scorers[s.task].is_correct(s, out[0]) for s, out in zip(samples, outputs[m], strict=True)]
                for m in modes}
    for task, idx in group_indices(samples).items():
        for mode in modes:
            k, n = sum(verdicts[mode][i] for i in idx), len(idx)
            lo, hi = wilson_interval(k, n)
            key = f"interventions/{task}/{mode}"
            metrics.update({
                f"{key}/accuracy": 100.0 * k / n, f"{key}/ci95_lo": 100.0 * lo, f"{key}/ci95_hi": 100.0 * hi,
                f"{key}/correct": k, f"{key}/n": n,
                f"{key}/vts": sum(outputs[mode][i][1] for i in idx) / n,
                f"{key}/tokens": sum(outputs[mode][i][2] for i in idx) / n,
            })
    for mode, count in fallbacks.items():
        metrics[f"interventions/{mode}/fallback_images"] = count
    for mode in modes:
        metrics[f"time/interventions/{mode}_s"] = times.get(mode, 0.0)
    metrics["time/interventions_s"] = sum(times.values())
    if records is not None:
        for mode in modes:
            for i, s in enumerate(samples):
                text, vts, n_ids = outputs[mode][i]
                row = {"id": s.id, "task": s.task, "mode": mode, "prediction": text, "answer": s.answer,
                       "correct": bool(verdicts[mode][i]), "vts": vts, "tokens": n_ids}
                if mode == "shuffled" and partners[i] is not None:
                    row["vt_from"] = samples[partners[i]].id
                records.append(row)
    return metrics


def shuffle_partners(
    samples: Sequence[Sample], generated: Sequence[Interleaved], generator: torch.Generator
) -> list[int | None]:
    """For each sample, another sample whose generated trace holds a VT (`vt.shuffled_partner`: one
    with a VT of the same size when there is one, else any); None when no other sample generated a VT."""
    candidates = [(s.id, g.images[0].size if g.images else None) for s, g in zip(samples, generated, strict=True)]
    return [
        shuffled_partner(s.id, g.images[0].size if g.images else s.problem_images[0].size, candidates, generator)
        for s, g in zip(samples, generated, strict=True)
    ]


def _decode_text_only(backend: Backend, samples: list[Sample], max_new_tokens: int, batch_size: int):
    out = []
    for i in range(0, len(samples), batch_size):
        contexts = [backend.build_context(s, "student") for s in samples[i : i + batch_size]]
        out += backend.sample(contexts, n=1, max_new_tokens=max_new_tokens, temperature=0.0, max_image_skips=1)
    return out


def _fallback(sample: Sample, generator: torch.Generator) -> Image.Image:
    return noise_image(sample.problem_images[0].size, generator)


def _noise_vts(samples, generated, max_images, generator) -> tuple[list[list[Image.Image]], int]:
    """Per sample: one noise image per VT slot, each the size of the VT generated there (or of the
    sample's last generated VT, or of its problem image)."""
    given, n_fallback = [], 0
    for s, g in zip(samples, generated, strict=True):
        sizes = [im.size for im in g.images] or [s.problem_images[0].size]
        n_fallback += not g.images
        sizes += [sizes[-1]] * (max_images - len(sizes))
        given.append([noise_image(size, generator) for size in sizes])
    return given, n_fallback


def _shuffled_vts(samples, generated, partners, max_images, generator) -> tuple[list[list[Image.Image]], int]:
    given, n_fallback = [], 0
    for s, p in zip(samples, partners, strict=True):
        images = list(generated[p].images) if p is not None else []
        n_fallback += not images
        given.append(pad_images(images, max_images, _fallback(s, generator)))
    return given, n_fallback


def _oracle_vts(samples, max_images) -> tuple[list[list[Image.Image]], int]:
    missing = [s.id for s in samples if not s.vt_images]
    if missing:
        raise ValueError(f"oracle intervention: samples without ground-truth VT images: {missing[:5]}")
    return [pad_images(s.vt_images, max_images, s.vt_images[-1]) for s in samples], 0
