"""Safe image decoding, shared by every loader (dataset rows, VSP folders).

The size in the header is checked before any pixel memory is allocated (a decompression bomb
or a zero-size image fails there), and the image is then decoded in full, so that a truncated
file fails here and not in the middle of training.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

from PIL import Image

from visual_opsd.hub import cache_repo_root

# 6144 x 6144: above any VT or benchmark image in use (VSP level 8 is 512 x 512), and small enough
# that one decoded RGB image (113 MB) cannot exhaust a worker
MAX_IMAGE_PIXELS = 6144 * 6144


def decode_image(source: Path | bytes) -> Image.Image:
    """The image at `source` (a path or the file's bytes), fully decoded, as RGB; ValueError when
    it is empty or over `MAX_IMAGE_PIXELS`, PIL's errors when it is not a readable image."""
    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
        width, height = img.size
        if width < 1 or height < 1:
            raise ValueError(f"zero-size image ({width}x{height})")
        if width * height > MAX_IMAGE_PIXELS:
            raise ValueError(
                f"image of {width}x{height} = {width * height:,} pixels is over the limit of {MAX_IMAGE_PIXELS:,}"
            )
        img.load()
        return img.convert("RGB")


def image_path_problem(rel: str, allow_outside: bool) -> str | None:
    """Why an image path written in a dataset file may not be read (empty, absolute, or leaving
    the dataset folder by `..`, unless `allow_outside`), or None. Symbolic links are
    `checked_image_path`'s business: they need the folder."""
    if not rel:
        return "empty path"
    if allow_outside:
        return None
    if os.path.isabs(rel) or rel.startswith(("/", "\\")):
        return f"absolute path {rel!r} not allowed (paths are relative to the dataset folder)"
    if os.path.normpath(rel).split(os.sep)[0] == "..":
        return f"path {rel!r} leaves the dataset folder"
    return None


def inside_root(base: Path) -> Path:
    """Where the files of the dataset folder `base` must resolve to (symbolic links followed): `base`,
    or for a dataset in the Hugging Face cache its repository's cache folder (a snapshot's files are
    links into the repository's `blobs/`)."""
    return cache_repo_root(base) or base.resolve()


def checked_image_path(base: Path, rel: str, allow_outside: bool) -> Path:
    """`base / rel` for an image path from a dataset file in folder `base`; ValueError when
    `image_path_problem` has one, or when the path leaves `base` through a symbolic link."""
    problem = image_path_problem(rel, allow_outside)
    if problem:
        raise ValueError(problem)
    if not allow_outside and not (base / rel).resolve().is_relative_to(inside_root(base)):
        raise ValueError(f"path {rel!r} leaves the dataset folder through a symbolic link")
    return base / rel
