"""Evaluation: accuracy with 95% Wilson intervals, latency per sample and tokens per answer.

Latency is measured the same way for every system: batch size 1, after `warmup` untimed samples,
over the whole pipeline of one sample (context building = preprocessing and image encoding,
decoding, and VT generation where the mode generates VTs). Tokens count the generated answer's ids.

Modes (how a model is asked, see `sft.predict`):
- `interleaved`: the unified model generates its own VTs (`vt_steps` denoising steps each);
- `given_vt`: interleaved, with the ground-truth VT inserted at each `<image_start>` (oracle);
- `text`: text-only decoding from the student context (image skip at most once);
- `teacher_context`: text-only decoding after the privileged teacher context.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from visual_opsd.backends.mini import MiniBackend
from visual_opsd.sample import Sample
from visual_opsd.sft import predict
from visual_opsd.stats import wilson_interval
from visual_opsd.tasks.base import Task


@dataclass
class EvalResult:
    """One system on one task."""

    accuracy: float  # percent
    ci95: tuple[float, float]  # percent, Wilson
    n: int
    latency_s: float  # mean seconds per sample, batch size 1
    tokens: float  # mean generated ids per answer
    records: list[dict] = field(default_factory=list)  # per sample

    def summary(self) -> dict:
        out = asdict(self)
        out.pop("records")
        return out


def evaluate(
    backend: MiniBackend,
    samples: list[Sample],
    task: Task,
    mode: str,
    *,
    vt_steps: int = 50,
    max_new_tokens: int = 160,
    warmup: int = 2,
    seed: int = 0,
    desc: str | None = None,
    progress: bool = True,
) -> EvalResult:
    """Greedy predictions one sample at a time, timed; scored with the task's scorer."""
    if not samples:
        raise ValueError("evaluate: no samples")
    for s in samples[:warmup]:  # untimed: first-call allocations and kernel selection
        predict(backend, [s], mode, max_new_tokens, vt_steps, seed=seed)
    records = []
    for s in tqdm(samples, desc=desc or f"eval {mode}", disable=not progress, dynamic_ncols=True, leave=False):
        t0 = time.perf_counter()
        with torch.no_grad():
            (text,) = predict(backend, [s], mode, max_new_tokens, vt_steps, seed=seed)
        latency = time.perf_counter() - t0
        tokens = len(backend.tokenizer.encode(text)) + 1  # + the end-of-sequence id
        records.append({
            "id": s.id, "mode": mode, "prediction": text, "parsed": task.extract_answer(text),
            "answer": s.answer, "correct": bool(task.is_correct(s, text)), "latency_s": latency, "tokens": tokens,
        })
    k, n = sum(r["correct"] for r in records), len(records)
    lo, hi = wilson_interval(k, n)
    return EvalResult(
        accuracy=100.0 * k / n,
        ci95=(100.0 * lo, 100.0 * hi),
        n=n,
        latency_s=sum(r["latency_s"] for r in records) / n,
        tokens=sum(r["tokens"] for r in records) / n,
        records=records,
    )


def write_records(result: EvalResult, path: str | Path) -> None:
    """Per-sample JSONL (id, prediction, parsed answer, verdict, latency, tokens)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for r in result.records:
            f.write(json.dumps(r) + "\n")
