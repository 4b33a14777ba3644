"""The axes of an X/Y/Z grid, typed as AUTOMATIC1111's X/Y/Z plot reads them (scripts/xyz_grid.py).

Values are comma-separated (a value with a comma in double quotes, as in a CSV line); a number axis also takes
A1111's ranges:

    1-5          1, 2, 3, 4, 5             whole numbers: every one, ends included
    1-5 (+2)     1, 3, 5                   with a step (10-5 (-3): 10, 7)
    1-10 [5]     1, 3, 5, 7, 10            that many, evenly spaced (whole numbers rounded down)
    1-3 (+0.5)   1, 1.5, 2, 2.5, 3         a decimal axis (CFG, denoising strength, hires upscale)
    0-1 [6]      0, 0.2, 0.4, 0.6, 0.8, 1

Every value is checked before anything runs, with a message that names the axis and the value. The grid's cells
run grouped by model preset, so each model is loaded once whichever axis the presets are on (A1111 orders its loops
by the axes' cost to the same end).
"""

from __future__ import annotations

import csv
import itertools
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from studio.core.errors import InvalidRequest

NO_AXIS = "Nothing"

# A1111's patterns (xyz_grid.py): "start-end (+step)" and "start-end [count]" (its "." escaped here: A1111's matches
# any character, so "1x5-3" was a range)
RANGE = re.compile(r"\s*([+-]?\s*\d+)\s*-\s*([+-]?\s*\d+)(?:\s*\(([+-]\d+)\s*\))?\s*")
RANGE_FLOAT = re.compile(r"\s*([+-]?\s*\d+(?:\.\d*)?)\s*-\s*([+-]?\s*\d+(?:\.\d*)?)(?:\s*\(([+-]\d+(?:\.\d*)?)\s*\))?\s*")
RANGE_COUNT = re.compile(r"\s*([+-]?\s*\d+)\s*-\s*([+-]?\s*\d+)(?:\s*\[(\d+)\s*])?\s*")
RANGE_COUNT_FLOAT = re.compile(r"\s*([+-]?\s*\d+(?:\.\d*)?)\s*-\s*([+-]?\s*\d+(?:\.\d*)?)(?:\s*\[(\d+(?:\.\d*)?)\s*])?\s*")
SIZE = re.compile(r"\s*(\d+)\s*[x×]\s*(\d+)\s*")
MAX_AXIS_VALUES = 1000  # a typo like 1-100000 is refused before it is expanded


@dataclass(frozen=True)
class AxisType:
    """What an axis varies: its label (A1111's where it has one), the request field it sets and the kind of value."""

    label: str
    field: str
    kind: str  # "int", "float", "size" (width × height) or "choice"


AXIS_TYPES = {axis.label: axis for axis in (
    AxisType("Preset", "preset", "choice"),  # A1111: "Checkpoint name"
    AxisType("Sampler", "scheduler", "choice"),
    AxisType("Steps", "steps", "int"),
    AxisType("CFG Scale", "guidance_scale", "float"),
    AxisType("Style", "style", "choice"),  # A1111: "Styles"
    AxisType("Seed", "seed", "int"),
    AxisType("Size", "size", "size"),
    AxisType("Denoising", "denoising_strength", "float"),  # Hires. fix's denoising strength
    AxisType("Hires upscale", "hires_upscale", "float"),
    # the first ControlNet unit's (A1111's sd-webui-controlnet adds these to the X/Y/Z plot)
    AxisType("[ControlNet] Weight", "control_weight", "float"),
    AxisType("[ControlNet] Guidance End", "control_guidance_end", "float"),
    AxisType("[ControlNet] Preprocessor", "control_preprocessor", "choice"),
)}
CONTROL_AXIS_FIELDS = {"control_weight": "weight", "control_guidance_end": "guidance_end",
                       "control_preprocessor": "preprocessor"}  # axis field -> the unit's field


