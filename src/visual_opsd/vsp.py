"""The VSP benchmark's folders and answer files: loading maps, and `visual-opsd score vsp`.

The upstream layout is `level{L}/{img,table,pure_text}/{i}.*`; the grid format and both scoring
rules are pure functions in `visual_opsd.tasks.vsp_rules`. `score_command` implements
`visual-opsd score vsp --maps DIR --answers FILE [--rule strict|vsp]`.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from visual_opsd.errors import VSPInputError
from visual_opsd.images import decode_image, inside_root
from visual_opsd.sample import Sample
from visual_opsd.stats import wilson_interval
from visual_opsd.tasks.maze import resize_cells, sample_from_grid
from visual_opsd.tasks.vsp_rules import RULES, read_table

_LEVEL_DIR = re.compile(r"level(\d+)")


def _level_dirs(root: Path) -> list[tuple[int, Path]]:
    found = []
    for child in root.iterdir():
        m = _LEVEL_DIR.fullmatch(child.name)
        if m and child.is_dir():
            found.append((int(m.group(1)), child))
    return sorted(found)


def _table_files(level_dir: Path) -> list[tuple[int, Path]]:
    table_dir = level_dir / "table"
    if not table_dir.is_dir():
        raise FileNotFoundError(f"{table_dir}: missing table folder")
    files = [(int(p.stem), p) for p in table_dir.glob("*.txt") if p.stem.isdigit()]
    return sorted(files)


MAX_LEVEL = 32  # VSP has levels 3..8; a level-10**6 folder would render a terapixel maze
MAX_TABLE_BYTES = 1 << 20


@dataclass
class VSPItem:
    """One map of a VSP folder: its sample, or the error that made it unusable (`field`: table/img)."""

    level: int
    index: int | str
    file: Path
    sample: Sample | None = None
    error: Exception | None = None
    field: str = "table"


def iter_vsp_items(path: str | os.PathLike, cell_px: int = 64, *, allow_outside: bool = True) -> Iterator[VSPItem]:
    """Every map under `path` (upstream layout), ordered by level then index, one `VSPItem` each;
    a bad map is an item with its error, so that callers can report or skip it and go on.

    `allow_outside=False` (what `data.load_dataset` passes unless allowed) makes a table or image
    that resolves outside `path` through a symbolic link a bad map, refused before it is read.
    Problem images and VTs come at `cell_px` pixels per cell (VSP's images have 64)."""
    if cell_px < 1:
        raise ValueError(f"cell_px must be at least 1, got {cell_px}")
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a folder")
    inside = None if allow_outside else inside_root(root)
    levels = _level_dirs(root)
    if not levels:
        raise ValueError(f"{root}: no level{{L}} folders (expected the layout level{{L}}/table/{{i}}.txt)")
    for level, level_dir in levels:
        if not 2 <= level <= MAX_LEVEL:
            problem = ValueError(f"{level_dir}: level {level} is outside 2..{MAX_LEVEL}")
            yield VSPItem(level, "*", level_dir, error=problem)
            continue
        try:
            tables = _table_files(level_dir)
        except FileNotFoundError as e:
            yield VSPItem(level, "*", level_dir / "table", error=e)
            continue
        for index, table_path in tables:
            try:
                sample = _load_map(level, level_dir, index, table_path, cell_px, inside)
                yield VSPItem(level, index, table_path, sample=sample)
            except _ImageProblem as e:
                yield VSPItem(level, index, e.path, error=e.error, field="img")
            except (ValueError, OSError) as e:
                yield VSPItem(level, index, table_path, error=e)


class _ImageProblem(Exception):
    def __init__(self, path: Path, error: Exception):
        super().__init__(str(error))
        self.path, self.error = path, error


def _escapes(path: Path, inside: Path | None) -> bool:
    """True when `inside` is set and `path` resolves (symbolic links followed) to a place outside it."""
    return inside is not None and not path.resolve().is_relative_to(inside)


def _load_map(level: int, level_dir: Path, index: int, table_path: Path, cell_px: int, inside: Path | None) -> Sample:
    if _escapes(table_path, inside):
        raise ValueError(f"{table_path}: leaves the dataset folder through a symbolic link")
    if table_path.stat().st_size > MAX_TABLE_BYTES:
        raise ValueError(f"{table_path}: table file over {MAX_TABLE_BYTES:,} bytes")
    grid = read_table(table_path)
    if len(grid) != level:
        raise ValueError(f"{table_path}: a level {level} map must be {level}x{level}, got {len(grid)}")
    image_path = level_dir / "img" / f"{index}.png"
    if not image_path.is_file():
        raise _ImageProblem(image_path, FileNotFoundError(f"{image_path}: missing image for {table_path}"))
    if _escapes(image_path, inside):
        raise _ImageProblem(image_path, ValueError(f"{image_path}: leaves the dataset folder through a symbolic link"))
    try:
        image = decode_image(image_path)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise _ImageProblem(image_path, ValueError(f"{image_path}: cannot read image: {e}")) from None
    try:
        # At the asked cell size (VSP draws 64 px per cell), each cell shrunk on its own as our renders
        # are: a model with one patch per cell then sees one cell per patch at every level, which no
        # power-of-two shrink of the whole image gives (a level-3 map is 192 px).
        image = resize_cells(image, level, cell_px)
    except ValueError as e:
        raise _ImageProblem(image_path, ValueError(f"{image_path}: {e}")) from None
    try:
        sample = sample_from_grid(grid, f"vsp-L{level}-{index}", cell_px=cell_px)
    except ValueError as e:
        raise ValueError(f"{table_path}: {e}") from None
    sample.problem_images = [image]
    sample.metadata.update(level=level, index=index)
    return sample


def load_vsp_folder(path: str | os.PathLike, cell_px: int = 64) -> list[Sample]:
    """All maps under `path` (upstream layout) as maze samples, ordered by level then index.

    Each sample's problem image is VSP's own `img/{i}.png` at `cell_px` pixels per cell (unchanged at
    VSP's 64; otherwise each cell resized on its own, `maze.resize_cells`); its VT is our render of
    the map with the BFS shortest path drawn (VSP has no VTs; this is what a model trained on our
    VTs would draw). Ids are `vsp-L{L}-{i}`; metadata adds `level` and `index` to the maze task's
    fields.
    The first bad map raises its error (`data.load_dataset` can skip bad maps instead).
    """
    samples = []
    for item in iter_vsp_items(path, cell_px):
        if item.error is not None:
            raise item.error
        samples.append(item.sample)
    return samples


# --------------------------------------------------------------------------------------------
# Scoring a file of answers (the `score vsp` command)


def scored_path(answers_file: str | os.PathLike) -> Path:
    """Where per-item results go: `<FILE stem>.scored.jsonl` next to FILE."""
    path = Path(answers_file)
    return path.with_name(path.stem + ".scored.jsonl")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # `true` is not a level


def _decode_answer_line(line: str) -> dict[str, Any]:
    """The JSON object of one answers line; ValueError with a short reason otherwise."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    return obj


def _answer_fields(obj: dict[str, Any]) -> tuple[int, int, str]:
    """(level, index, prediction) of a decoded answers line; ValueError naming the bad field."""
    for name in ("level", "index", "prediction"):
        if name not in obj:
            raise ValueError(f'missing field "{name}"')
    for name in ("level", "index"):
        if not _is_int(obj[name]):
            raise ValueError(f'field "{name}" must be an integer, got {obj[name]!r}')
    if not isinstance(obj["prediction"], str):
        raise ValueError(f'field "prediction" must be a string, got {type(obj["prediction"]).__name__}')
    return obj["level"], obj["index"], obj["prediction"]


def score_vsp_answers(
    maps_dir: str | os.PathLike, answers_file: str | os.PathLike, rule: str = "strict"
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Score a JSONL file of `{"level": L, "index": i, "prediction": "..."}` against VSP maps.

    Every non-blank line is one item. A line that cannot be scored (bad JSON, a missing or mistyped
    field, a duplicate (level, index), no such map, a malformed table) counts as wrong and is listed
    in `summary["problems"]` as `FILE:LINE: reason`; scoring goes on. Both rules are applied to
    every scorable item; `rule` picks the one that decides `correct` and the headline accuracy.
    Per-item results are written to `scored_path(answers_file)` (atomically).

    Raises VSPInputError when the inputs are unusable as a whole: no maps folder, no readable
    answers file, an unknown rule, or a file without a single non-blank line.
    """
    if rule not in RULES:
        raise VSPInputError(f"unknown rule {rule!r}; choose one of: {', '.join(RULES)}")
    maps_root = Path(maps_dir)
    answers_path = Path(answers_file)
    if not maps_root.is_dir():
        raise VSPInputError(f"{maps_root}: maps folder not found")
    if not answers_path.is_file():
        raise VSPInputError(f"{answers_path}: answers file not found")
    try:
        lines = answers_path.read_text(encoding="utf-8-sig").splitlines()  # tolerate a BOM
    except (OSError, UnicodeDecodeError) as e:
        raise VSPInputError(f"{answers_path}: cannot read answers: {e}") from None

    grids: dict[tuple[int, int], list[str] | str] = {}  # a grid, or the reason it is unusable

    def grid_for(level: int, index: int) -> list[str]:
        key = (level, index)
        if key not in grids:
            table = maps_root / f"level{level}" / "table" / f"{index}.txt"
            if not table.is_file():
                grids[key] = f"no map level{level}/table/{index}.txt under {maps_root}"
            else:
                try:
                    grids[key] = read_table(table)
                except ValueError as e:
                    grids[key] = str(e)
        found = grids[key]
        if isinstance(found, str):
            raise ValueError(found)
        return found

    items: list[dict[str, Any]] = []
    problems: list[str] = []
    first_line: dict[tuple[int, int], int] = {}
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        item: dict[str, Any] = {"line": lineno, "level": None, "index": None}
        try:
            obj = _decode_answer_line(line)
            if _is_int(obj.get("level")) and _is_int(obj.get("index")):
                # Known even when another field is bad, so the line still counts in its level.
                item.update(level=obj["level"], index=obj["index"])
            level, index, prediction = _answer_fields(obj)
            if (level, index) in first_line:
                raise ValueError(
                    f"duplicate answer for level {level} index {index} (first on line {first_line[(level, index)]})"
                )
            first_line[(level, index)] = lineno
            grid = grid_for(level, index)
        except ValueError as e:
            message = f"{answers_path}:{lineno}: {e}"
            problems.append(message)
            item.update(correct=False, reason=str(e), error=message, strict=None, vsp=None)
            items.append(item)
            continue
        verdicts = {name: score(grid, prediction) for name, score in RULES.items()}
        item.update(
            correct=verdicts[rule].correct,
            reason=verdicts[rule].reason,
            **{name: verdict.to_dict() for name, verdict in verdicts.items()},
        )
        items.append(item)
    if not items:
        raise VSPInputError(f"{answers_path}: no answers (the file has no non-blank line)")

    n = len(items)
    k = sum(item["correct"] for item in items)
    lo, hi = wilson_interval(k, n)
    per_level: dict[str, dict[str, Any]] = {}
    for level in sorted({item["level"] for item in items if item["level"] is not None}):
        of_level = [item for item in items if item["level"] == level]
        k_level = sum(item["correct"] for item in of_level)
        per_level[str(level)] = {"n": len(of_level), "correct": k_level, "accuracy": k_level / len(of_level)}
    by_rule = {name: sum(bool(item.get(name) and item[name]["correct"]) for item in items) for name in RULES}
    maps_in_dir = {
        (level, index) for level, level_dir in _level_dirs(maps_root) for index, _ in _safe_tables(level_dir)
    }
    out_path = scored_path(answers_path)
    _write_jsonl_atomic(out_path, items)
    summary = {
        "rule": rule,
        "maps": str(maps_root),
        "answers": str(answers_path),
        "n": n,
        "correct": k,
        "accuracy": k / n,
        "ci95": [lo, hi],
        "per_level": per_level,
        "correct_by_rule": by_rule,
        "malformed": len(problems),
        "problems": problems,
        "maps_in_dir": len(maps_in_dir),
        "unanswered": len(maps_in_dir - set(first_line)),
        "scored_file": str(out_path),
    }
    return summary, items


def _safe_tables(level_dir: Path) -> list[tuple[int, Path]]:
    try:
        return _table_files(level_dir)
    except FileNotFoundError:
        return []


def _write_jsonl_atomic(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write rows as JSONL via a temporary file and a rename: never a half-written result file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def format_summary(summary: dict[str, Any]) -> str:
    """The human-readable report `score vsp` prints."""
    lo, hi = summary["ci95"]
    lines = [
        f"VSP maze, rule {summary['rule']}: {summary['correct']}/{summary['n']} correct = "
        f"{100 * summary['accuracy']:.1f}% (95% Wilson CI {100 * lo:.1f}-{100 * hi:.1f}%)"
    ]
    for level, row in summary["per_level"].items():
        lines.append(f"  level {level}: {row['correct']}/{row['n']} = {100 * row['accuracy']:.1f}%")
    others = [f"{name} {k}/{summary['n']}" for name, k in summary["correct_by_rule"].items()]
    lines.append(f"  correct under each rule: {', '.join(others)}")
    if summary["malformed"]:
        lines.append(f"  {summary['malformed']} unscorable line(s) counted as wrong (listed on stderr)")
    if summary["unanswered"]:
        lines.append(
            f"  note: {summary['unanswered']} of {summary['maps_in_dir']} maps in the folder have no scorable "
            "answer; they are not in the total"
        )
    lines.append(f"  per-item results: {summary['scored_file']}")
    return "\n".join(lines)


def score_command(maps_dir: str | os.PathLike, answers_file: str | os.PathLike, rule: str = "strict") -> int:
    """`visual-opsd score vsp`: print the report, write per-item results; return the exit code.

    0: scoring completed (unscorable lines, if any, were counted wrong and listed on stderr).
    2: unusable inputs (no maps folder, no readable answers file, unknown rule, no answers, or the
    results file cannot be written); the reason goes to stderr and nothing is written.
    """
    try:
        summary, _ = score_vsp_answers(maps_dir, answers_file, rule)
    except VSPInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # e.g. the results file cannot be written next to the answers
        print(f"error: {e}", file=sys.stderr)
        return 2
    for problem in summary["problems"]:
        print(problem, file=sys.stderr)
    print(format_summary(summary))
    return 0
