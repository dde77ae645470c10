"""Maze task: generator (solvable, split-disjoint, deterministic), BFS, rendering and reading back,
texts, scoring through the Task interface, and validation."""

import dataclasses
import itertools
import random
import re

import numpy as np
import pytest
from PIL import Image

from visual_opsd.tasks import get_task
from visual_opsd.tasks.maze import (
    MOVE_ORDER,
    MazeTask,
    cell_mean_colours,
    generate,
    path_cells,
    random_grid,
    read_grid,
    read_path_cells,
    render_maze,
    sample_from_grid,
    shortest_path,
    split_of,
    vt_fidelity,
)
from visual_opsd.tasks.vsp_rules import MOVES, score_strict


@pytest.fixture(scope="module")
def train():
    return generate(60, seed=0, split="train")


def _grid_key(sample):
    return "\n".join(sample.metadata["grid"])


# --------------------------------------------------------------------------------------------
# Generator


def test_registered():
    assert isinstance(get_task("maze"), MazeTask)


def test_samples_are_solvable_valid_and_complete(train):
    task = MazeTask()
    for k, s in enumerate(train):
        grid = s.metadata["grid"]
        n = len(grid)
        assert s.id == f"maze-train-{k}" and s.task == "maze"
        assert 3 <= n <= 8 and s.metadata["size"] == n
        assert s.answer == ",".join(shortest_path(grid)) == s.metadata["path"]
        assert grid[s.metadata["start"][0]][s.metadata["start"][1]] == "@"
        assert grid[s.metadata["goal"][0]][s.metadata["goal"][1]] == "*"
        assert task.validate(s) == []
        assert task.is_correct(s, s.answer_text())
        assert task.is_correct(s, s.interleaved_trace())
        assert task.is_correct(s, s.text_only_completion())
        assert len(s.problem_images) == len(s.vt_images) == 1 and len(s.thoughts) == 2
        assert s.problem_images[0].size == s.vt_images[0].size == (64 * n, 64 * n)


def test_split_disjoint_and_deduplicated():
    splits = {
        split: generate(n, seed=1, split=split, sizes=(3, 4))
        for split, n in (("train", 200), ("val", 40), ("test", 40))
    }
    keys = {split: [_grid_key(s) for s in samples] for split, samples in splits.items()}
    for split, ks in keys.items():
        assert len(set(ks)) == len(ks), f"duplicate maps within {split}"
        assert all(split_of(s.metadata["grid"]) == split for s in splits[split])
    for a, b in itertools.combinations(keys, 2):
        assert not set(keys[a]) & set(keys[b]), f"{a} and {b} share a map"
    # Structural: a different seed cannot make a val map appear in train.
    other_train = {_grid_key(s) for s in generate(200, seed=7, split="train", sizes=(3, 4))}
    assert not other_train & (set(keys["val"]) | set(keys["test"]))


def test_deterministic_and_prefix_stable(train):
    again = generate(60, seed=0, split="train")
    assert [_grid_key(s) for s in again] == [_grid_key(s) for s in train]
    assert again[5].vt_images[0].tobytes() == train[5].vt_images[0].tobytes()
    assert [_grid_key(s) for s in generate(10, seed=0, split="train")] == [_grid_key(s) for s in train[:10]]
    assert [_grid_key(s) for s in generate(10, seed=1, split="train")] != [_grid_key(s) for s in train[:10]]


def test_options():
    samples = generate(8, seed=3, split="val", sizes=(5, 5), cell_px=8, hole_prob=(0.0, 0.0))
    for s in samples:
        assert s.metadata["size"] == 5 and "#" not in "".join(s.metadata["grid"])
        assert s.problem_images[0].size == (40, 40)
    assert MazeTask().generate(3, seed=0, split="test", sizes=(4, 4))[0].id == "maze-test-0"
    with pytest.raises(ValueError, match="unknown split"):
        generate(1, 0, split="dev")
    with pytest.raises(ValueError, match="sizes"):
        generate(1, 0, sizes=(5, 3))
    with pytest.raises(ValueError, match="hole_prob"):
        generate(1, 0, hole_prob=(0.1, 1.0))


