"""X/Y/Z axes typed as A1111's X/Y/Z plot reads them: its documented range examples, errors, cells and their order."""

import pytest

from studio.core.errors import InvalidRequest
from studio.evaluation.axes import AXIS_TYPES, NO_AXIS, build_grid, parse_values, split_values

STEPS, CFG, SAMPLER, SIZE, PRESET = (AXIS_TYPES[name] for name in ("Steps", "CFG Scale", "Sampler", "Size", "Preset"))
CHOICES = {"scheduler": ["Euler", "Euler a", "DPM++ 2M Karras", "DDIM"], "preset": ["embedded", "sd-turbo", "sdxl"],
           "style": ["None", "Pixel art"]}


@pytest.mark.parametrize("axis, text, values", [
    # A1111's wiki (Features, X/Y/Z plot): its own examples of the range syntax
    (STEPS, "1-5", [1, 2, 3, 4, 5]),
    (STEPS, "1-5 (+2)", [1, 3, 5]),
    (STEPS, "10-5 (-3)", [10, 7]),
    (CFG, "1-3 (+0.5)", [1, 1.5, 2, 2.5, 3]),
    (STEPS, "1-10 [5]", [1, 3, 5, 7, 10]),
    (CFG, "0.0-1.0 [6]", [0, 0.2, 0.4, 0.6, 0.8, 1.0]),
    # the issue's
    (STEPS, "10-30 (+10)", [10, 20, 30]),
    (CFG, "5, 7.5", [5.0, 7.5]),
    # lists and ranges mixed, spaces, a range without a step on a decimal axis, steps that do not add up exactly
    (STEPS, " 8, 12-14 ,20", [8, 12, 13, 14, 20]),
    (CFG, "3-5", [3.0, 4.0, 5.0]),
    (CFG, "0.1-0.3 (+0.1)", [0.1, 0.2, 0.3]),
    (CFG, "-1.5, 2", [-1.5, 2.0]),
    (SIZE, "64x64, 96 x 64, 128×96", [(64, 64), (96, 64), (128, 96)]),
])
def test_a1111s_value_syntax(axis, text, values):
    assert parse_values(axis, text, CHOICES.get(axis.field, ())) == values


def test_choices_match_without_case_and_keep_their_spelling():
    assert parse_values(SAMPLER, "euler a, DPM++ 2M KARRAS", CHOICES["scheduler"]) == ["Euler a", "DPM++ 2M Karras"]
    assert split_values('"a, b", c') == ["a, b", "c"]  # a comma inside a value, as in a CSV line


@pytest.mark.parametrize("axis, text, message", [
    (STEPS, "2.5", "Steps: '2.5' is not a whole number or a range like 10-30 (+10)."),
    (STEPS, "30-10 (+10)", "Steps: '30-10 (+10)' gives no values (check the range's direction and step)."),
    (STEPS, "1-5 (+0)", "Steps: '1-5 (+0)' has a step of 0."),
    (STEPS, "1-1000000000000", "Steps: '1-1000000000000' gives 1,000,000,000,000 values, more than 1000; narrow the range."),
    (CFG, "0-1000000000 (+0.5)", "CFG Scale: '0-1000000000 (+0.5)' gives 2,000,000,001 values, more than 1000"),
    (STEPS, "1-5 [100000000000]", "gives 100,000,000,000 values"),
    (CFG, "1x5-3", "CFG Scale: '1x5-3' is not a number or a range like 5-7.5 (+0.5)."),
    (CFG, "seven", "CFG Scale: 'seven' is not a number or a range like 5-7.5 (+0.5)."),
    (SIZE, "64", "Size: '64' is not a size like 64x64 (width x height)."),
    (SAMPLER, "Euler, DPM fast", "Sampler: unknown value 'DPM fast'. Choose from: Euler, Euler a, DPM++ 2M Karras, DDIM."),
    (STEPS, " , ", "Steps: type at least one value."),
])
def test_bad_values_are_refused_naming_the_axis_and_value(axis, text, message):
    with pytest.raises(InvalidRequest) as refused:
        parse_values(axis, text, CHOICES.get(axis.field, ()))
    assert message in str(refused.value)


def test_the_grid_counts_and_lists_its_cells_x_fastest():
    grid = build_grid([("Sampler", "Euler, DDIM"), ("Steps", "10-30 (+10)"), (NO_AXIS, "")], CHOICES, max_cells=64)
    assert grid.shape == (2, 3, 1) and grid.cell_count == 6
    cells = grid.cells()
    assert [(cell.x, cell.y) for cell in cells] == [(0, 0), (1, 0), (0, 1), (1, 1), (0, 2), (1, 2)]
    assert cells[3].settings == (("scheduler", "DDIM"), ("steps", 20))
    assert grid.x.labels == ["Sampler: Euler", "Sampler: DDIM"]


def test_every_problem_is_said_at_once_and_the_size_is_limited():
    with pytest.raises(InvalidRequest) as refused:
        build_grid([("Sampler", "Euler, Nope"), ("Steps", "x"), ("Hair colour", "red")], CHOICES, max_cells=64)
    assert len(refused.value.problems) == 3 and "Unknown axis 'Hair colour'" in refused.value.problems[2]
    with pytest.raises(InvalidRequest, match="Steps is on two axes"):
        build_grid([("Steps", "10"), ("Steps", "20")], CHOICES, max_cells=64)
    with pytest.raises(InvalidRequest, match="That grid has 25 cells; the limit here is 16"):
        build_grid([("Steps", "1-5"), ("CFG Scale", "1-5")], CHOICES, max_cells=16)


def test_cells_run_grouped_by_preset_so_each_model_loads_once():
    """Presets on X and samplers on Y: reading order alternates presets every cell (A1111 would reload the model at
    each); the run order takes each preset's cells together, in the order the presets first appear."""
    grid = build_grid([("Preset", "sd-turbo, embedded, sdxl"), ("Sampler", "Euler, Euler a, DDIM, DPM++ 2M Karras")],
                      CHOICES, max_cells=64)

    def preset_of(cell):
        return cell.value("preset", "embedded")

    reading = [preset_of(cell) for cell in grid.cells()]
    assert sum(a != b for a, b in zip(reading, reading[1:])) == 11  # a switch between every two cells
    order = grid.run_order(preset_of)
    presets = [preset_of(cell) for cell in order]
    assert presets == ["sd-turbo"] * 4 + ["embedded"] * 4 + ["sdxl"] * 4
    assert [cell.y for cell in order[:4]] == [0, 1, 2, 3] and sorted(order, key=lambda c: (c.z, c.y, c.x)) == grid.cells()
