"""The labelled grid image: cells where they belong, headers above each column and beside each row, the caption."""

import numpy as np
from PIL import Image

from studio.evaluation.grids import MIN_CELL, draw_grid

COLOURS = [[(200, 30, 30), (30, 160, 40), (40, 60, 220)], [(240, 200, 20), (150, 40, 160), None]]


def cells():
    return [[Image.new("RGB", (64, 64), colour) if colour else None for colour in row] for row in COLOURS]


def ink(region: np.ndarray) -> int:
    """Dark (text) pixels in a region."""
    return int((region.max(axis=2) < 120).sum())


def test_cells_headers_and_caption_are_where_they_belong(artifacts):
    grid = draw_grid(cells(), ["Sampler: Euler", "Sampler: DDIM", "Sampler: DPM++ 2M Karras"],
                     ["Steps: 10", "Steps: 20"], caption="a red circle on a blue background, seed 7")
    grid.save(artifacts / "grid.png")
    pixels = np.asarray(grid)
    cell = MIN_CELL  # 64 px images are enlarged ×2 into 128 px cells
    left = grid.width - 3 * cell  # the row labels' column
    top = next(y for y in range(grid.height) if tuple(pixels[y, left + cell // 2]) == COLOURS[0][0])  # the headers'
    # every cell is its image's colour at its centre; the one that was not made is blank
    for row, colours in enumerate(COLOURS):
        for column, colour in enumerate(colours):
            centre = pixels[top + row * cell + cell // 2, left + column * cell + cell // 2]
            assert tuple(centre) == (colour or (255, 255, 255)), (row, column, centre)
    # a header above each column, a label left of each row, the caption under the cells
    for column in range(3):
        assert ink(pixels[:top, left + column * cell: left + (column + 1) * cell]) > 20
    for row in range(2):
        assert ink(pixels[top + row * cell: top + (row + 1) * cell, :left]) > 20
    assert ink(pixels[top + 2 * cell:, :]) > 20
    assert left > 0 and top > 0


def test_without_labels_or_caption_nothing_is_drawn_around_the_cells():
    grid = draw_grid(cells(), ["", "", ""], ["", ""])
    assert grid.size == (3 * MIN_CELL, 2 * MIN_CELL)
    assert ink(np.asarray(grid)) == 0


def test_long_labels_wrap_into_lines_inside_their_column():
    label = "Preset: a model with a very long name indeed, version two"
    short = draw_grid([[Image.new("RGB", (64, 64), "blue")] * 2], ["Seed: 1", "Seed: 2"], [""])
    long = draw_grid([[Image.new("RGB", (64, 64), "blue")] * 2], [label, label], [""])
    assert long.height >= short.height + 2 * 14  # more header lines
    pixels = np.asarray(long)
    header = long.height - MIN_CELL
    middle = MIN_CELL  # between the two columns: the wrapped labels leave a gap there
    assert ink(pixels[:header, middle - 2:middle + 2]) == 0
