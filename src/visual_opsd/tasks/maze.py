"""Maze: VSP-style FrozenLake navigation, with the planned path drawn on the map as the visual thought.

A problem is an L x L frozen lake (grid symbols as VSP's tables: `@` elf start, `*` gift goal,
`#` hole, `_` ice) shown only as an image; the answer is a comma-separated move list such as
`R,D,D` (L/R/U/D), scored by the strict rule of `tasks/vsp_rules.py` unless asked otherwise.

- Generator: L uniform in `sizes` (default 3..8, as VSP), start and goal distinct and anywhere,
  every other cell a hole with probability p, p drawn per map from `hole_prob` (default 0.05..0.25:
  the six VSP example maps have 0-26% holes among their free cells, about 12% on average). Only
  solvable maps are kept. The split of a map is a function of the map itself (a hash of its grid
  string, 80/10/10), so train, val and test can never share a map whatever the seeds; maps are
  also distinct within a split.
- Answer: the BFS shortest path; among equally short paths, the one whose move string is
  lexicographically smallest under the order L < R < U < D (at each step the first move in that
  order that gets one step closer to the goal).
- Images: `render_maze` draws maps exactly as VSP's images were made, gym FrozenLake's
  `render_mode="rgb_array"` with gym's own sprites (vendored in `assets/frozenlake/`), at 64 px per
  cell: a VSP map's table renders pixel-identical to its image. Smaller `cell_px` shrinks each cell
  separately (area-averaging, `resize_cells`), so a cell's mean colour is the same at every size. The
  VT is the same map with the path as a red line through the cell centres and an arrowhead where it
  enters each cell.
- Reading images back: `read_grid` and `read_path_cells` classify each cell by its mean colour
  against the known mean colours of the tiles; they work down to 4 px per cell and are what VT
  fidelity is measured with.
- Texts are templated with a small vocabulary, words and punctuation separated by spaces, cells
  written `( row , column )` 0-indexed from the top left, so that a tiny word-level tokenizer fits.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.resources
import itertools
import random
import re
from collections import deque
from collections.abc import Iterable, Sequence

import numpy as np
from PIL import Image, ImageDraw

from visual_opsd.sample import Sample
from visual_opsd.tasks.base import Task, register
from visual_opsd.tasks.vsp_rules import (
    GOAL,
    HOLE,
    LAND,
    MOVES,
    PLAYER,
    RULES,
    Cell,
    Grid,
    extract_boxed_moves,
    find_symbol,
    grid_problems,
    score_strict,
)

MOVE_ORDER = ("L", "R", "U", "D")  # tie-break order of the BFS path
SPLITS = ("train", "val", "test")
DEFAULT_SIZES = (3, 8)
DEFAULT_HOLE_PROB = (0.05, 0.25)
TILE_PX = 64  # sprites are drawn at VSP's 64 px per cell, then resized
_MOVES_ANSWER = re.compile(r"[LRUD](?:,[LRUD])*")


# --------------------------------------------------------------------------------------------
# Grids, paths and splits


def split_of(grid: Grid) -> str:
    """The split a map belongs to, from a hash of its canonical text (80% train, 10% val, 10% test)."""
    digest = hashlib.sha256("\n".join(grid).encode("utf-8")).digest()
    bucket = int.from_bytes(digest[:8], "big") % 10
    return "train" if bucket < 8 else ("val" if bucket == 8 else "test")


def _neighbours(grid: Grid, cell: Cell) -> list[tuple[str, Cell]]:
    n = len(grid)
    out = []
    for move in MOVE_ORDER:
        dr, dc = MOVES[move]
        r, c = cell[0] + dr, cell[1] + dc
        if 0 <= r < n and 0 <= c < n and grid[r][c] != HOLE:
            out.append((move, (r, c)))
    return out


def shortest_path(grid: Grid, rng: random.Random | None = None) -> list[str] | None:
    """The BFS shortest move list from the elf to the gift, or None when the gift is unreachable.

    Ties: BFS from the goal gives every cell its distance; walking from the start, each step takes
    the first move in L, R, U, D order that lowers the distance by one. The result is the
    lexicographically smallest shortest path under L < R < U < D. With `rng`, each step instead
    takes one of those moves at random (uniformly): a random shortest path. Holes are never entered.
    """
    start, goal = find_symbol(grid, PLAYER), find_symbol(grid, GOAL)
    dist = {goal: 0}
    queue = deque([goal])
    while queue:
        cell = queue.popleft()
        for _, nxt in _neighbours(grid, cell):  # moves are reversible, so this is distance-to-goal
            if nxt not in dist:
                dist[nxt] = dist[cell] + 1
                queue.append(nxt)
    if start not in dist:
        return None
    moves, cell = [], start
    while cell != goal:
        closer = [(m, nxt) for m, nxt in _neighbours(grid, cell) if dist.get(nxt) == dist[cell] - 1]
        move, cell = closer[0] if rng is None else rng.choice(closer)
        moves.append(move)
    return moves


def path_cells(grid: Grid, moves: Sequence[str]) -> list[Cell]:
    """The cells visited by `moves` from the elf, start included; ValueError if it leaves the grid."""
    n = len(grid)
    cell = find_symbol(grid, PLAYER)
    cells = [cell]
    for i, move in enumerate(moves, 1):
        if move not in MOVES:
            raise ValueError(f"move {i} {move!r} is not one of L/R/U/D")
        dr, dc = MOVES[move]
        cell = (cell[0] + dr, cell[1] + dc)
        if not (0 <= cell[0] < n and 0 <= cell[1] < n):
            raise ValueError(f"move {i} ({move}) leaves the {n}x{n} grid")
        cells.append(cell)
    return cells


def _as_moves(path: str | Sequence[str]) -> list[str]:
    if isinstance(path, str):
        return [m.strip() for m in path.split(",") if m.strip()]
    return list(path)


def random_grid(rng: random.Random, size: int, hole_prob: float) -> list[str]:
    """An L x L map: elf and gift on two distinct random cells, other cells holes w.p. `hole_prob`.

    May be unsolvable; `generate` filters.
    """
    cells = [[HOLE if rng.random() < hole_prob else LAND for _ in range(size)] for _ in range(size)]
    start, goal = rng.sample(range(size * size), 2)
    cells[start // size][start % size] = PLAYER
    cells[goal // size][goal % size] = GOAL
    return ["".join(row) for row in cells]


# --------------------------------------------------------------------------------------------
# Rendering (gym FrozenLake's own sprites, composed as gym's `render_mode="rgb_array"` does)

_PATH_RED = (220, 30, 30)
_GRID_LINE = (180, 200, 230)  # gym's 1 px cell border
_LINE_HALF = 5  # the path line is 10 px wide at 64 px per cell
_START_DOT = 9  # radius of the dot marking where the path starts
_SIDES = ("L", "R", "U", "D")
# Sprites vendored from gymnasium 1.3.0 (assets/frozenlake/README.md says which and why only these).
_SPRITE_FILES = {"ice": "ice.png", "hole": "hole.png", "goal": "goal.png", "elf": "elf_down.png"}


@functools.cache
def _sprite(name: str) -> np.ndarray:
    """A FrozenLake sprite as (64, 64, 4) int64 RGBA, scaled the way gym scales it. Cached; read-only.

    gym loads the 32 px sprites with pygame and `pygame.transform.scale`s them to the cell size;
    at 64 px per cell that is an exact 2x pixel doubling, i.e. nearest-neighbour.
    """
    resource = importlib.resources.files("visual_opsd.tasks") / "assets" / "frozenlake" / _SPRITE_FILES[name]
    try:
        with resource.open("rb") as f, Image.open(f) as im:
            rgba = im.convert("RGBA").resize((TILE_PX, TILE_PX), Image.Resampling.NEAREST)
    except OSError as e:  # missing, unreadable or not an image
        raise FileNotFoundError(
            f"FrozenLake sprite {_SPRITE_FILES[name]} missing from visual_opsd/tasks/assets/frozenlake "
            f"(package data of visual-opsd; reinstall the package): {e}"
        ) from None
    out = np.asarray(rgba, np.int64)
    out.flags.writeable = False
    return out


def _blit(dst: np.ndarray, sprite: np.ndarray) -> np.ndarray:
    """`sprite` (RGBA) alpha-blended over `dst` (RGB) with pygame's integer formula, so that the
    half-transparent pixels of gym's sprites come out exactly as in gym's renders."""
    rgb, alpha = sprite[..., :3], sprite[..., 3:]
    return dst + (((rgb - dst) * alpha + rgb) >> 8)


@functools.cache
def _base_tile(symbol: str) -> Image.Image:
    """One 64 x 64 cell without path marks, as gym's `_render_gui` paints it. Cached; callers must
    not draw on the result.

    gym: ice on every cell; the hole or goal sprite over it (and a stool on the start, which the elf
    hides completely); a 1 px border; then the elf on the player's cell. VSP's `@` is both gym's
    start and the elf at reset, so the elf is drawn on `@`, facing down (gym's pose before any move).
    """
    if symbol not in (HOLE, PLAYER, GOAL, LAND):
        raise ValueError(f"unknown grid symbol {symbol!r}")
    tile = _sprite("ice")[..., :3].copy()
    if symbol == HOLE:
        tile = _blit(tile, _sprite("hole"))
    elif symbol == GOAL:
        tile = _blit(tile, _sprite("goal"))
    tile[[0, -1], :] = _GRID_LINE
    tile[:, [0, -1]] = _GRID_LINE
    if symbol == PLAYER:
        tile = _blit(tile, _sprite("elf"))
    return Image.fromarray(tile.astype(np.uint8), "RGB")


def _mark_polygons(side: str, entry: bool) -> list[list[tuple[float, float]]]:
    """Red shapes for a path leaving (or entering) a cell through `side`, in tile coordinates.

    Defined for the left side and mapped to the others by symmetry, so every direction paints
    the same area: a line half from the centre to the edge, plus an arrowhead on entry.
    """
    lo, hi = 31.5 - _LINE_HALF + 0.5, 31.5 + _LINE_HALF - 0.5
    shapes = [[(0, lo), (hi, lo), (hi, hi), (0, hi)]]  # half line, centre square included
    if entry:  # arrowhead midway between the edge and the centre, pointing inwards
        shapes.append([(3, 31.5 - 12), (3, 31.5 + 12), (23, 31.5)])
    last = TILE_PX - 1
    maps = {
        "L": lambda x, y: (x, y),
        "R": lambda x, y: (last - x, y),
        "U": lambda x, y: (y, x),
        "D": lambda x, y: (y, last - x),
    }
    return [[maps[side](x, y) for x, y in shape] for shape in shapes]


# A path mark on a cell: ("out", side) leaves through side, ("in", side) enters through it,
# ("start", "") is the dot where the path begins.
Mark = tuple[str, str]


@functools.cache
def _tile(symbol: str, marks: frozenset[Mark], cell_px: int) -> Image.Image:
    """A cell at `cell_px` with path marks drawn over it. Cached; callers must not draw on it."""
    tile = _base_tile(symbol)
    if marks:
        tile = tile.copy()
        d = ImageDraw.Draw(tile)
        for what, side in sorted(marks):
            if what == "start":
                c = 31.5
                d.ellipse((c - _START_DOT, c - _START_DOT, c + _START_DOT, c + _START_DOT), fill=_PATH_RED)
            else:
                for poly in _mark_polygons(side, entry=what == "in"):
                    d.polygon(poly, fill=_PATH_RED)
    return tile if cell_px == TILE_PX else _resize_cell(tile, cell_px)


def _resize_cell(cell: Image.Image, cell_px: int, box: tuple[int, int, int, int] | None = None) -> Image.Image:
    """`cell` (or its `box` region) as `cell_px` x `cell_px`: area-averaging when shrinking keeps the
    cell's mean colour; nearest when enlarging keeps the pixel art crisp."""
    w, h = (cell.width, cell.height) if box is None else (box[2] - box[0], box[3] - box[1])
    resample = Image.Resampling.BOX if cell_px <= min(w, h) else Image.Resampling.NEAREST
    return cell.resize((cell_px, cell_px), resample, box=box)


_OPPOSITE = {"L": "R", "R": "L", "U": "D", "D": "U"}


def render_maze(grid: Grid, path: str | Sequence[str] | None = None, cell_px: int = 64) -> Image.Image:
    """The map as an RGB image, `cell_px` pixels per cell; with `path` ("R,D" or a move list), the VT.

    The path is drawn over the sprites (a plan drawn on the map, as in ThinkMorph's VTs): a red dot
    on the elf, a red line through the cell centres, and an arrowhead in each cell it enters.
    """
    problems = grid_problems(grid)
    if problems:
        raise ValueError("cannot render an invalid grid: " + "; ".join(problems))
    if cell_px < 1:
        raise ValueError(f"cell_px must be at least 1, got {cell_px}")
    n = len(grid)
    marks: dict[Cell, set[Mark]] = {}
    if path is not None:
        moves = _as_moves(path)
        cells = path_cells(grid, moves)
        marks[cells[0]] = {("start", "")}
        for move, (a, b) in zip(moves, itertools.pairwise(cells), strict=True):
            marks.setdefault(a, set()).add(("out", move))
            marks.setdefault(b, set()).add(("in", _OPPOSITE[move]))
    image = Image.new("RGB", (n * cell_px, n * cell_px))
    for r, row in enumerate(grid):
        for c, symbol in enumerate(row):
            tile = _tile(symbol, frozenset(marks.get((r, c), ())), cell_px)
            image.paste(tile, (c * cell_px, r * cell_px))
    return image


def resize_cells(image: Image.Image, size: int, cell_px: int) -> Image.Image:
    """A picture of a `size` x `size` map (a VSP image, a render) as `cell_px` pixels per cell, RGB.

    Each cell is resized on its own, exactly as `render_maze` resizes its 64 px tiles (so a VSP
    image shrunk here equals our render of its table at `cell_px`), and cells never blend into their
    neighbours: one model patch per cell reads one cell. Cell boundaries are those of
    `cell_mean_colours` (rounded, for a side that is not a multiple of `size`).
    """
    if size < 1 or cell_px < 1:
        raise ValueError(f"size and cell_px must be at least 1, got size={size}, cell_px={cell_px}")
    image = image.convert("RGB")
    w, h = image.size
    if w < size or h < size:
        raise ValueError(f"a {w}x{h} image cannot hold a {size}x{size} grid")
    if (w, h) == (size * cell_px, size * cell_px):
        return image
    ys = np.linspace(0, h, size + 1).round().astype(int)
    xs = np.linspace(0, w, size + 1).round().astype(int)
    out = Image.new("RGB", (size * cell_px, size * cell_px))
    for r in range(size):
        for c in range(size):
            box = (int(xs[c]), int(ys[r]), int(xs[c + 1]), int(ys[r + 1]))
            out.paste(_resize_cell(image, cell_px, box), (c * cell_px, r * cell_px))
    return out


# --------------------------------------------------------------------------------------------
# Reading images back (for checking renders and measuring VT fidelity)

# The appearance of a path-marked cell of each kind, as drawn in a VT: a start leaves, a goal is
# entered, other cells are passed through. The direction does not change the painted area.
_MARKED_AS: dict[str, frozenset[Mark]] = {
    PLAYER: frozenset({("start", ""), ("out", "R")}),
    GOAL: frozenset({("in", "L")}),
    LAND: frozenset({("in", "L"), ("out", "R")}),
    HOLE: frozenset({("in", "L"), ("out", "R")}),
}


@functools.lru_cache(maxsize=1)
def _prototypes() -> tuple[str, np.ndarray, np.ndarray]:
    """Kinds, and the mean colours of each kind unmarked (K, 3) and path-marked (K, 3)."""
    kinds = "".join(_MARKED_AS)
    plain = np.stack([np.asarray(_tile(k, frozenset(), TILE_PX), np.float64).mean((0, 1)) for k in kinds])
    marked = np.stack([np.asarray(_tile(k, _MARKED_AS[k], TILE_PX), np.float64).mean((0, 1)) for k in kinds])
    return kinds, plain, marked


def cell_mean_colours(image: Image.Image, size: int) -> np.ndarray:
    """(size, size, 3) mean RGB colour of each cell of an image of a size x size map."""
    a = np.asarray(image.convert("RGB"), np.float64)
    h, w = a.shape[:2]
    if h < size or w < size:
        raise ValueError(f"a {w}x{h} image cannot hold a {size}x{size} grid")
    ys = np.linspace(0, h, size + 1).round().astype(int)
    xs = np.linspace(0, w, size + 1).round().astype(int)
    out = np.empty((size, size, 3))
    for r in range(size):
        for c in range(size):
            out[r, c] = a[ys[r] : ys[r + 1], xs[c] : xs[c + 1]].mean((0, 1))
    return out


def _fit_cells(means: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per cell and kind: the fraction f of expected path ink, and the distance to that mixture.

    A marked cell's mean colour is (1 - f) * plain + f * marked for its kind, f in [0, 1], since
    the red marks replace a fixed share of the tile. Returns f and residual, each (size, size, K).
    """
    _, plain, marked = _prototypes()
    x = means[:, :, None, :]  # (S, S, 1, 3)
    direction = marked - plain  # (K, 3)
    f = ((x - plain) * direction).sum(-1) / (direction * direction).sum(-1)
    f = np.clip(f, 0.0, 1.0)  # (S, S, K)
    fitted = plain + f[..., None] * direction  # (S, S, K, 3)
    residual = np.linalg.norm(x - fitted, axis=-1)
    return f, residual


def read_grid(image: Image.Image, size: int) -> list[str]:
    """The grid symbols of a rendered map (with or without path marks), from cell mean colours."""
    kinds, _, _ = _prototypes()
    _, residual = _fit_cells(cell_mean_colours(image, size))
    best = residual.argmin(-1)
    return ["".join(kinds[k] for k in row) for row in best]


def read_path_cells(image: Image.Image, size: int, grid: Grid | None = None) -> set[Cell]:
    """Cells of a VT image that carry path marks: more than half the expected red ink is present.

    With `grid` (the true map, as when scoring a generated VT against its sample) each cell is
    compared with its own kind's plain and marked appearance; without it the kind is read from the
    image first. VT fidelity = the fraction of cells where this agrees with the true path cells.
    """
    kinds, _, _ = _prototypes()
    f, residual = _fit_cells(cell_mean_colours(image, size))
    if grid is None:
        kind_index = residual.argmin(-1)
    else:
        problems = grid_problems(grid)
        if problems or len(grid) != size:
            raise ValueError(f"grid does not describe a {size}x{size} map: " + "; ".join(problems))
        kind_index = np.array([[kinds.index(ch) for ch in row] for row in grid])
    share = np.take_along_axis(f, kind_index[..., None], axis=-1)[..., 0]
    return {(int(r), int(c)) for r, c in zip(*np.nonzero(share > 0.5), strict=True)}


def vt_fidelity(image: Image.Image, grid: Grid, path: str | Sequence[str]) -> float:
    """Fraction of the map's cells where the path marks read from `image` agree with `path`.

    1.0 for a perfect VT; a VT with no marks scores 1 - (path cells) / (all cells).
    """
    n = len(grid)
    truth = set(path_cells(grid, _as_moves(path)))
    return 1.0 - len(truth ^ read_path_cells(image, n, grid)) / (n * n)


# --------------------------------------------------------------------------------------------
# Texts


def _cell(cell: Cell) -> str:
    return f"( {cell[0]} , {cell[1]} )"


def question_text(size: int) -> str:
    """The prompt; the map itself is only in the image."""
    return (
        f"The image shows a {size} x {size} frozen lake . Guide the elf to the gift without stepping "
        "into a hole . Each move goes one cell : L is left , R is right , U is up , D is down . "
        "A move off the lake or into a hole fails . Cells are ( row , column ) , from ( 0 , 0 ) at the top "
        "left . Give the moves in order , separated by commas , "
        "inside \\boxed{} , for example \\boxed{R,D,D} ."
    )


def _thoughts(grid: Grid, moves: Sequence[str]) -> list[str]:
    """The interleaved trace's text: what the map shows (elf, gift, holes), the VT that draws the
    plan, then the plan read off the drawn path in exactly the step lines of the text-only trace.

    The text-only trace (`_text_only_trace`) writes the same observations and the same step lines,
    worked out in text. So the two modes share their format and differ in where the steps come
    from: the drawn path (read after the VT here, or in the privileged teacher context) or text
    planning (the student's mode). Distillation then moves content, not format."""
    plan = f"{_observations(grid)} I will draw the path on the map ."
    return [plan, _step_lines(grid, moves)]


def _observations(grid: Grid) -> str:
    start, goal = find_symbol(grid, PLAYER), find_symbol(grid, GOAL)
    holes = [(r, c) for r, row in enumerate(grid) for c, ch in enumerate(row) if ch == HOLE]
    hole_text = f"The holes are at {' '.join(_cell(h) for h in holes)} ." if holes else "There are no holes ."
    return f"The elf is at {_cell(start)} and the gift is at {_cell(goal)} . {hole_text}"


def _step_lines(grid: Grid, moves: Sequence[str]) -> str:
    cells = path_cells(grid, moves)
    return " ".join(
        f"Step {i} : {m} to {_cell(cell)}{' , the gift' if i == len(moves) else ''} ."
        for i, (m, cell) in enumerate(zip(moves, cells[1:], strict=True), 1)
    )


def _text_only_trace(grid: Grid, moves: Sequence[str]) -> str:
    return f"{_observations(grid)} {_step_lines(grid, moves)}"


# --------------------------------------------------------------------------------------------
# Samples


PATHS = ("first", "random")


def sample_from_grid(grid: Grid, id: str, cell_px: int = 64, path: str = "first") -> Sample:
    """A maze sample for `grid`: problem image, VT (the planned path drawn), thoughts, traces, answer.

    `path`: which shortest path the traces and the VT follow. "first": the lexicographically smallest
    (`shortest_path`); "random": one drawn at random, the same for the same map (seeded by a hash of
    the map). With random paths the VT carries what the question alone does not determine (which of
    the equally short routes the trace takes), as an annotator's drawing does: a model must read the
    VT to follow it, and the privileged VT changes the teacher's predictions (docs/miniature.md)."""
    problems = grid_problems(grid)
    if problems:
        raise ValueError("invalid maze grid: " + "; ".join(problems))
    if path not in PATHS:
        raise ValueError(f"unknown path choice {path!r}; choose one of: {', '.join(PATHS)}")
    grid = list(grid)
    seed = hashlib.sha256(("path\n" + "\n".join(grid)).encode("utf-8")).hexdigest()
    moves = shortest_path(grid, random.Random(seed) if path == "random" else None)
    if moves is None:
        raise ValueError("the gift cannot be reached from the elf")
    answer = ",".join(moves)
    return Sample(
        id=id,
        task="maze",
        question=question_text(len(grid)),
        answer=answer,
        problem_images=[render_maze(grid, cell_px=cell_px)],
        vt_images=[render_maze(grid, moves, cell_px=cell_px)],
        thoughts=_thoughts(grid, moves),
        text_only_trace=_text_only_trace(grid, moves),
        metadata={
            "size": len(grid),
            "grid": grid,
            "start": list(find_symbol(grid, PLAYER)),
            "goal": list(find_symbol(grid, GOAL)),
            "path": answer,
        },
    )


def generate(
    n: int,
    seed: int,
    split: str = "train",
    sizes: tuple[int, int] = DEFAULT_SIZES,
    cell_px: int = 64,
    hole_prob: tuple[float, float] = DEFAULT_HOLE_PROB,
    exclude: Iterable[Sequence[str]] = (),
    path: str = "first",
) -> list[Sample]:
    """`n` distinct solvable maps of `split`, ids `maze-{split}-{k}`; deterministic in (seed, split).

    Maps are drawn one after another from a generator seeded by (seed, split) and kept when they
    belong to `split` (see `split_of`), are solvable and are new, so generate(m, ...) is a prefix of
    generate(n, ...) for m < n. Small sizes have few maps: after a bounded number of draws this
    raises RuntimeError instead of looping forever.

    `exclude`: grids never to produce. VSP's test maps come from the same distribution (there are
    only a few thousand likely 3x3 maps), so pass them here when training for a VSP evaluation.
    `path`: which shortest path each sample's traces and VT follow ("first" or "random", see
    `sample_from_grid`).
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of: {', '.join(SPLITS)}")
    lo, hi = sizes
    if not 2 <= lo <= hi:
        raise ValueError(f"sizes must satisfy 2 <= lo <= hi, got {sizes}")
    p_lo, p_hi = hole_prob
    if not 0.0 <= p_lo <= p_hi < 1.0:
        raise ValueError(f"hole_prob must satisfy 0 <= lo <= hi < 1, got {hole_prob}")
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    rng = random.Random(f"maze/{split}/{seed}")
    max_draws = 2000 + 300 * n  # ~10 draws per kept val/test map on average; generous margin
    seen = {"\n".join(grid) for grid in exclude}
    samples: list[Sample] = []
    for _ in range(max_draws):
        if len(samples) == n:
            break
        grid = random_grid(rng, rng.randint(lo, hi), rng.uniform(p_lo, p_hi))
        key = "\n".join(grid)
        if key in seen or split_of(grid) != split or shortest_path(grid) is None:
            continue
        seen.add(key)
        samples.append(sample_from_grid(grid, f"maze-{split}-{len(samples)}", cell_px=cell_px, path=path))
    if len(samples) < n:
        raise RuntimeError(
            f"found only {len(samples)} of {n} distinct solvable {split} maps of sizes {lo}..{hi} "
            f"in {max_draws} draws; ask for fewer samples or allow larger sizes"
        )
    return samples


@register
class MazeTask(Task):
    """VSP-style maze navigation; answers are move lists, scored by the strict rule by default."""

    name = "maze"

    def generate(self, n: int, seed: int, split: str = "train", **options) -> list[Sample]:
        return generate(n, seed, split, **options)

    def extract_answer(self, text: str) -> str | None:
        """The moves of the last valid `\\boxed{...}` as "R,D,D", or None (strict rule)."""
        moves = extract_boxed_moves(text)
        return None if moves is None else ",".join(moves)

    def is_correct(self, sample: Sample, prediction: str, rule: str = "strict") -> bool:
        """Whether `prediction` solves the sample's map under `rule` ("strict" or "vsp")."""
        grid = sample.metadata.get("grid")
        if rule not in RULES:
            raise ValueError(f"unknown rule {rule!r}; choose one of: {', '.join(RULES)}")
        if grid is None:
            # rows from image-only sources (ThinkMorph parquet) carry no grid to replay: the strict
            # rule's extraction must then give exactly the reference moves
            moves = extract_boxed_moves(prediction)
            return moves is not None and ",".join(moves) == sample.answer.replace(" ", "")
        return RULES[rule](grid, prediction).correct

    def validate(self, sample: Sample) -> list[tuple[str, str]]:
        grid = sample.metadata.get("grid")
        if grid is None:  # image-only rows (ThinkMorph parquet): only the answer can be checked
            if not isinstance(sample.answer, str) or not _MOVES_ANSWER.fullmatch(sample.answer):
                return [("answer", f"not a comma-separated list of L/R/U/D moves: {sample.answer!r}")]
            return []
        problems = [("metadata.grid", p) for p in grid_problems(grid)]
        if problems:
            return problems
        if shortest_path(grid) is None:
            return [("metadata.grid", "the gift cannot be reached from the elf")]
        meta = sample.metadata
        if "size" in meta and meta["size"] != len(grid):
            problems.append(("metadata.size", f"is {meta['size']!r} but the grid is {len(grid)}x{len(grid)}"))
        for key, symbol in (("start", PLAYER), ("goal", GOAL)):
            if key in meta and list(meta[key]) != list(find_symbol(grid, symbol)):
                problems.append((f"metadata.{key}", f"is {meta[key]!r} but the grid has {symbol!r} elsewhere"))
        if not isinstance(sample.answer, str) or not _MOVES_ANSWER.fullmatch(sample.answer):
            problems.append(("answer", f"not a comma-separated list of L/R/U/D moves: {sample.answer!r}"))
        else:
            verdict = score_strict(grid, f"\\boxed{{{sample.answer}}}")
            if not verdict.correct:
                problems.append(("answer", f"does not solve the map: {verdict.reason}"))
        if "path" in meta and meta["path"] != sample.answer:
            problems.append(("metadata.path", f"{meta['path']!r} differs from the answer {sample.answer!r}"))
        return problems
