"""On-policy rollouts: sample completions from the current student weights, with their statistics.

`collect_rollout` samples `n` completions per prompt from the student context through a rollout
engine (`rollout_engines.py`: `native`, the backend's own sampler, or `vllm`; image-skip injection
happens inside the engine) and returns a `Rollout`, the same record whatever the engine: ids,
sampled/injected flags, and each id's log-probability under the sampling distribution
(`logprobs`, NaN at injected ids). In `source="data"` mode the
completions are the samples' own text-only traces instead: no sampling, so distributed runs and
tests can be compared exactly (issue "scale-out", deterministic mode).

The scored completion is the whole token sequence the sampler produced, rounds concatenated. An
injected `<image_end>` is part of it (the sampling cache saw it, so both contexts score the same
sequence) but carries no loss: `loss_mask` is False there. Where a backend limits the length
(`Backend.completion_room`, the HF backend's `max_length`), `fit_rollout` cuts each completion once,
to the room its longest context leaves (the teacher's, with its VTs), as the reference does: both
sides then score the very same ids, and no side pads a cut position.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from visual_opsd.backends.base import Backend, Context
from visual_opsd.rollout_engines import NativeEngine, RolloutEngine
from visual_opsd.sample import Sample
from visual_opsd.tasks.base import Task, scorer_of


@dataclass
class Rollout:
    """Completions of one batch of prompts, context-major: row i * n + j is sample i's j-th."""

    samples: list[Sample]  # (P,) the prompts
    n: int  # completions per prompt
    ids: list[list[int]]  # (P * n,) completion token ids, ragged
    texts: list[str]  # (P * n,) decoded completions
    sampled: list[list[bool]]  # (P * n,) per id: False for injected ids (no loss there)
    finished: list[bool]  # (P * n,) ended with end-of-sequence
    image_skips: list[int]  # (P * n,) image-skip injections used
    # (P * n,) per id: log-probability under the sampling distribution (temperature applied,
    # suppressed ids removed; `backends.base.token_logprobs`), NaN at injected ids; None: not sampled
    # (`source="data"`)
    logprobs: list[list[float]] | None = None

    def loss_mask(self, length: int) -> torch.Tensor:
        """(R, length) bool: True on sampled completion ids, built from lengths (pad may equal eos)."""
        mask = torch.zeros(len(self.ids), length, dtype=torch.bool)
        for r, flags in enumerate(self.sampled):
            mask[r, : len(flags)] = torch.tensor(flags, dtype=torch.bool)
        return mask

    def cut(self, room: Sequence[int | None]) -> Rollout:
        """The rollout with completion r cut to its first `room[r]` ids (None: kept whole); texts,
        `finished` and skips stay those of the sampled completions."""
        keep = [len(ids) if r is None else max(0, min(len(ids), r)) for ids, r in zip(self.ids, room, strict=True)]
        logprobs = None if self.logprobs is None else [lp[:k] for lp, k in zip(self.logprobs, keep, strict=True)]
        return dataclasses.replace(self, ids=[ids[:k] for ids, k in zip(self.ids, keep, strict=True)],
                                   sampled=[flags[:k] for flags, k in zip(self.sampled, keep, strict=True)],
                                   logprobs=logprobs)

    def stats(self, task: Task | None = None) -> dict[str, float]:
        """Flat `rollout/` metrics: length, truncation, image-skip rate, parsable-answer fraction."""
        rows = max(len(self.ids), 1)
        out = {
            "rollout/length": sum(len(i) for i in self.ids) / rows,
            "rollout/truncated": sum(not f for f in self.finished) / rows,
            "rollout/image_skip_rate": sum(s > 0 for s in self.image_skips) / rows,
        }
        if task is not None:  # each completion by its sample's own task (`task` where it has none)
            scorers = [scorer_of(self.samples[r // self.n], task) for r in range(len(self.texts))]
            pairs = list(zip(scorers, self.texts, strict=True))
            out["rollout/parsable"] = sum(t.extract_answer(x) is not None for t, x in pairs) / rows
            correct = [t.is_correct(self.samples[r // self.n], x) for r, (t, x) in enumerate(pairs)]
            out["rollout/correct"] = sum(correct) / rows
        return out


def collect_rollout(
    backend: Backend,
    samples: list[Sample],
    contexts: list[Context],
    *,
    n: int = 1,
    max_new_tokens: int = 256,
    temperature: float = 1.0,
    max_image_skips: int = 1,
    source: Literal["sample", "data"] = "sample",
    generator: torch.Generator | None = None,
    engine: RolloutEngine | None = None,
) -> Rollout:
    """`n` completions per sample from the *current* student weights (or the data, see module doc),
    sampled by `engine` (None: the backend's own sampler, `NativeEngine`)."""
    if len(samples) != len(contexts):
        raise ValueError(f"{len(samples)} samples but {len(contexts)} contexts")
    if source == "data":
        ids = [backend.encode_completion(s.text_only_completion()) for s in samples for _ in range(n)]
        return Rollout(
            samples=samples,
            n=n,
            ids=ids,
            texts=[backend.decode(i) for i in ids],
            sampled=[[True] * len(i) for i in ids],
            finished=[True] * len(ids),
            image_skips=[0] * len(ids),
        )
    if source != "sample":
        raise ValueError(f"rollout source must be 'sample' or 'data', got {source!r}")
    engine = engine or NativeEngine(backend)
    with torch.no_grad():
        comps = engine.sample(
            contexts,
            n=n,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            max_image_skips=max_image_skips,
            generator=generator,
        )
    return Rollout(
        samples=samples,
        n=n,
        ids=[c.ids for c in comps],
        texts=[c.text for c in comps],
        sampled=[c.sampled for c in comps],
        finished=[c.finished for c in comps],
        image_skips=[c.image_skips for c in comps],
        logprobs=[c.logprobs for c in comps],
    )


def fit_rollout(backend: Backend, rollout: Rollout, *sides: Sequence[Context]) -> Rollout:
    """`rollout` with each completion cut ONCE to the room the longest of its contexts leaves
    (`Backend.completion_room`; one context per prompt on each side, e.g. the student's and the
    teacher's). Scored on each side alone, a completion would be cut per side: the teacher (the
    longer context) sooner, its cut positions padded (zero hidden states, a uniform target) where
    the student still has logits. Cut here, every side scores the very same ids in full."""
    room: list[int | None] = []
    for r in range(len(rollout.ids)):
        limits = [backend.completion_room(side[r // rollout.n]) for side in sides]
        known = [x for x in limits if x is not None]
        room.append(min(known) if known else None)
    return rollout.cut(room)
