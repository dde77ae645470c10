"""The VT controls, in one place for training, the KL diagnostic and the inference interventions.

What the teacher's VT slots hold (`teacher.vt_mode`, docs/method.md section 3):

- `data`: the sample's own VTs (the method);
- `noise`: a `NoiseVT` per VT, which the backend turns into N(0, 1) in its *normalised* input
  space at the VT's size, redrawn at every context build (the paper's control);
- `shuffled`: the VTs of another sample, chosen by `shuffled_partner` (one rule everywhere);
- `none`: no images (the framing texts stay).

Inference-time interventions replace VTs the model *generated* and feeds back as images, so their
noise is an image too (`noise_image`, pixels N(0, 1) in the [-1, 1] range), and their shuffled
partner is chosen by the same `shuffled_partner` among the samples that generated a VT.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from PIL import Image

from visual_opsd.sample import Sample

if TYPE_CHECKING:
    from visual_opsd.backends.base import Backend, Context

VTMode = Literal["data", "noise", "shuffled", "none"]
VT_MODES: tuple[str, ...] = ("data", "noise", "shuffled", "none")
# (id, size of its first VT or None when it has none): what `shuffled_partner` chooses among
Candidate = tuple[str, tuple[int, int] | None]


@dataclass(frozen=True)
class NoiseVT:
    """Stands in for one VT under `vt_mode="noise"`: the backend draws N(0, 1) in its *normalised*
    input space at this size, afresh on every `build_context` call."""

    width: int
    height: int


def pick_vt_images(
    sample: Sample, vt_mode: VTMode, shuffled_from: Sample | None = None, max_images: int = 8
) -> list[Image.Image | NoiseVT]:
    """The VT images a teacher context holds, in order, for each control.

    data: the sample's own VTs. noise: one `NoiseVT` per VT, same size. shuffled: the VTs of
    `shuffled_from` (another sample, from `shuffled_partner`). none: no images (the framing texts
    stay). At most `max_images` are kept (the paper's limit is 8).
    """
    if vt_mode == "data":
        images: list = list(sample.vt_images)
    elif vt_mode == "noise":
        images = [NoiseVT(*im.size) for im in sample.vt_images]
    elif vt_mode == "shuffled":
        if shuffled_from is None:
            raise ValueError("vt_mode='shuffled' needs shuffled_from=<another sample>")
        if shuffled_from.id == sample.id:
            raise ValueError(f"vt_mode='shuffled': shuffled_from is the sample itself ({sample.id!r})")
        images = list(shuffled_from.vt_images)
    elif vt_mode == "none":
        images = []
    else:
        raise ValueError(f"unknown vt_mode {vt_mode!r}; expected one of {VT_MODES}")
    return images[:max_images]


def vt_size(sample: Sample) -> tuple[int, int] | None:
    """The size of the sample's first VT, None when it has none."""
    return sample.vt_images[0].size if sample.vt_images else None


def vt_candidates(samples: Sequence[Sample]) -> list[Candidate]:
    """`shuffled_partner`'s candidates for the samples' own (data) VTs."""
    return [(s.id, vt_size(s)) for s in samples]


def shuffled_partner(
    sample_id: str, size: tuple[int, int] | None, candidates: Sequence[Candidate], generator: torch.Generator
) -> int | None:
    """The index in `candidates` of the sample whose VTs stand in for `sample_id`'s: drawn uniformly
    among the other samples that have a VT of the same `size` when there are any (a VT of another
    size would tell the model it is not its own), else among all others that have a VT; None when
    no other sample has one. One draw from `generator` per call that finds a partner."""
    others = [j for j, (cid, csize) in enumerate(candidates) if cid != sample_id and csize is not None]
    pool = [j for j in others if candidates[j][1] == size] or others
    if not pool:
        return None
    return pool[int(torch.randint(len(pool), (1,), generator=generator))]


def teacher_contexts(
    backend: Backend, samples: Sequence[Sample], pool: Sequence[Sample], vt_mode: VTMode, generator: torch.Generator
) -> list[Context]:
    """The teacher context C_T of each sample under `vt_mode`; `shuffled` takes each sample's VTs
    from another sample of `pool` (`shuffled_partner`); `noise` draws from `generator`."""
    candidates = vt_candidates(pool) if vt_mode == "shuffled" else []
    contexts = []
    for s in samples:
        partner = None
        if vt_mode == "shuffled":
            j = shuffled_partner(s.id, vt_size(s), candidates, generator)
            if j is None:
                raise ValueError(f"vt_mode=shuffled: no sample other than {s.id!r} has VTs to lend it")
            partner = pool[j]
        contexts.append(backend.build_context(s, "teacher", vt_mode, shuffled_from=partner, generator=generator))
    return contexts


def noise_image(size: tuple[int, int], generator: torch.Generator) -> Image.Image:
    """An RGB image of `size` (width, height) whose pixels are N(0, 1) in the [-1, 1]-normalised pixel
    space (value = 127.5 * (1 + z)), clamped to that range and quantised to 8 bits: a generated VT is
    fed back as an image, so its noise stand-in goes in the way any VT does."""
    w, h = size
    z = torch.randn(h, w, 3, generator=generator)
    arr = ((z.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # (H, W, 3)
    return Image.fromarray(arr.numpy(), "RGB")
