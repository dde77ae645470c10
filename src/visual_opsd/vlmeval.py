"""VLMEvalKit's benchmark files (TSV) as samples: how researchers get MMVP, SAT, BLINK, CV-Bench and
the others.

A VLMEvalKit TSV has one row per question, tab-separated, with a header row:

- `index`: the row's id, unique in the file;
- `image`: the image as base64 text, or a list of them for a multi-image row (JSON or Python
  list syntax). A short cell that is another row's `index` reuses that row's image (VLMEvalKit
  stores a repeated image once this way). Rows may instead name files in `image_path` (a path or
  a list of them, relative to the TSV's folder);
- `question`, and an optional `hint`; the model is asked as VLMEvalKit asks (`prompt_text`: the
  options listed under the question), or a row's own `prompt` column where it has one (CV-Bench);
- option columns `A`, `B`, ...: a row's options are its non-empty ones, in letter order, and make
  it a multiple-choice question (task `multiple_choice`); a row without options is a short-answer
  question (task `short_answer`);
- `answer`; `category`, `l2-category`, `split` and any other column are kept in `metadata`.

`scan_tsv` yields one entry per row, a sample or the problems that make the row unusable, each
naming the row and the column; `data.load_dataset` and `data validate` apply their shared checks
on top. Images are decoded with the same limits as every loader (`images.decode_image`).

How VLMEvalKit turns per-row verdicts into a benchmark's number (`headline`), as its `image_mcq.py`
and `utils/multiple_choice.py` do:

- circular sets (SAT, MMBench): the rotated copies of a question have index + k * 1,000,000; a
  question counts only if every copy is right, and the accuracy is over questions
  (`mcq_circular_eval`). Here a set is circular when it holds such copies;
- CV-Bench-2D: the mean of the accuracies per `source` (ADE20K, COCO); CV-Bench-3D pools its rows
  (the paper's CV-Bench is the mean of the two);
- MMVP: per-question accuracy (VLMEvalKit's "Average", the paper's number); the pair accuracy
  (both questions of an image pair right, VLMEvalKit's "Overall") is given beside it;
- everything else (BLINK, V*, VisPuzzle, ChartQA...): accuracy pooled over rows, broken down per
  `category` and `l2-category` (BLINK's 14 subtasks are its categories).

`prediction_row` gives a record in VLMEvalKit's prediction layout (the row without its images,
plus `prediction`), so that VLMEvalKit's own evaluation can be run on our outputs.
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
from typing import Any

from PIL import Image

from visual_opsd.images import checked_image_path, decode_image
from visual_opsd.sample import Sample
from visual_opsd.stats import mean_proportion_interval, wilson_interval

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
    if not (row.get("question") or "").strip() and not _cell(row, "prompt"):
        problems.append(("question", "empty"))
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
    # the row without its images: the prediction file repeats it (VLMEvalKit's layout); the columns
    # results are broken down by are also kept at the top level
    original = {k: v for k, v in row.items() if k and k not in ("image", "image_path")}
    metadata = {k: v for k, v in original.items() if k not in ("question", "hint", "answer", *OPTION_COLUMNS)}
    metadata.update(benchmark=file.stem, vlmeval_row=original)
    sample = Sample(id=f"{file.stem}-{index}", task="multiple_choice" if options else "short_answer",
                    question=prompt_text(row, options), answer=answer, problem_images=images, choices=options or None,
                    metadata=metadata)
    return TSVRow(position, index, sample, [])


def _cell(row: dict, column: str) -> str:
    value = (row.get(column) or "").strip()
    return "" if value.lower() == "nan" else value


def prompt_text(row: dict, options: list[str]) -> str:
    """The question as VLMEvalKit asks it. A row with its own `prompt` column (CV-Bench) is asked
    that; a multiple-choice row as `ImageMCQDataset.build_prompt` does (hint, question, the options
    one per line, the instruction to pick one); a short-answer row by its question alone, as
    `ImageVQADataset` does."""
    if _cell(row, "prompt"):
        return _cell(row, "prompt")
    question = row.get("question") or ""
    if not options:
        return question
    hint = _cell(row, "hint")
    lines = [f"Hint: {hint}"] if hint else []
    lines += [f"Question: {question}", "Options:"]
    lines += [f"{letter}. {text}" for letter, text in zip(OPTION_COLUMNS, options, strict=False)]
    return "\n".join(lines) + "\nPlease select the correct answer from the options above. \n"


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


# --------------------------------------------------------------------------------------------
# VLMEvalKit's scoring conventions

CIRCULAR_OFFSET = 1_000_000  # a rotated copy of question i has index i + k * CIRCULAR_OFFSET
# per-row fields results are broken down by, when the rows have them
BREAKDOWN_KEYS = ("category", "l2-category", "source", "split")


def _int_index(record: dict) -> int | None:
    try:
        return int(str(record.get("index", "")).strip())
    except ValueError:
        return None


def circular_groups(records: list[dict]) -> dict[int, list[dict]] | None:
    """The records grouped by question (index mod 1,000,000) when the set holds rotated copies, else
    None. As VLMEvalKit, only questions whose own row (index < 1,000,000) is present are kept."""
    indices = [_int_index(r) for r in records]
    if any(i is None for i in indices) or not any(i >= CIRCULAR_OFFSET for i in indices):
        return None
    groups: dict[int, list[dict]] = {}
    for i, r in zip(indices, records, strict=True):
        groups.setdefault(i % CIRCULAR_OFFSET, []).append(r)
    return {g: rows for g, rows in sorted(groups.items()) if g in indices}


def _pooled(hits: list[bool]) -> dict[str, Any]:
    k, n = sum(hits), len(hits)
    lo, hi = wilson_interval(k, n)
    return {"accuracy": 100.0 * k / n, "ci95": (100.0 * lo, 100.0 * hi), "n": n}


def headline(benchmark: str, records: list[dict]) -> dict[str, Any]:
    """The benchmark's accuracy the way VLMEvalKit computes it (module docstring): accuracy (percent),
    ci95, n (the units it counts: rows, or questions of a circular set), `rule` naming the rule, and
    the rule's side figures (the per-row accuracy of a circular set, MMVP's pair accuracy,
    CV-Bench-2D's sources)."""
    if not records:
        raise ValueError(f"{benchmark}: no records")
    name = benchmark.lower()
    groups = circular_groups(records)
    if groups is not None:
        out = _pooled([all(r["correct"] for r in rows) for rows in groups.values()])
        return {**out, "rule": "circular: a question counts if all its rotations are right",
                "per_row": _pooled([r["correct"] for r in records])}
    if name.startswith("cv-bench-2d") or name.startswith("cvbench-2d"):
        sources = sorted({str(r["source"]) for r in records if r.get("source") is not None})
        if sources:
            parts = [[r["correct"] for r in records if str(r.get("source")) == s] for s in sources]
            counts = [(sum(p), len(p)) for p in parts]
            lo, hi = mean_proportion_interval(counts)
            return {"accuracy": 100.0 * sum(k / n for k, n in counts) / len(counts), "ci95": (100 * lo, 100 * hi),
                    "n": len(records), "rule": "mean over sources (CV-Bench-2D)",
                    "sources": {s: _pooled(p) for s, p in zip(sources, parts, strict=True)}}
    out = {**_pooled([r["correct"] for r in records]), "rule": "pooled over rows"}
    if name.startswith("mmvp"):
        out["rule"] = "per question (MMVP)"
        ordered = sorted(records, key=lambda r: (_int_index(r) is None, _int_index(r) or 0))
        pairs = [ordered[i : i + 2] for i in range(0, len(ordered) - 1, 2)]
        out["pairs"] = _pooled([a["correct"] and b["correct"] for a, b in pairs]) if pairs else None
    return out


def prediction_row(sample: Sample, prediction: str) -> dict[str, Any] | None:
    """The sample's row in VLMEvalKit's prediction layout (its TSV columns without images, then
    `prediction`); None for a sample that did not come from a TSV."""
    row = sample.metadata.get("vlmeval_row")
    return None if row is None else {**row, "prediction": prediction}