def test_hole_density_roughly_like_vsp(train):
    free = [(s.metadata["size"] ** 2 - 2, "".join(s.metadata["grid"]).count("#")) for s in train]
    density = sum(h for _, h in free) / sum(f for f, _ in free)
    assert 0.05 < density < 0.25  # the six VSP examples average about 12% holes among free cells


def test_exclude_grids():
    first = generate(5, seed=2, split="train", sizes=(3, 3))
    banned = [s.metadata["grid"] for s in first[:3]]
    again = generate(5, seed=2, split="train", sizes=(3, 3), exclude=banned)
    assert not {_grid_key(s) for s in again} & {"\n".join(g) for g in banned}


def test_too_few_distinct_maps_raises_instead_of_looping():
    with pytest.raises(RuntimeError, match="distinct solvable val maps"):
        generate(50, seed=0, split="val", sizes=(2, 2))


# --------------------------------------------------------------------------------------------
# Shortest paths


def _distances(grid):
    """Distance to the goal by plain relaxation (independent of the BFS under test)."""
    n = len(grid)
    goal = next((r, c) for r in range(n) for c in range(n) if grid[r][c] == "*")
    dist = {(r, c): float("inf") for r in range(n) for c in range(n) if grid[r][c] != "#"}
    dist[goal] = 0
    changed = True
    while changed:
        changed = False
        for (r, c), d in dist.items():
            for dr, dc in MOVES.values():
                nd = dist.get((r + dr, c + dc), float("inf")) + 1
                if nd < d:
                    dist[(r, c)], d, changed = nd, nd, True
    return dist


def _all_shortest_paths(grid):
    dist = _distances(grid)
    start = next((r, c) for r, row in enumerate(grid) for c, ch in enumerate(row) if ch == "@")
    if dist[start] == float("inf"):
        return []
    paths = []

    def walk(cell, moves):
        if dist[cell] == 0:
            paths.append(moves)
            return
        for m, (dr, dc) in MOVES.items():
            nxt = (cell[0] + dr, cell[1] + dc)
            if dist.get(nxt) == dist[cell] - 1:
                walk(nxt, moves + [m])

    walk(start, [])
    return paths


def test_bfs_path_is_shortest_and_lexicographically_first():
    rng = random.Random(0)
    order = {m: i for i, m in enumerate(MOVE_ORDER)}
    checked = 0
    for _ in range(300):
        grid = random_grid(rng, rng.randint(2, 5), 0.25)
        ours, every = shortest_path(grid), _all_shortest_paths(grid)
        if not every:
            assert ours is None
            continue
        checked += 1
        assert ours in every
        assert ours == min(every, key=lambda p: [order[m] for m in p])
        assert score_strict(grid, "\\boxed{" + ",".join(ours) + "}").correct
    assert checked > 100


def test_random_shortest_paths_are_shortest_varied_and_fixed_per_map():
    rng = random.Random(1)
    varied = 0
    for _ in range(200):
        grid = random_grid(rng, rng.randint(3, 5), 0.15)
        every = _all_shortest_paths(grid)
        if not every:
            continue
        s = sample_from_grid(grid, "x", cell_px=4, path="random")
        assert s.answer.split(",") in every and s.metadata["path"] == s.answer
        assert sample_from_grid(grid, "y", cell_px=4, path="random").answer == s.answer  # a function of the map
        varied += s.answer != ",".join(shortest_path(grid))
        # the VT draws the trace's path and the step lines follow it
        assert read_path_cells(s.vt_images[0], len(grid), grid) == set(path_cells(grid, s.answer.split(",")))
        assert s.thoughts[1] in s.text_only_trace
    assert varied > 20  # ties are common: "first" would give none of these
    with pytest.raises(ValueError, match="unknown path choice 'best'"):
        sample_from_grid(["@_", "_*"], "z", path="best")


def test_tie_break_documented_example():
    assert shortest_path(["@__", "___", "__*"]) == ["R", "R", "D", "D"]
    assert shortest_path(["__@", "___", "*__"]) == ["L", "L", "D", "D"]
    assert shortest_path(["@#_", "#__", "__*"]) is None


# --------------------------------------------------------------------------------------------
# Rendering and reading back


