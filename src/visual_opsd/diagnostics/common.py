"""Helpers the three diagnostics share: loading a model folder, grouping by task, summary statistics,
Gaussian-noise images, interleaved decoding in batches, and stage timing."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from visual_opsd.backends import is_bagel_folder, open_backend
from visual_opsd.backends.base import Backend, Interleaved
from visual_opsd.hub import resolve_folder
from visual_opsd.sample import Sample
from visual_opsd.tasks import Task, get_task

ALL = "all"  # the pseudo-task of metrics pooled over every task


def model_folder(path: str | Path) -> Path:
    """The folder holding `config.json` (a BAGEL folder: `llm_config.json` + `vit_config.json`) and the
    weights: `path` itself, or its `model/` subfolder (the layout of Visual-OPSD checkpoints
    `best/model`, `last/model`). A Hub id `org/name[@rev]` is its snapshot in the Hugging Face cache."""
    path = resolve_folder(path, "model", key="model")
    for folder in (path, path / "model"):
        if (folder / "config.json").is_file() or is_bagel_folder(folder):
            return folder
    raise FileNotFoundError(f"{path}: no model here (expected config.json, or model/config.json)")


def load_backend(path: str | Path) -> Backend:
    """The backend saved at `path` (see `model_folder`), of any registered family, with its defaults."""
    return open_backend(model_folder(path))


def tasks_of(samples: Sequence[Sample]) -> dict[str, Task]:
    """Scorer of every task present, in order of first appearance."""
    return {name: get_task(name) for name in dict.fromkeys(s.task for s in samples)}


def group_indices(samples: Sequence[Sample]) -> dict[str, list[int]]:
    """Sample indices per task, plus `all` (every index) when more than one task is present."""
    groups: dict[str, list[int]] = {}
    for i, s in enumerate(samples):
        groups.setdefault(s.task, []).append(i)
    if len(groups) > 1:
        groups[ALL] = list(range(len(samples)))
    return groups


def summary(values: Sequence[float], prefix: str) -> dict[str, float]:
    """`prefix/mean`, `/std` (sample, ddof=1; 0 for one value), `/ci95_lo`, `/ci95_hi` (normal
    approximation mean +- 1.96 std / sqrt(n)) and `/n`. NaN values are left out; none left gives NaNs."""
    x = np.asarray([v for v in values if not math.isnan(v)], dtype=np.float64)
    n = len(x)
    if n == 0:
        nan = float("nan")
        return {f"{prefix}/mean": nan, f"{prefix}/std": nan, f"{prefix}/ci95_lo": nan, f"{prefix}/ci95_hi": nan,
                f"{prefix}/n": 0}
    mean = float(x.mean())
    std = float(x.std(ddof=1)) if n > 1 else 0.0
    half = 1.96 * std / math.sqrt(n)
    return {f"{prefix}/mean": mean, f"{prefix}/std": std, f"{prefix}/ci95_lo": mean - half,
            f"{prefix}/ci95_hi": mean + half, f"{prefix}/n": n}


def pad_images(images: list[Image.Image], k: int, fallback: Image.Image) -> list[Image.Image]:
    """`images` extended to at least `k` entries by repeating its last one (or `fallback` when empty):
    `generate_interleaved(given_vts=...)` must have an image for every VT the model asks for."""
    out = list(images) or [fallback]
    return out + [out[-1]] * (k - len(out))


def decode_interleaved(
    backend: Backend,
    samples: Sequence[Sample],
    *,
    given: Sequence[list[Image.Image]] | None = None,
    max_images: int = 1,
    vt_steps: int = 50,
    max_new_tokens: int = 160,
    batch_size: int = 16,
    seed: int = 0,
    desc: str = "decode",
    progress: bool = False,
) -> list[Interleaved]:
    """Greedy interleaved decoding from each sample's student context, in batches: the model
    generates its own VTs (`given` None) or gets `given[i]` inserted at its `<image_start>`s."""
    gen = torch.Generator().manual_seed(seed)
    out: list[Interleaved] = []
    starts = range(0, len(samples), batch_size)
    for i in tqdm(starts, desc=desc, disable=not progress, leave=False, dynamic_ncols=True):
        chunk = samples[i : i + batch_size]
        contexts = [backend.build_context(s, "student") for s in chunk]
        out += backend.generate_interleaved(
            contexts, max_new_tokens=max_new_tokens, temperature=0.0, vt_steps=vt_steps, max_images=max_images,
            given_vts=None if given is None else list(given[i : i + batch_size]), generator=gen,
        )
    return out


@contextmanager
def timed(times: dict[str, float], name: str) -> Iterator[None]:
    """Add the block's wall time to times[name] (seconds)."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        times[name] = times.get(name, 0.0) + time.perf_counter() - t0