@dataclass(frozen=True)
class Axis:
    type: AxisType
    values: tuple  # parsed and checked, in the order typed

    @property
    def labels(self) -> list[str]:
        """The values as the grid's headers show them ("Steps: 20", "Sampler: Euler a")."""
        return [f"{self.type.label}: {value_text(value)}" for value in self.values]


def value_text(value) -> str:
    if isinstance(value, tuple):
        return f"{value[0]}x{value[1]}"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def split_values(text: str) -> list[str]:
    """A1111's csv reading: commas separate, double quotes keep a comma inside a value; blanks are dropped."""
    rows = list(csv.reader([text or ""], skipinitialspace=True))
    return [value.strip() for value in (rows[0] if rows else []) if value.strip()]


def parse_values(axis: AxisType, text: str, choices: Sequence[str] = ()) -> list:
    """The axis's values from what was typed (ranges expanded); raises InvalidRequest naming the axis and value.
    A choice axis matches `choices` without regard to case and gives their spelling."""
    values: list = []
    typed = split_values(text)
    if not typed:
        raise InvalidRequest([f"{axis.label}: type at least one value."])
    for value in typed:
        expanded = _expand(axis, value, choices)
        if not expanded:
            raise InvalidRequest([f"{axis.label}: {value!r} gives no values (check the range's direction and step)."])
        values += expanded
        if len(values) > MAX_AXIS_VALUES:
            raise InvalidRequest([f"{axis.label}: more than {MAX_AXIS_VALUES} values; use fewer."])
    return values


def _count_of(start: float, end: float, step: float) -> int:
    """How many values a stepped range gives, counted before it is expanded (a typo must not fill the memory)."""
    return max(0, int((end - start) / step + 1e-9) + 1)


def _limited(axis: AxisType, value: str, count: int) -> None:
    if count > MAX_AXIS_VALUES:
        raise InvalidRequest([f"{axis.label}: {value!r} gives {count:,} values, more than {MAX_AXIS_VALUES}; narrow "
                              "the range."])


def _expand(axis: AxisType, value: str, choices: Sequence[str]) -> list:
    if axis.kind == "int":
        whole, counted = RANGE.fullmatch(value), RANGE_COUNT.fullmatch(value)
        if whole:
            start, end = _int(whole[1]), _int(whole[2])
            step = int(whole[3]) if whole[3] else 1
            if step == 0:
                raise InvalidRequest([f"{axis.label}: {value!r} has a step of 0."])
            _limited(axis, value, len(range(start, end + 1, step)))
            return list(range(start, end + 1, step))  # as A1111: end + 1 whatever the step's sign
        if counted and counted[3]:
            _limited(axis, value, int(counted[3]))
            return [int(x) for x in np.linspace(_int(counted[1]), _int(counted[2]), int(counted[3])).tolist()]
        try:
            return [int(value)]
        except ValueError:
            raise InvalidRequest([f"{axis.label}: {value!r} is not a whole number or a range like 10-30 (+10)."]) from None
    if axis.kind == "float":
        stepped, counted = RANGE_FLOAT.fullmatch(value), RANGE_COUNT_FLOAT.fullmatch(value)
        if stepped:  # A1111: np.arange(start, end + step, step), step 1 when none is given
            start, end = _float(stepped[1]), _float(stepped[2])
            step = float(stepped[3]) if stepped[3] else 1.0
            if step == 0:
                raise InvalidRequest([f"{axis.label}: {value!r} has a step of 0."])
            _limited(axis, value, _count_of(start, end, step))
            # A1111 keeps np.arange's overshoot (0.1-0.3 (+0.1) gives 0.4 there too); values past the end are dropped
            within = (lambda x: x <= end + 1e-9) if step > 0 else (lambda x: x >= end - 1e-9)
            # rounded: 0.1 steps add up to 0.30000000000000004, which would be a label and a setting
            return [round(x, 10) for x in np.arange(start, end + step, step).tolist() if within(x)]
        if counted and counted[3]:
            _limited(axis, value, int(float(counted[3])))
            return [round(x, 10) for x in np.linspace(_float(counted[1]), _float(counted[2]),
                                                      int(float(counted[3]))).tolist()]
        try:
            return [float(value)]
        except ValueError:
            raise InvalidRequest([f"{axis.label}: {value!r} is not a number or a range like 5-7.5 (+0.5)."]) from None
    if axis.kind == "size":
        size = SIZE.fullmatch(value)
        if not size:
            raise InvalidRequest([f"{axis.label}: {value!r} is not a size like 64x64 (width x height)."])
        return [(int(size[1]), int(size[2]))]
    matches = [choice for choice in choices if choice.lower() == value.lower()]
    if not matches:
        raise InvalidRequest([f"{axis.label}: unknown value {value!r}. Choose from: {', '.join(choices)}."])
    return [matches[0]]