GRIDS = [
    ["__@#", "_#__", "____", "#_*_"],
    ["@____", "_##__", "_#*#_", "_____", "#___#"],
    ["____#_", "##____", "__#_#_", "_#____", "__*___", "_#__@#"],
]


@pytest.mark.parametrize("cell_px", [64, 8, 4, 10])
@pytest.mark.parametrize("grid", GRIDS)
def test_read_grid_round_trip(grid, cell_px):
    n = len(grid)
    plain = render_maze(grid, cell_px=cell_px)
    assert plain.size == (n * cell_px, n * cell_px) and plain.mode == "RGB"
    assert read_grid(plain, n) == grid
    path = shortest_path(grid)
    assert read_grid(render_maze(grid, path, cell_px=cell_px), n) == grid  # path marks do not confuse it


@pytest.mark.parametrize("cell_px", [64, 8, 4, 10])
@pytest.mark.parametrize("grid", GRIDS)
def test_read_path_cells_on_vts(grid, cell_px):
    n, path = len(grid), shortest_path(grid)
    vt = render_maze(grid, path, cell_px=cell_px)
    truth = set(path_cells(grid, path))
    assert read_path_cells(vt, n) == truth
    assert read_path_cells(vt, n, grid) == truth
    assert read_path_cells(render_maze(grid, cell_px=cell_px), n) == set()
    assert read_path_cells(render_maze(grid, cell_px=cell_px), n, grid) == set()


def test_read_path_cells_after_resizing_and_other_paths():
    grid = GRIDS[1]
    path = shortest_path(grid)
    big = render_maze(grid, path)
    small = big.resize((40, 40), Image.Resampling.BOX)  # a VT shrunk by someone else
    assert read_path_cells(small, 5, grid) == set(path_cells(grid, path))
    detour = ["D", "D", "D", "R", "R", "U"]
    assert read_path_cells(render_maze(grid, detour, cell_px=8), 5, grid) == set(path_cells(grid, detour))
    partial = render_maze(grid, path[:2], cell_px=8)  # a VT that stops early
    assert read_path_cells(partial, 5, grid) == set(path_cells(grid, path[:2]))


def test_vt_fidelity():
    grid = GRIDS[2]
    path = shortest_path(grid)
    n_path = len(path) + 1
    assert vt_fidelity(render_maze(grid, path, cell_px=4), grid, path) == 1.0
    assert vt_fidelity(render_maze(grid, cell_px=4), grid, ",".join(path)) == pytest.approx(1 - n_path / 36)


def test_cell_kinds_distinguishable_by_mean_colour_at_4px():
    # One cell of each kind, with and without marks; their mean colours must be well apart.
    grid = ["@_*", "_#_", "___"]
    plain = cell_mean_colours(render_maze(grid, cell_px=4), 3)
    vt = cell_mean_colours(render_maze(grid, ["R", "R"], cell_px=4), 3)
    colours = [plain[0, 0], plain[0, 2], plain[1, 0], plain[1, 1], vt[0, 0], vt[0, 1], vt[0, 2]]
    dists = [np.linalg.norm(a - b) for a, b in itertools.combinations(colours, 2)]
    assert min(dists) > 10


def test_vt_draws_red_only_on_path_cells():
    grid = GRIDS[0]
    path = shortest_path(grid)

    def red_cells(image):
        a = np.asarray(image, dtype=int)
        red = (a[..., 0] > 180) & (a[..., 1] < 60) & (a[..., 2] < 60)  # the path colour, no sprite's
        return {(r, c) for r in range(4) for c in range(4) if red[r * 64 : (r + 1) * 64, c * 64 : (c + 1) * 64].any()}

    assert red_cells(render_maze(grid, path)) == set(path_cells(grid, path))
    assert red_cells(render_maze(grid)) == set()


def test_render_rejects_bad_input():
    with pytest.raises(ValueError, match="invalid grid"):
        render_maze(["@_", "_"])
    with pytest.raises(ValueError, match="leaves"):
        render_maze(GRIDS[0], "R,R")
    with pytest.raises(ValueError, match="not one of"):
        render_maze(GRIDS[0], ["X"])


# --------------------------------------------------------------------------------------------
# Texts and scoring


_TOKEN = re.compile(r"[A-Za-z]+|\d+|[(),.:]")


