"""VSP's real maze images and our renders: the same pixels, the same patches, the same readings.

The six example maps (tests/data/vsp-examples, one per level 3..8) are gym FrozenLake renders at
64 px per cell. `render_maze` draws with gym's own sprites the way gym does, so the render of a
map's table must equal its image; loaded for a miniature model, every level must arrive as one patch
per cell and read back as its table.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path

import numpy as np
import pytest
from helpers import VSP_EXAMPLES
from PIL import Image

from visual_opsd.backends.mini import MiniBackend, fit_image, patchify
from visual_opsd.evaluate import _load_vsp
from visual_opsd.tasks.maze import (
    path_cells,
    read_grid,
    read_path_cells,
    render_maze,
    resize_cells,
    shortest_path,
    vt_fidelity,
)
from visual_opsd.tasks.vsp_rules import read_table
from visual_opsd.tokenizer import build_tokenizer, sample_texts
from visual_opsd.vsp import load_vsp_folder

LEVELS = range(3, 9)
ASSETS = Path(__file__).parent.parent / "src" / "visual_opsd" / "tasks" / "assets" / "frozenlake"


def _example(level: int) -> tuple[list[str], Image.Image]:
    """The table and the RGB image of the example map of `level` (index level + 10)."""
    index = level + 10
    grid = read_table(VSP_EXAMPLES / f"level{level}" / "table" / f"{index}.txt")
    with Image.open(VSP_EXAMPLES / f"level{level}" / "img" / f"{index}.png") as im:
        return grid, im.convert("RGB")


def _diff(a: Image.Image, b: Image.Image) -> np.ndarray:
    assert a.size == b.size
    return np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16))


# --------------------------------------------------------------------------------------------
# (a) The render of each table is its VSP image


@pytest.mark.parametrize("level", LEVELS)
def test_render_of_table_is_the_vsp_image(level):
    # Tolerance 0: both are the same integer computation (gym's 32 px sprites doubled by nearest
    # neighbour, pygame's integer alpha blend, a 1 px border), so any difference at all means the
    # renderer drew something else (a sprite, a blend, a border or an order that is not gym's).
    grid, image = _example(level)
    render = render_maze(grid)
    assert render.size == image.size == (64 * level, 64 * level)
    d = _diff(render, image)
    assert d.max() == 0, f"level {level}: max |diff| {d.max()}, mean {d.mean():.3f}"


def test_maps_tell_their_cells_apart():
    # The exact match above is not a property of any lake: another map of the same level differs.
    grid, image = _example(5)
    r, c = next((r, c) for r, row in enumerate(grid) for c, ch in enumerate(row) if ch == "_")
    holed = [row[:c] + "#" + row[c + 1 :] if i == r else row for i, row in enumerate(grid)]
    d = _diff(render_maze(holed), image)
    assert d[64 * r : 64 * (r + 1), 64 * c : 64 * (c + 1)].max() > 100
    d[64 * r : 64 * (r + 1), 64 * c : 64 * (c + 1)] = 0
    assert d.max() == 0  # only that cell differs


def test_sprites_ship_as_package_data():
    tomllib = pytest.importorskip("tomllib")
    pyproject = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text(encoding="utf-8"))
    patterns = pyproject["tool"]["setuptools"]["package-data"]["visual_opsd"]
    shipped = [p.relative_to(ASSETS.parent.parent.parent).as_posix() for p in ASSETS.iterdir()]
    assert {"tasks/assets/frozenlake/LICENSE", "tasks/assets/frozenlake/ice.png"} <= set(shipped)
    for name in shipped:
        assert any(fnmatch.fnmatch(name, p) for p in patterns), f"{name} is not package data"
    assert "MIT License" in (ASSETS / "LICENSE").read_text(encoding="utf-8")


# --------------------------------------------------------------------------------------------
# (b) Loaded for a miniature model: one patch per cell at every level, read back as the table


@pytest.fixture(scope="module")
def mini() -> MiniBackend:
    samples = load_vsp_folder(VSP_EXAMPLES)
    tok = build_tokenizer(sample_texts(samples))
    return MiniBackend.new(tok, seed=0, d_model=32, n_layers=1, n_heads=2, mlp_ratio=2.0, patch_size=4, max_grid=8)


def test_vsp_maps_reach_the_mini_model_as_one_patch_per_cell(mini):
    cell = mini.cell_px
    assert cell == 4
    samples = _load_vsp(str(VSP_EXAMPLES), cell)  # the evaluation's VSP loader, at the backend's cell size
    assert sorted(s.metadata["level"] for s in samples) == list(LEVELS)
    for s in samples:
        level, grid = s.metadata["level"], s.metadata["grid"]
        image = s.problem_images[0]
        fitted = fit_image(image, 4, 8)
        assert fitted.size == (4 * level, 4 * level), f"level {level}: {fitted.size}"
        pixels = mini.pixels(image)
        assert tuple(pixels.shape) == (3, 4 * level, 4 * level)
        assert patchify(pixels, 4).shape == (level * level, 3 * 4 * 4)  # L x L patches
        assert read_grid(fitted, level) == grid
        # VSP's image shrunk cell by cell is exactly our render at the same cell size, so the model
        # sees VSP maps as it saw its training maps.
        assert _diff(fitted, render_maze(grid, cell_px=4)).max() == 0
        assert s.vt_images[0].size == fitted.size


@pytest.mark.parametrize("level", LEVELS)
def test_fit_image_with_cells_gives_one_patch_per_cell(level):
    grid, image = _example(level)
    fitted = fit_image(image, 4, 8, cells=level)  # VSP's own 64 px-per-cell image
    assert fitted.size == (4 * level, 4 * level)
    assert read_grid(fitted, level) == grid
    # A picture whose side is not a multiple of the cell count (someone else's resize) still lands on
    # one patch per cell and reads back.
    odd = image.resize((61 * level + 3, 59 * level + 5), Image.Resampling.BILINEAR)
    assert fit_image(odd, 4, 8, cells=level).size == (4 * level, 4 * level)
    assert read_grid(fit_image(odd, 4, 8, cells=level), level) == grid
    with pytest.raises(ValueError, match="does not fit"):
        fit_image(image, 4, level - 1, cells=level)


@pytest.mark.parametrize("cell_px", [4, 8, 64])
def test_loader_resizes_each_cell(cell_px):
    for s in load_vsp_folder(VSP_EXAMPLES, cell_px=cell_px):
        level, grid = s.metadata["level"], s.metadata["grid"]
        assert s.problem_images[0].size == (cell_px * level, cell_px * level)
        assert _diff(s.problem_images[0], render_maze(grid, cell_px=cell_px)).max() == 0
        assert _diff(resize_cells(_example(level)[1], level, cell_px), s.problem_images[0]).max() == 0


# --------------------------------------------------------------------------------------------
# (c) VT renders of the example maps still read back their path


@pytest.mark.parametrize("cell_px", [64, 4])
@pytest.mark.parametrize("level", LEVELS)
def test_vt_render_reads_back_its_path(level, cell_px):
    grid, _ = _example(level)
    path = shortest_path(grid)
    truth = set(path_cells(grid, path))
    vt = render_maze(grid, path, cell_px=cell_px)
    assert read_path_cells(vt, level) == truth
    assert read_path_cells(vt, level, grid) == truth
    assert read_grid(vt, level) == grid  # the red marks do not hide what a cell is
    assert vt_fidelity(vt, grid, path) == 1.0
    plain = render_maze(grid, cell_px=cell_px)
    assert read_path_cells(plain, level, grid) == set()
    assert vt_fidelity(plain, grid, path) == pytest.approx(1 - len(truth) / level**2)


def test_loaded_vts_read_back_at_the_model_cell_size():
    for s in load_vsp_folder(VSP_EXAMPLES, cell_px=4):
        grid, moves = s.metadata["grid"], s.answer.split(",")
        vt = fit_image(s.vt_images[0], 4, 8)
        assert read_path_cells(vt, len(grid), grid) == set(path_cells(grid, moves))
