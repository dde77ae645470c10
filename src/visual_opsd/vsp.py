"""The VSP maze benchmark: its grid and folder format, its two scoring rules, and `score vsp`.

VSP (Visual Spatial Planning) task-main is 600 FrozenLake maps, levels 3..8 (an L x L grid), in the
upstream layout `level{L}/{img,table,pure_text}/{i}.*`. A table file is a markdown grid:

    | | Col 1 | Col 2 | Col 3 |
    | Row 1 | _ | _ | _ |
    | Row 2 | @ | _ | # |
    | Row 3 | * | _ | _ |

with `@` the player (elf) start, `*` the goal (gift), `#` a hole and `_` land. In code a grid is a
list of row strings (`["___", "@_#", "*__"]`), rows top to bottom, columns left to right,
0-indexed. Moves are L/R/U/D.

Two scoring rules exist, and they disagree on real outputs (see `score_strict`, `score_vsp`):
- strict: the rule behind ThinkMorph's reported numbers (the last valid `\\boxed{...}`; the player
  must end exactly on the goal). This is the default everywhere in visual-opsd.
- vsp: the original VSP evaluation (the text after `Action plan: `, replayed with gym semantics).

`score_command` implements `visual-opsd score vsp --maps DIR --answers FILE [--rule strict|vsp]`.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from visual_opsd.sample import Sample
from visual_opsd.stats import wilson_interval

PLAYER, GOAL, HOLE, LAND = "@", "*", "#", "_"
SYMBOLS = (PLAYER, GOAL, HOLE, LAND)
# (row delta, column delta) of each move.
MOVES: dict[str, tuple[int, int]] = {"L": (0, -1), "R": (0, 1), "U": (-1, 0), "D": (1, 0)}

Grid = Sequence[str]
Cell = tuple[int, int]


# --------------------------------------------------------------------------------------------
# Grids


def grid_problems(grid: Grid) -> list[str]:
    """What is wrong with `grid` as a VSP map (square, known symbols, one start, one goal)."""
    if not isinstance(grid, (list, tuple)) or not grid:
        return ["the grid must be a non-empty list of row strings"]
    if not all(isinstance(row, str) for row in grid):
        return ["every row of the grid must be a string"]
    problems = []
    n = len(grid)
    for r, row in enumerate(grid):
        if len(row) != n:
            problems.append(f"row {r} has {len(row)} cells, expected {n} (the grid must be square)")
        for c, ch in enumerate(row):
            if ch not in SYMBOLS:
                problems.append(f"bad symbol {ch!r} at ({r}, {c}); allowed: {' '.join(SYMBOLS)}")
    for sym, what in ((PLAYER, "start"), (GOAL, "goal")):
        count = sum(row.count(sym) for row in grid)
        if count != 1:
            problems.append(f"{count} {what} cells {sym!r}, expected exactly 1")
    return problems


def check_grid(grid: Grid) -> None:
    """Raise ValueError listing every problem of `grid`; scoring a broken map would mislead."""
    problems = grid_problems(grid)
    if problems:
        raise ValueError("invalid maze grid: " + "; ".join(problems))


def find_symbol(grid: Grid, symbol: str) -> Cell:
    """(row, column) of the first `symbol` in `grid`, scanning rows top to bottom."""
    for r, row in enumerate(grid):
        c = row.find(symbol)
        if c >= 0:
            return (r, c)
    raise ValueError(f"no {symbol!r} in the grid")


# --------------------------------------------------------------------------------------------
# Scoring rules


@dataclass(frozen=True)
class Verdict:
    """The outcome of scoring one prediction: correct or not, why, and the moves that were read.

    `moves` is None when no answer could be read at all; for the vsp rule it holds the cleaned
    plan parts, which may include parts that are not moves.
    """

    correct: bool
    reason: str
    moves: tuple[str, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "correct": self.correct,
            "reason": self.reason,
            "moves": None if self.moves is None else list(self.moves),
        }


# One or two backslashes, then a box whose content starts with a move, with whitespace allowed only
# around the commas. The content must match in full, so `\boxed{ R}`, `\boxed{R }`, `\boxed{r}`,
# `\boxed{}` and `\boxed{R,}` are not answers. Whitespace is `\s` (not just " ") because that is what
# the reference scorer behind ThinkMorph's numbers matches; method.md paraphrases it as "spaces".
_BOXED_MOVES = re.compile(r"\\{1,2}boxed\{([LRUD](?:\s*,\s*[LRUD])*)\}")


def extract_boxed_moves(text: str) -> list[str] | None:
    """Moves of the last *valid* `\\boxed{...}` in `text` (strict rule), or None if there is none.

    method.md: "take the last \\boxed{...} ... whose content is uppercase L/R/U/D moves separated by
    commas". We read "whose content is" as a filter on the boxes, not a check on the last box: a
    non-matching box (`\\boxed{ R}`, `\\boxed{}`, `\\boxed{x}`) is skipped and an earlier valid one
    counts. That is also what the reference scorer does (`re.findall(...)[-1]`).
    """
    # A JSON or Python string written as "\boxed" decodes "\b" to a backspace, leaving "\x08oxed".
    # The reference scorer repairs this too, so a model's answer is not lost to an escaping slip.
    text = text.replace("\x08", "\\b")
    matches = _BOXED_MOVES.findall(text)
    if not matches:
        return None
    return [m.strip() for m in matches[-1].split(",")]


def score_strict(grid: Grid, prediction: str) -> Verdict:
    """The strict rule (ThinkMorph's): the last valid `\\boxed{...}`, replayed exactly.

    Moving off the grid fails, entering a hole fails, and after all moves the player must stand on
    the goal: passing over the goal and moving on fails (coming back to it and ending there is
    fine). No valid box is wrong.
    """
    check_grid(grid)
    moves = extract_boxed_moves(prediction)
    if moves is None:
        return Verdict(False, "no valid \\boxed{...} of comma-separated L/R/U/D moves")
    n = len(grid)
    r, c = find_symbol(grid, PLAYER)
    for i, move in enumerate(moves, 1):
        dr, dc = MOVES[move]
        if not (0 <= r + dr < n and 0 <= c + dc < n):
            return Verdict(False, f"move {i} ({move}) leaves the grid from ({r}, {c})", tuple(moves))
        r, c = r + dr, c + dc
        if grid[r][c] == HOLE:
            return Verdict(False, f"move {i} ({move}) falls into the hole at ({r}, {c})", tuple(moves))
    goal = find_symbol(grid, GOAL)
    if (r, c) != goal:
        return Verdict(False, f"ends at ({r}, {c}), not on the goal at {goal}", tuple(moves))
    return Verdict(True, f"ends on the goal after {len(moves)} moves", tuple(moves))


PLAN_MARKERS = ("Action plan: ", "Action Plan: ")
# gym registers FrozenLake-v1 with a 100-step time limit; VSP's evaluator runs it through gym.make,
# so an episode still running after 100 steps is truncated without reward.
VSP_MAX_STEPS = 100


def extract_action_plan(text: str) -> list[str] | None:
    """The cleaned parts of the plan after the first `Action plan: ` (vsp rule), or None.

    As upstream: the first `Action plan: ` is used if there is one, else the first `Action Plan: `
    (so a lowercase-p marker wins even when a capitalised one comes earlier). The rest of the text
    is split on commas; quotes, periods and newlines are removed from each part and its outer
    whitespace stripped. Without a marker there is no plan (upstream then silently reads from
    character 12 of the text, a bug we do not reproduce: such answers are wrong).
    """
    for marker in PLAN_MARKERS:
        at = text.find(marker)
        if at >= 0:
            rest = text[at + len(marker) :]
            break
    else:
        return None
    parts = []
    for part in rest.split(","):
        for junk in ('"', "'", "\n", "."):
            part = part.replace(junk, "")
        parts.append(part.strip())
    return parts


def score_vsp(grid: Grid, prediction: str) -> Verdict:
    """The original VSP rule: replay the action plan with gym FrozenLake semantics.

    Parts are replayed in order: moving off the edge is a no-op, entering a hole loses, reaching
    the goal at any point wins and later parts are ignored. A part that is not exactly L/R/U/D,
    reached before the game ends, makes the answer wrong; so does never reaching the goal
    (including within gym's 100-step limit).
    """
    check_grid(grid)
    parts = extract_action_plan(prediction)
    if parts is None:
        return Verdict(False, "no 'Action plan: ' (or 'Action Plan: ') in the text")
    n = len(grid)
    r, c = find_symbol(grid, PLAYER)
    for i, part in enumerate(parts, 1):
        if i > VSP_MAX_STEPS:
            return Verdict(False, f"goal not reached within gym's {VSP_MAX_STEPS}-step limit", tuple(parts))
        if part not in MOVES:
            return Verdict(False, f"plan part {i} {part!r} is not one of L/R/U/D", tuple(parts))
        dr, dc = MOVES[part]
        if 0 <= r + dr < n and 0 <= c + dc < n:  # off the edge: gym leaves the player in place
            r, c = r + dr, c + dc
        if grid[r][c] == HOLE:
            return Verdict(False, f"move {i} ({part}) falls into the hole at ({r}, {c})", tuple(parts))
        if grid[r][c] == GOAL:
            return Verdict(True, f"reaches the goal at move {i}", tuple(parts))
    return Verdict(False, f"the plan ends at ({r}, {c}) without reaching the goal", tuple(parts))


RULES: dict[str, Callable[[Grid, str], Verdict]] = {"strict": score_strict, "vsp": score_vsp}


# --------------------------------------------------------------------------------------------
# The upstream folder layout

_LEVEL_DIR = re.compile(r"level(\d+)")


def parse_table(text: str, source: str = "<table>") -> list[str]:
    """The grid of a VSP markdown table; ValueError naming `source` and the line when malformed."""
    rows: list[str] = []
    width: int | None = None
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or set(line) <= set("|-: "):  # blank lines and markdown separator rows
            continue
        where = f"{source}:{lineno}"
        if not (line.startswith("|") and line.endswith("|")):
            raise ValueError(f"{where}: not a markdown table row: {raw!r}")
        cells = [cell.strip() for cell in line[1:-1].split("|")]
        if width is None:  # the header: "| | Col 1 | Col 2 | ..."
            if cells[0] != "" or cells[1:] != [f"Col {k}" for k in range(1, len(cells))]:
                raise ValueError(f"{where}: expected a header '| | Col 1 | Col 2 | ... |', got {raw!r}")
            width = len(cells) - 1
            continue
        if cells[0] != f"Row {len(rows) + 1}":
            raise ValueError(f"{where}: expected 'Row {len(rows) + 1}' first, got {cells[0]!r}")
        symbols = cells[1:]
        if len(symbols) != width:
            raise ValueError(f"{where}: expected {width} cells, got {len(symbols)}")
        bad = [s for s in symbols if s not in SYMBOLS]
        if bad:
            raise ValueError(f"{where}: bad cell {bad[0]!r}; allowed: {' '.join(SYMBOLS)}")
        rows.append("".join(symbols))
    if width is None:
        raise ValueError(f"{source}: empty table")
    problems = grid_problems(rows)
    if problems:
        raise ValueError(f"{source}: " + "; ".join(problems))
    return rows


def read_table(path: str | os.PathLike) -> list[str]:
    """Read and parse one `table/{i}.txt`; errors name the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such table file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read table: {e}") from None
    return parse_table(text, source=str(path))


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
    inside = None if allow_outside else root.resolve()
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
    # Imported here because the maze task imports this module for its grid format and scorers.
    from visual_opsd.data import MAX_IMAGE_PIXELS
    from visual_opsd.tasks.maze import resize_cells, sample_from_grid

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
        with Image.open(image_path) as im:
            w, h = im.size
            if not 0 < w * h <= MAX_IMAGE_PIXELS:
                raise ValueError(f"{w}x{h} pixels (allowed: 1..{MAX_IMAGE_PIXELS:,})")
            image = im.convert("RGB")
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


class VSPInputError(ValueError):
    """The inputs of `score vsp` are unusable as a whole (exit code 2)."""


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