def _int(text: str) -> int:
    return int(text.replace(" ", ""))


def _float(text: str) -> float:
    return float(text.replace(" ", ""))


@dataclass(frozen=True)
class Cell:
    """One cell of the grid: its place (x, y, z indices) and the settings it changes."""

    x: int
    y: int
    z: int
    settings: tuple[tuple[str, object], ...]  # (request field, value) of each axis

    def value(self, field: str, default=None):
        return dict(self.settings).get(field, default)


@dataclass(frozen=True)
class GridSpec:
    """Up to three axes; any may be missing. Cells are listed x fastest, then y, then z (the grid's reading order)."""

    x: Axis | None = None
    y: Axis | None = None
    z: Axis | None = None

    @property
    def axes(self) -> list[Axis | None]:
        return [self.x, self.y, self.z]

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(len(axis.values) if axis else 1 for axis in self.axes)  # type: ignore[return-value]

    @property
    def cell_count(self) -> int:
        x, y, z = self.shape
        return x * y * z

    def cells(self) -> list[Cell]:
        width, height, depth = self.shape
        cells = []
        for z, y, x in itertools.product(range(depth), range(height), range(width)):
            settings = tuple((axis.type.field, axis.values[index])
                             for axis, index in zip(self.axes, (x, y, z)) if axis is not None)
            cells.append(Cell(x, y, z, settings))
        return cells

    def run_order(self, preset_of: Callable[[Cell], str]) -> list[Cell]:
        """The cells grouped by the preset they use, in the order presets first appear, each group in reading order:
        a model is loaded once for all its cells, however the axes are arranged."""
        cells = self.cells()
        first_seen: dict[str, int] = {}
        for cell in cells:
            first_seen.setdefault(preset_of(cell), len(first_seen))
        return sorted(cells, key=lambda cell: first_seen[preset_of(cell)])  # sorted() is stable


def build_grid(axes: Sequence[tuple[str, str]], choices: dict[str, Sequence[str]], max_cells: int) -> GridSpec:
    """The grid from up to three (axis label, typed values) pairs (label NO_AXIS or "" = no axis), every value
    checked (`choices` by request field: presets, samplers, styles). Raises InvalidRequest with every problem."""
    problems, parsed = [], []
    used = set()
    for label, text in axes:
        if not label or label == NO_AXIS:
            parsed.append(None)
            continue
        if label not in AXIS_TYPES:
            problems.append(f"Unknown axis {label!r}. Axes: {', '.join([NO_AXIS, *AXIS_TYPES])}.")
            parsed.append(None)
            continue
        if label in used:
            problems.append(f"{label} is on two axes; put each setting on one axis.")
        used.add(label)
        axis_type = AXIS_TYPES[label]
        try:
            parsed.append(Axis(axis_type, tuple(parse_values(axis_type, text, choices.get(axis_type.field, ())))))
        except InvalidRequest as error:
            problems += error.problems
            parsed.append(None)
    if problems:
        raise InvalidRequest(problems)
    grid = GridSpec(*parsed, *([None] * (3 - len(parsed))))
    if grid.cell_count > max_cells:
        raise InvalidRequest([f"That grid has {grid.cell_count} cells; the limit here is {max_cells}. Use fewer "
                              "values."])
    return grid
