"""VSP's maze rules, pure: the grid format, the markdown table it is stored in, and both scorers.

VSP (Visual Spatial Planning) task-main is 600 FrozenLake maps, levels 3..8 (an L x L grid). A table
file is a markdown grid:

    | | Col 1 | Col 2 | Col 3 |
    | Row 1 | _ | _ | _ |
    | Row 2 | @ | _ | # |
    | Row 3 | * | _ | _ |

with `@` the player (elf) start, `*` the goal (gift), `#` a hole and `_` land. In code a grid is a
list of row strings (`["___", "@_#", "*__"]`), rows top to bottom, columns left to right,
0-indexed. Moves are L/R/U/D.

Two scoring rules exist, and they disagree on real outputs (see `score_strict`, `score_vsp`;
docs/method.md section 5):
- strict: the rule behind ThinkMorph's reported numbers (the last valid `\\boxed{...}`; the player
  must end exactly on the goal). This is the default everywhere in visual-opsd.
- vsp: the original VSP evaluation (the text after `Action plan: `, replayed with gym semantics).

Nothing here reads folders or images: the loaders are in `visual_opsd.vsp` (the data layer).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
# the reference scorer behind ThinkMorph's numbers matches; docs/method.md section 5 says so.
_BOXED_MOVES = re.compile(r"\\{1,2}boxed\{([LRUD](?:\s*,\s*[LRUD])*)\}")


def extract_boxed_moves(text: str) -> list[str] | None:
    """Moves of the last *valid* `\\boxed{...}` in `text` (strict rule), or None if there is none.

    docs/method.md section 5: "take the last \\boxed{...} ... whose content is uppercase L/R/U/D
    moves separated by commas". We read "whose content is" as a filter on the boxes, not a check on the last box: a
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
