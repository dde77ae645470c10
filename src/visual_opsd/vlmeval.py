"""VLMEvalKit's benchmark files (TSV) as samples: how researchers get MMVP, SAT, BLINK, CV-Bench and
the others.

A VLMEvalKit TSV has one row per question, tab-separated, with a header row:

- `index`: the row's id, unique in the file;
- `image`: the image as base64 text, or a list of them for a multi-image row (JSON or Python
  list syntax). A short cell that is another row's `index` reuses that row's image (VLMEvalKit
  stores a repeated image once this way). Rows may instead name files in `image_path` (a path or
  a list of them, relative to the TSV's folder);
- `question`, and an optional `hint` (put before the question, as VLMEvalKit's prompts do);
- option columns `A`, `B`, ...: a row's options are its non-empty ones, in letter order, and make
  it a multiple-choice question (task `multiple_choice`); a row without options is a short-answer
  question (task `short_answer`);
- `answer`; `category`, `l2-category`, `split` and any other column are kept in `metadata`.

`scan_tsv` yields one entry per row, a sample or the problems that make the row unusable, each
naming the row and the column; `data.load_dataset` and `data validate` apply their shared checks
on top. Images are decoded with the same limits as every loader (`images.decode_image`).
"""

from __future__ import annotations

import ast
import base64
import binascii
import csv
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from visual_opsd.images import checked_image_path, decode_image
from visual_opsd.sample import Sample

OPTION_COLUMNS = tuple("ABCDEFGHIJ")
REQUIRED = ("index", "question", "answer")
# A cell shorter than this is an index reference, not image data (VLMEvalKit's own threshold).
_MAX_REFERENCE_CHARS = 64
_MAX_FIELD_CHARS = 256 * 1024 * 1024  # csv's default field limit (128 KB) is below one base64 image


@dataclass
class TSVRow:
    """One row: its id (when readable), the sample, or its problems as (column, reason) pairs."""

    position: str  # "row N" (1-based, the header not counted)
    index: str | None
    sample: Sample | None
    problems: list[tuple[str, str]]


def _image_cells(value: str) -> list[str]:
    """The cell as a list of items: a JSON or Python list, else the cell itself."""
    value = value.strip()
    if value.startswith("["):
        try:
            items = json.loads(value)
        except ValueError:
            try:
                items = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                raise ValueError("a list that is neither JSON nor Python list syntax") from None
        if not isinstance(items, list) or not all(isinstance(x, str) for x in items):
            raise ValueError("a list whose items are not all strings")
        return items
    return [value]


def _decode_base64(text: str) -> Image.Image:
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not base64 image data") from None
    return decode_image(data)


def scan_tsv(file: Path, allow_outside: bool = False) -> Iterator[TSVRow]:
    """Every row of the TSV at `file`; a header without the required columns is a ValueError."""
    csv.field_size_limit(min(sys.maxsize, _MAX_FIELD_CHARS))
    with file.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = reader.fieldnames or []
        missing = [c for c in REQUIRED if c not in header]
        if missing:
            raise ValueError(f"{file}: not a VLMEvalKit TSV: no {', '.join(missing)} column (header: {header[:12]})")
        if "image" not in header and "image_path" not in header:
            raise ValueError(f"{file}: not a VLMEvalKit TSV: no image or image_path column")
        rows = list(reader)
    by_index = {(r.get("index") or "").strip(): r for r in rows}
    for n, row in enumerate(rows, 1):
        yield _parse_row(row, f"row {n}", file, by_index, allow_outside)


def _parse_row(row: dict, position: str, file: Path, by_index: dict, allow_outside: bool) -> TSVRow:
    problems: list[tuple[str, str]] = []
    if None in row:  # more cells than header columns
        problems.append(("row", f"{len(row[None])} cells more than the header has"))
    index = (row.get("index") or "").strip() or None
    if index is None:
        problems.append(("index", "empty"))
    question = row.get("question") or ""
    hint = (row.get("hint") or "").strip()
    if hint and hint.lower() != "nan":
        question = f"Hint: {hint}\n{question}"
    options = []
    for column in OPTION_COLUMNS:
        text = (row.get(column) or "").strip()
        if not text or text.lower() == "nan":
            break
        options.append(text)
    answer = (row.get("answer") or "").strip()
    if options and answer not in OPTION_COLUMNS[: len(options)]:
        problems.append(("answer", f"{answer!r} is not one of the row's option letters "
                                   f"{', '.join(OPTION_COLUMNS[: len(options)])}"))
    images: list[Image.Image] = []
    try:
        images = _row_images(row, file, by_index, allow_outside)
        if not images:
            problems.append(("image", "no image"))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        column = "image_path" if (row.get("image_path") or "").strip() and not (row.get("image") or "").strip() \
            else "image"
        problems.append((column, str(e)))
    if problems:
        return TSVRow(position, index, None, problems)
    metadata = {k: v for k, v in row.items() if k and k not in ("image", "image_path", "question", "hint", "answer",
                                                                  *OPTION_COLUMNS)}
    metadata["benchmark"] = file.stem
    sample = Sample(id=f"{file.stem}-{index}", task="multiple_choice" if options else "short_answer",
                    question=question, answer=answer, problem_images=images, choices=options or None,
                    metadata=metadata)
    return TSVRow(position, index, sample, [])


def _row_images(row: dict, file: Path, by_index: dict, allow_outside: bool) -> list[Image.Image]:
    cell = (row.get("image") or "").strip()
    if cell and cell.lower() != "nan":
        images = []
        for item in _image_cells(cell):
            if len(item) <= _MAX_REFERENCE_CHARS:  # another row's image, by its index
                other = by_index.get(item.strip())
                if other is None or len((other.get("image") or "").strip()) <= _MAX_REFERENCE_CHARS:
                    raise ValueError(f"refers to row index {item.strip()!r}, which holds no image data")
                images += [_decode_base64(x) for x in _image_cells(other["image"])]
            else:
                images.append(_decode_base64(item))
        return images
    paths = (row.get("image_path") or "").strip()
    if not paths:
        return []
    return [decode_image(checked_image_path(file.parent, rel, allow_outside)) for rel in _image_cells(paths)]
