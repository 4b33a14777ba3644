"""The Compare tab's engine: one prompt run over up to three axes (A1111's X/Y/Z plot) as one job.

Its cells share one progress bar and one Stop (finished cells are kept), run grouped by model preset so each model
is loaded once, and take turns with other visitors' jobs image by image, as every text-to-image job does. Every
cell uses the same seed unless Seed is an axis. Each cell's image carries its full A1111 parameters; the grid is
drawn with its axis values as headers and the prompt underneath, one grid per Z value.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

from PIL import Image

from studio.a1111.prompts import plain_text
from studio.models.families import samplers_for
from studio.core.errors import InvalidRequest, StudioError
from studio.core.jobs import MAX_SECONDS, OVERHEAD_SECONDS, PREVIEW_SIDE, JobControl, LocalJob
from studio.evaluation.axes import CONTROL_AXIS_FIELDS, NO_AXIS, Cell, GridSpec, build_grid, value_text
from studio.evaluation.grids import MIN_CELL, draw_grid
from studio.evaluation.metrics import ClipScorer
from studio.tasks.generation import TextToImage, TextToImageRequest
from studio.tasks.hires import HiresFix
from studio.tasks.preprocessors import PREPROCESSORS
from studio.tasks.requests import GeneratedImage, ProgressCallback, resolve_seed
from studio.tasks.sampling import SamplingPlan

CLIP_SECONDS = 10  # scoring the cells (loading a ViT-L/14 the first time included)
# the grid's live preview is drawn at most this often: each drawing is also a PNG the page's process encodes
PREVIEW_INTERVAL_S = 0.25


@dataclass(frozen=True)
class CompareLimits:
    max_cells: int = 64

    @classmethod
    def public(cls) -> CompareLimits:
        return cls(max_cells=16)


@dataclass(frozen=True)
class CompareRequest:
    """One prompt, negative prompt, seed and base settings; up to three axes, each (type, values as typed)."""

    prompt: str
    negative_prompt: str = ""
    seed: int = -1  # -1: one random seed for every cell
    x_type: str = NO_AXIS
    x_values: str = ""
    y_type: str = NO_AXIS
    y_values: str = ""
    z_type: str = NO_AXIS
    z_values: str = ""
    base: TextToImageRequest | None = None  # the other settings (the default preset's defaults when None)
    controls: tuple = ()  # ControlNet units (studio.tasks.control.ControlUnit) of every cell; the ControlNet axes
    # set the first one's weight, guidance end or preprocessor


@dataclass
class ComparePlan:
    """The checked grid, a text-to-image plan per cell (picklable: it crosses ZeroGPU's process boundary)."""

    request: CompareRequest
    grid: GridSpec
    cells: list[Cell]  # in run order (grouped by preset)
    plans: list[SamplingPlan]  # the same order
    seed: int

    @property
    def total_steps(self) -> int:
        return sum(plan.total_steps for plan in self.plans)

    @property
    def gpu_seconds(self) -> int:
        """Each cell's own estimate without the new worker's allowance, which is booked once, and the scoring."""
        cells = sum(plan.gpu_seconds - OVERHEAD_SECONDS for plan in self.plans)
        return int(min(MAX_SECONDS, OVERHEAD_SECONDS + cells + CLIP_SECONDS))


@dataclass
class CellResult:
    cell: Cell
    image: GeneratedImage | None  # None: Stop came first, or the safety checker flagged it
    seconds: float
    clip_score: float | None = None


@dataclass
class CompareResult:
    plan: ComparePlan
    cells: list[CellResult] = field(default_factory=list)  # in reading order (x fastest, then y, then z)
    interrupted: bool = False
    warnings: list[str] = field(default_factory=list)
    clip_label: str | None = None  # which CLIP scored the cells

    def grids(self) -> list[Image.Image]:
        """One labelled grid per Z value (one in all without a Z axis), the prompt and seed underneath."""
        grid = self.plan.grid
        width, height, depth = grid.shape
        by_place = {(result.cell.x, result.cell.y, result.cell.z): result for result in self.cells}
        request = self.plan.request
        caption = f"{request.prompt}" + (f" | negative: {request.negative_prompt}" if request.negative_prompt else "")
        if not any(axis is not None and axis.type.field == "seed" for axis in grid.axes):
            caption += f" | seed {self.plan.seed}"
        pictures = []
        for z in range(depth):
            rows = [[_image(by_place.get((x, y, z))) for x in range(width)] for y in range(height)]
            title = f" | {grid.z.labels[z]}" if grid.z else ""
            pictures.append(draw_grid(rows, grid.x.labels if grid.x else [""] * width,
                                      grid.y.labels if grid.y else [""] * height, caption + title))
        return pictures


def _image(result: CellResult | None) -> Image.Image | None:
    return result.image.image if result and result.image else None


class CellJob(JobControl):
    """One cell's view of the grid's job: its steps counted after the cells before it, its text prefixed; its
    previews shown as the job's `part` (the Arena's side), or passed to `shown` (the Compare grid draws them in)."""

    def __init__(self, job: JobControl, done_before: int, total: int, label: str, part: int = 0,
                 shown: Callable[[Image.Image], None] | None = None, due: Callable[[], bool] | None = None):
        self.job, self.done_before, self.total, self.label = job, done_before, total, label
        self.part, self.shown, self.due = part, shown, due

    @property
    def cancelled(self) -> bool:
        return self.job.cancelled

    def report(self, done: int, total: int, text: str) -> None:
        self.job.report(self.done_before + min(done, total), self.total, f"{self.label}: {text}")

    def show(self, preview: Image.Image, part: int = 0) -> None:
        if self.shown is not None:
            self.shown(preview)
        else:
            self.job.show(preview, self.part)

    def preview_wanted_now(self) -> bool:
        return self.due() if self.due is not None else self.job.preview_wanted_now()

    @property
    def wants_previews(self) -> bool:
        return self.job.wants_previews

    @property
    def owner(self) -> object:
        return self.job.owner


class GridPreview:
    """The grid as it fills in, shown as the job's live preview: the finished cells and the running cell's preview
    in its place, under the grid's headers (the running cell's Z grid), each cell at most a few hundred pixels.
    Drawn at most every PREVIEW_INTERVAL_S (a preview comes every step), and when a cell is done."""

    def __init__(self, plan: ComparePlan, job: JobControl):
        self.plan, self.job = plan, job
        width, height, _ = plan.grid.shape
        self.cell_side = max(MIN_CELL, min(256, PREVIEW_SIDE // max(width, height)))
        self.made: dict[tuple[int, int, int], Image.Image] = {}
        self.shown_at = 0.0

    def forming(self, cell: Cell) -> Callable[[Image.Image], None]:
        """What `cell`'s previews are given to."""
        return lambda preview: self._draw(cell, preview, force=False)

    def due(self) -> bool:
        """Whether the grid would be drawn now (asked before a cell's preview is made)."""
        return time.monotonic() - self.shown_at >= PREVIEW_INTERVAL_S

    def finished(self, cell: Cell, image: Image.Image | None) -> None:
        if image is not None:
            self.made[(cell.x, cell.y, cell.z)] = self._fitted(image)
            self._draw(cell, None, force=True)

    def _fitted(self, image: Image.Image) -> Image.Image:
        scale = self.cell_side / max(image.size)
        return image.convert("RGB").resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                                           Image.Resampling.BILINEAR)

    def _draw(self, cell: Cell, preview: Image.Image | None, force: bool) -> None:
        now = time.monotonic()
        if not force and now - self.shown_at < PREVIEW_INTERVAL_S:
            return
        self.shown_at = now
        grid = self.plan.grid
        width, height, _ = grid.shape
        rows = [[self.made.get((x, y, cell.z)) for x in range(width)] for y in range(height)]
        if preview is not None:
            rows[cell.y][cell.x] = self._fitted(preview)
        self.job.show(draw_grid(rows, grid.x.labels if grid.x else [""] * width,
                                grid.y.labels if grid.y else [""] * height, grid.z.labels[cell.z] if grid.z else ""))


class Comparison:
    """Plans and runs X/Y/Z grids on the text-to-image engine (its presets, limits and the shared manager)."""

    def __init__(self, text_to_image: TextToImage, clip: ClipScorer | None = None, limits: CompareLimits | None = None):
        self.text_to_image = text_to_image
        self.manager = text_to_image.manager
        self.clip = clip
        self.limits = limits or CompareLimits()

    def choices(self) -> dict[str, list[str]]:
        """The values a choice axis may take, by request field."""
        presets = self.text_to_image.presets
        schedulers = sorted({name for preset in presets for name in samplers_for(preset)})
        return {"preset": list(presets.names), "scheduler": schedulers, "style": list(self.text_to_image.styles.names),
                "control_preprocessor": list(PREPROCESSORS)}

    def plan(self, request: CompareRequest) -> ComparePlan:
        """The grid checked, then every cell's request (raises InvalidRequest with each problem once, naming the
        first cell that has it)."""
        if not (request.prompt or "").strip():
            raise InvalidRequest(["Enter a prompt: describe the image you want."])
        grid = build_grid([(request.x_type, request.x_values), (request.y_type, request.y_values),
                           (request.z_type, request.z_values)], self.choices(), self.limits.max_cells)
        grid = self._seeds_resolved(grid)
        if not request.controls and any(axis is not None and axis.type.field in CONTROL_AXIS_FIELDS
                                        for axis in grid.axes):
            raise InvalidRequest(["A ControlNet axis varies the first ControlNet unit: enable one (with its control "
                                  "image) under ControlNet."])
        base_preset = self._base(request, None).preset
        seed = resolve_seed(request.seed)
        cells = grid.run_order(lambda cell: cell.value("preset", base_preset))
        plans, problems = [], {}
        made_maps: dict = {}  # a unit's map is made once for the cells that read it alike
        for cell in cells:
            # a cell on another preset starts from that preset's own defaults (size, steps, CFG, sampler)
            base = self._base(request, cell.value("preset"))
            cell_request = self._cell_request(replace(base, seed=seed), cell)
            found = self.text_to_image.problems(cell_request)
            for problem in found.values():
                problems.setdefault(problem, f"{problem} ({self._cell_name(grid, cell)})")
            if not found:
                plans.append(self.text_to_image.plan(cell_request, made_maps))
        if problems:
            raise InvalidRequest(list(problems.values()))
        return ComparePlan(request, grid, cells, plans, seed)

    @contextlib.contextmanager
    def model_files(self, plan: ComparePlan, on_progress: ProgressCallback | None = None) -> Iterator[ComparePlan]:
        """Every preset's files (and hash) fetched before any device work, once per preset; yields the grid with
        each cell's plan resolved."""
        with contextlib.ExitStack() as stack:
            seen: dict[tuple, SamplingPlan] = {}
            resolved = []
            for cell_plan in plan.plans:
                key = (cell_plan.preset.name, cell_plan.hires.settings.upscaler if cell_plan.hires else None)
                if key not in seen:
                    seen[key] = stack.enter_context(self.text_to_image.model_files(cell_plan, on_progress))
                    resolved.append(seen[key])
                else:  # the preset's files are there: only the cell's LoRAs and ControlNets' hashes (files read once)
                    # the preset's TAESD as its first cell has it (its fetch may have failed: Fast previews)
                    decoder = seen[key].preview_decoder if cell_plan.preview_decoder else None
                    with_hash = self.text_to_image.with_controls(replace(cell_plan, model_hash=seen[key].model_hash,
                                                                         preview_decoder=decoder), on_progress)
                    resolved.append(self.text_to_image.with_loras(with_hash, stack, on_progress))
            yield replace(plan, plans=resolved)

    def run(self, plan: ComparePlan, job: JobControl | None = None) -> CompareResult:
        """The cells in run order, each one image; Stop keeps the finished ones. CLIP scores at the end."""
        job = job or LocalJob()
        result = CompareResult(plan)
        done_before, total = 0, plan.total_steps
        preview = GridPreview(plan, job) if job.wants_previews else None
        for index, (cell, cell_plan) in enumerate(zip(plan.cells, plan.plans)):
            if job.cancelled:
                result.interrupted = True
                break
            began = time.perf_counter()
            label = f"Cell {index + 1}/{len(plan.cells)}"
            made = self.text_to_image.run(cell_plan, CellJob(job, done_before, total, label,
                                                             shown=preview.forming(cell) if preview else None,
                                                             due=preview.due if preview else None))
            done_before += cell_plan.total_steps
            result.warnings += made.warnings
            # an image Stop cut short, or a Hires. fix cell stopped before its second pass, is not the cell's result
            image = made.images[0] if made.images and not made.interrupted else None
            result.cells.append(CellResult(cell, image, time.perf_counter() - began))
            if preview:
                preview.finished(cell, image.image if image else None)
            if made.interrupted:
                result.interrupted = True
                break
        result.cells.sort(key=lambda item: (item.cell.z, item.cell.y, item.cell.x))
        scored = [item for item in result.cells if item.image]
        if self.clip is not None and scored:
            job.report(total, total, f"CLIP scores ({self.clip.label})")
            try:
                # the words alone: CLIP reads no weights, BREAKs or LoRA tags
                text = plain_text(plan.request.prompt)
                scores = self.clip.scores([item.image.image for item in scored], [text] * len(scored))
            except StudioError as error:  # the cells are kept, unscored
                result.warnings.append(f"The cells could not be scored: {str(error).splitlines()[0]}")
            else:
                for item, score in zip(scored, scores):
                    item.clip_score = score
                result.clip_label = self.clip.label
        result.warnings = list(dict.fromkeys(result.warnings))
        job.report(total, total, "Done")
        return result

    def compare(self, request: CompareRequest, on_progress: ProgressCallback | None = None,
                cancel=None) -> CompareResult:
        """Plan, fetch and run in this process."""
        plan = self.plan(request)
        with self.model_files(plan) as plan:
            return self.run(plan, LocalJob(on_progress, cancel))

    # ----- cells -----

    @staticmethod
    def _seeds_resolved(grid: GridSpec) -> GridSpec:
        """-1 on a Seed axis is a random seed, drawn now, as A1111 does, so the headers say the seed each cell used."""
        axes = []
        for axis in grid.axes:
            if axis is not None and axis.type.field == "seed":
                axis = replace(axis, values=tuple(resolve_seed(value) for value in axis.values))
            axes.append(axis)
        return GridSpec(*axes)

    def _base(self, request: CompareRequest, preset_name: str | None) -> TextToImageRequest:
        """The settings that are not on an axis: the request's own, or the preset's defaults (the cell's preset,
        else the default one)."""
        if request.base is not None:
            base = request.base
        else:
            base = TextToImageRequest.preset_defaults(
                self.text_to_image.presets.get(preset_name or self.text_to_image.presets.default))
        return replace(base, prompt=request.prompt, negative_prompt=request.negative_prompt or "",
                       seed=request.seed, batch_size=1, controls=tuple(request.controls) or base.controls)

    @staticmethod
    def _cell_request(base: TextToImageRequest, cell: Cell) -> TextToImageRequest:
        """The base request with the cell's settings: a size sets width and height, a hires setting switches
        Hires. fix on (with the base's other hires settings)."""
        fields = dict(cell.settings)
        if "size" in fields:
            fields["width"], fields["height"] = fields.pop("size")
        unit = {CONTROL_AXIS_FIELDS[name]: fields.pop(name) for name in list(fields) if name in CONTROL_AXIS_FIELDS}
        if "preprocessor" in unit:  # the form's thresholds are its preprocessor's: each cell's own defaults
            unit |= {"threshold_a": None, "threshold_b": None}
        if unit and base.controls:  # the first unit's setting (plan refuses a ControlNet axis without a unit)
            fields["controls"] = (replace(base.controls[0], **unit), *base.controls[1:])
        hires = {name: fields.pop(name) for name in ("hires_upscale", "denoising_strength") if name in fields}
        if hires:
            settings = base.hires or HiresFix()
            fields["hires"] = replace(settings, **({"upscale": hires["hires_upscale"]} if "hires_upscale" in hires
                                                   else {}),
                                      **({"denoising_strength": hires["denoising_strength"]}
                                         if "denoising_strength" in hires else {}))
        return replace(base, **fields)

    @staticmethod
    def _cell_name(grid: GridSpec, cell: Cell) -> str:
        return ", ".join(f"{axis.type.label}: {value_text(axis.values[index])}"
                         for axis, index in zip(grid.axes, (cell.x, cell.y, cell.z)) if axis is not None)