def test_texts_are_templated_and_whitespace_tokenisable(train):
    for s in train[:20]:
        for text in [*s.thoughts, s.text_only_trace]:
            for token in text.split():
                assert _TOKEN.fullmatch(token), (token, text)
        assert "\\boxed{R,D,D}" in s.question and f"{s.metadata['size']} x {s.metadata['size']}" in s.question
    s = sample_from_grid(["@__", "_#_", "__*"], "x")
    assert s.answer == "R,R,D,D"
    # the interleaved trace: the observations, the drawn plan, then the plan's step lines read off it
    assert s.thoughts == [
        "The elf is at ( 0 , 0 ) and the gift is at ( 2 , 2 ) . The holes are at ( 1 , 1 ) . "
        "I will draw the path on the map .",
        "Step 1 : R to ( 0 , 1 ) . Step 2 : R to ( 0 , 2 ) . Step 3 : D to ( 1 , 2 ) . "
        "Step 4 : D to ( 2 , 2 ) , the gift .",
    ]
    assert s.text_only_trace == (
        "The elf is at ( 0 , 0 ) and the gift is at ( 2 , 2 ) . The holes are at ( 1 , 1 ) . "
        "Step 1 : R to ( 0 , 1 ) . Step 2 : R to ( 0 , 2 ) . Step 3 : D to ( 1 , 2 ) . "
        "Step 4 : D to ( 2 , 2 ) , the gift ."
    )
    assert "There are no holes ." in sample_from_grid(["@*", "__"], "y").text_only_trace
    assert s.interleaved_trace().endswith("<answer>\\boxed{R,R,D,D}</answer>")


def test_extract_answer_and_is_correct():
    task = MazeTask()
    s = sample_from_grid(["@__", "_#_", "__*"], "x")
    assert task.extract_answer("so \\boxed{R, R,D , D}") == "R,R,D,D"
    assert task.extract_answer("\\boxed{ R}") is None
    assert task.is_correct(s, "\\boxed{D,D,R,R}")
    assert not task.is_correct(s, "\\boxed{D,R}")
    assert not task.is_correct(s, "Action plan: U, R, R, D, D")
    assert task.is_correct(s, "Action plan: U, R, R, D, D", rule="vsp")
    with pytest.raises(ValueError, match="unknown rule"):
        task.is_correct(s, "x", rule="loose")


def test_validate_flags_broken_samples():
    task = MazeTask()
    good = sample_from_grid(["@__", "_#_", "__*"], "x")

    def broken(grid=None, answer=None, **meta):
        meta = {**good.metadata, **({"grid": grid} if grid is not None else {}), **meta}
        return dataclasses.replace(good, answer=answer or good.answer, metadata=meta)

    def fields(sample):
        return {f for f, _ in task.validate(sample)}

    assert task.validate(good) == []
    assert "square" in task.validate(broken(grid=["@__", "_#", "__*"]))[0][1]
    assert "bad symbol" in task.validate(broken(grid=["@_x", "___", "__*"]))[0][1]
    assert "2 start" in task.validate(broken(grid=["@_@", "___", "__*"]))[0][1]
    assert "0 goal" in task.validate(broken(grid=["@__", "___", "___"]))[0][1]
    assert "cannot be reached" in task.validate(broken(grid=["@#_", "#__", "__*"]))[0][1]
    assert fields(broken(answer="D,R,R,D")) == {"answer", "metadata.path"}  # through the hole
    assert fields(broken(answer="R,R,D")) == {"answer", "metadata.path"}
    assert "not a comma-separated" in task.validate(broken(answer="R R D D"))[0][1]
    assert fields(broken(size=4, start=[1, 1])) == {"metadata.size", "metadata.start"}
    # image-only rows (ThinkMorph parquet) have no grid: only the answer's form is checked, and
    # scoring compares the boxed moves with the reference answer
    gridless = dataclasses.replace(good, metadata={})
    assert task.validate(gridless) == []
    assert fields(dataclasses.replace(gridless, answer="R R")) == {"answer"}
    assert task.is_correct(gridless, f"\\boxed{{{good.answer}}}")
    assert not task.is_correct(gridless, "\\boxed{L}")
