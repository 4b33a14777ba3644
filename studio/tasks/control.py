"""Control units, as A1111's ControlNet extension offers them: a control image, a preprocessor, a ControlNet model,
its weight, the fraction of the steps it acts on, its control mode, how its map is fitted to the image's size, and
the preprocessor's resolution. A request carries up to `max_units` of them; each is checked with a message a user
can act on, then preprocessed on the CPU into the map its ControlNet reads, before any GPU work."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from studio.a1111.controlnet import ControlNetFields
from studio.core.downloads import HubDownloads, offline_error
from studio.core.errors import InvalidRequest, ModelUnavailable
from studio.core.images import prepare_image
from studio.models.controlnets import (
    BALANCED,
    CONTROL_MODES,
    PROMPT_MORE_IMPORTANT,
    ControlNetCatalog,
    ControlNetPreset,
    PassControls,
    UnitSettings,
    check_controlnet_fits,
    missing_controlnet_error,
)
from studio.models.presets import ModelPreset
from studio.tasks.preprocessors import PREPROCESSORS, preprocess

# a learned preprocessor's name -> a context giving the folder with its files (None for one without), kept from
# the download cache's eviction while the map is made
WeightsFor = Callable[[str], AbstractContextManager[Path | None]]


def no_weights(name: str) -> AbstractContextManager[None]:
    """WeightsFor where only preprocessors without learned weights run (training's sketches)."""
    return nullcontext(None)
JUST_RESIZE, CROP_AND_RESIZE, RESIZE_AND_FILL = "Just Resize", "Crop and Resize", "Resize and Fill"
RESIZE_MODES = (JUST_RESIZE, CROP_AND_RESIZE, RESIZE_AND_FILL)
MAX_WEIGHT = 2.0
MIN_PROCESSOR_RES, MAX_PROCESSOR_RES = 64, 2048


@dataclass(frozen=True)
class ControlUnit:
    """One ControlNet unit of a request. `image` None: the request's own image is the control image (Sketch to
    image and Inpaint: the sketch or picture itself)."""

    model: str
    image: Image.Image | None = None
    preprocessor: str = "none"
    weight: float = 1.0
    guidance_start: float = 0.0
    guidance_end: float = 1.0
    control_mode: str = "Balanced"
    resize_mode: str = CROP_AND_RESIZE
    pixel_perfect: bool = False
    processor_res: int = 512
    threshold_a: float | None = None  # the preprocessor's (None or -1: its default)
    threshold_b: float | None = None
    label: str = field(default="", compare=False)  # how messages name it (the form's "ControlNet unit 2")
    built_in: bool = field(default=False, compare=False)  # Sketch to image's own: not one of the form's units


@dataclass(frozen=True)
class PlannedControl:
    """A checked unit made ready for the device: its ControlNet and the map it reads at the generation's size.
    Picklable (it crosses into ZeroGPU's worker)."""

    preset: ControlNetPreset
    image: Image.Image  # the preprocessed map, fitted to the generation's size
    settings: UnitSettings
    fields: ControlNetFields  # for the PNG (the model's hash is added with the model files)


def check_control_units(units: tuple[ControlUnit, ...], preset: ModelPreset, catalog: ControlNetCatalog,
                        max_units: int, max_upload_pixels: int, own_image: bool = False) -> list[str]:
    """Problems with the units, each a sentence naming the unit. `own_image`: a unit without an image uses the
    request's own."""
    chosen = [unit for unit in units if not unit.built_in]  # the sketch ControlNet is not one of them
    if len(chosen) > max_units:
        return [f"At most {max_units} ControlNet unit(s) here (got {len(chosen)})."]
    problems = []
    for index, unit in enumerate(units):
        label = unit.label or f"ControlNet unit {index + 1}"
        if unit.model not in catalog:
            problems.append(f"{label}: unknown model {unit.model!r}. Available for {preset.label}: "
                            f"{', '.join(catalog.for_family(preset.family)) or 'none'}.")
        else:
            controlnet = catalog.get(unit.model)
            mismatch = check_controlnet_fits(controlnet, preset.family, preset.label)
            if mismatch:
                problems.append(f"{label}: {mismatch}")
            elif controlnet.control_types and controlnet.control_type_for(unit.preprocessor) is None:
                problems.append(f"{label}: {controlnet.label} reads a map by its kind and has none for the "
                                f"{unit.preprocessor!r} preprocessor; pick one of "
                                f"{', '.join(name for name, _ in controlnet.control_types)}.")
        if unit.preprocessor not in PREPROCESSORS:
            problems.append(f"{label}: unknown preprocessor {unit.preprocessor!r}. Available: "
                            f"{', '.join(PREPROCESSORS)}.")
        if unit.image is None and not own_image:
            problems.append(f"{label}: give it a control image (upload one).")
        elif unit.image is not None:
            if not isinstance(unit.image, Image.Image):
                problems.append(f"{label}: the control image could not be read as an image.")
            elif unit.image.width * unit.image.height > max_upload_pixels:
                problems.append(f"{label}: the control image is too large ({unit.image.width}×{unit.image.height}; "
                                f"at most {max_upload_pixels:,} pixels).")
        if not (0 <= unit.weight <= MAX_WEIGHT):
            problems.append(f"{label}: the weight must be between 0 and {MAX_WEIGHT:g} (got {unit.weight:g}).")
        if not (0 <= unit.guidance_start < unit.guidance_end <= 1):
            problems.append(f"{label}: guidance start and end must satisfy 0 <= start < end <= 1 (got "
                            f"{unit.guidance_start:g} and {unit.guidance_end:g}).")
        if unit.control_mode not in CONTROL_MODES:
            problems.append(f"{label}: control mode must be one of {', '.join(CONTROL_MODES)}.")
        if unit.resize_mode not in RESIZE_MODES:
            problems.append(f"{label}: resize mode must be one of {', '.join(RESIZE_MODES)}.")
        if not isinstance(unit.processor_res, int):
            problems.append(f"{label}: the preprocessor resolution must be a whole number (got {unit.processor_res:g}).")
        elif not (MIN_PROCESSOR_RES <= unit.processor_res <= MAX_PROCESSOR_RES):
            problems.append(f"{label}: the preprocessor resolution must be between {MIN_PROCESSOR_RES} and "
                            f"{MAX_PROCESSOR_RES} (got {unit.processor_res}).")
        problems += _threshold_problems(unit, label)
    return problems


def _threshold_problems(unit: ControlUnit, label: str) -> list[str]:
    preprocessor = PREPROCESSORS.get(unit.preprocessor)
    problems = []
    for value, threshold in ((unit.threshold_a, preprocessor and preprocessor.threshold_a),
                             (unit.threshold_b, preprocessor and preprocessor.threshold_b)):
        if value is None or value == -1 or threshold is None:
            continue
        if not (threshold.minimum <= value <= threshold.maximum):
            problems.append(f"{label}: {threshold.label} must be between {threshold.minimum:g} and "
                            f"{threshold.maximum:g} (got {value:g}).")
    return problems


def pixel_perfect_resolution(image: Image.Image, size: tuple[int, int], resize_mode: str) -> int:
    """A1111's pixel perfect: the preprocessor resolution at which its map needs no further scaling for the
    generation's size (sd-webui-controlnet, pixel_perfect_resolution)."""
    scale_h, scale_w = size[1] / image.height, size[0] / image.width
    scale = min(scale_h, scale_w) if resize_mode == RESIZE_AND_FILL else max(scale_h, scale_w)
    return int(round(scale * min(image.size)))


def fit_to_size(control_map: Image.Image, size: tuple[int, int], resize_mode: str) -> Image.Image:
    """The map at exactly `size`: stretched (Just Resize), scaled to cover and cut to the middle (Crop and
    Resize), or scaled to fit inside (Resize and Fill), the rest in the median colour of the map's border, as
    A1111 fills it (black around a line map: "no control"; a depth map's far grey around a depth map)."""
    width, height = size
    if control_map.size == size:
        return control_map
    if resize_mode == JUST_RESIZE:
        return control_map.resize(size, Image.Resampling.LANCZOS)
    cover = resize_mode == CROP_AND_RESIZE
    scale = (max if cover else min)(width / control_map.width, height / control_map.height)
    scaled = control_map.resize((max(1, round(control_map.width * scale)), max(1, round(control_map.height * scale))),
                                Image.Resampling.LANCZOS)
    canvas = Image.new("RGB", size, border_colour(control_map))
    canvas.paste(scaled, ((width - scaled.width) // 2, (height - scaled.height) // 2))
    return canvas


def border_colour(image: Image.Image) -> tuple[int, ...]:
    """The median colour of an image's outermost pixels (sd-webui-controlnet's fill for Resize and Fill)."""
    pixels = np.asarray(image.convert("RGB"))
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    return tuple(int(value) for value in np.median(border, axis=0))


def processor_resolution(unit: ControlUnit, image: Image.Image, size: tuple[int, int]) -> int:
    """The resolution the unit's preprocessor runs at: its own, or pixel perfect's for `size`."""
    return pixel_perfect_resolution(image, size, unit.resize_mode) if unit.pixel_perfect else unit.processor_res


def control_map(unit: ControlUnit, image: Image.Image, size: tuple[int, int], resolution: int,
                weights_for: WeightsFor = no_weights) -> Image.Image:
    """What the unit's ControlNet reads: `image` preprocessed at `resolution` and fitted to `size`."""
    with weights_for(unit.preprocessor) as weights:
        processed = preprocess(unit.preprocessor, image, max(MIN_PROCESSOR_RES, resolution), unit.threshold_a,
                               unit.threshold_b, weights)
    return fit_to_size(processed.convert("RGB"), size, unit.resize_mode)


def preview_map(unit: ControlUnit, image: Image.Image, max_upload_pixels: int,
                weights_for: WeightsFor = no_weights) -> Image.Image:
    """The unit's preprocessed map of `image`, as the form shows it before anything runs: at the unit's
    preprocessor resolution (pixel perfect's depends on the generation's size, fitted when it runs)."""
    if not isinstance(image, Image.Image):
        raise InvalidRequest(["The control image could not be read as an image."])
    if unit.preprocessor not in PREPROCESSORS:
        raise InvalidRequest([f"Unknown preprocessor {unit.preprocessor!r}. Available: {', '.join(PREPROCESSORS)}."])
    problems = _threshold_problems(unit, "The preprocessor")
    if problems:
        raise InvalidRequest(problems)
    resolution = min(MAX_PROCESSOR_RES, max(MIN_PROCESSOR_RES, round(unit.processor_res)))
    drawing = prepare_image(image, "control image", max_upload_pixels).rgb  # transparent areas: white paper
    with weights_for(unit.preprocessor) as weights:
        return preprocess(unit.preprocessor, drawing, resolution, unit.threshold_a, unit.threshold_b, weights)


def sketch_unit(catalog: ControlNetCatalog, family: str) -> ControlUnit | None:
    """Sketch to image's default unit for a family: its sketch ControlNet reading the drawing itself through the
    preprocessor the model was trained on; None where the family has none."""
    preset = catalog.for_sketches(family)
    if preset is None:
        return None
    return ControlUnit(model=preset.name, preprocessor=preset.preprocessor, label="The sketch ControlNet",
                       built_in=True)


def plan_controls(units: tuple[ControlUnit, ...], catalog: ControlNetCatalog, size: tuple[int, int],
                  own_image: Image.Image | None = None, weights_for: WeightsFor = no_weights,
                  made_maps: dict | None = None) -> tuple[PlannedControl, ...]:
    """The checked units as planned controls: each map made now, on the CPU. `made_maps`: maps already made for
    other plans of one job (Compare's cells), by what makes them, so a map is made once per job."""
    planned = []
    for unit in units:
        preset = catalog.get(unit.model)
        given = unit.image if unit.image is not None else own_image
        if given is None:
            raise InvalidRequest(["A ControlNet unit has no control image."])
        image = prepare_image(given, "control image").rgb  # a drawing's transparent areas are white paper
        preprocessor = PREPROCESSORS[unit.preprocessor]
        a, b = preprocessor.thresholds(unit.threshold_a, unit.threshold_b)
        resolution = processor_resolution(unit, image, size)
        fields = ControlNetFields(module=preprocessor.a1111_module, model=written_name(preset), weight=unit.weight,
                                  resize_mode=unit.resize_mode, processor_res=resolution, threshold_a=a,
                                  threshold_b=b, guidance_start=unit.guidance_start, guidance_end=unit.guidance_end,
                                  pixel_perfect=unit.pixel_perfect, control_mode=unit.control_mode)
        settings = UnitSettings(unit.weight, unit.guidance_start, unit.guidance_end, unit.control_mode,
                                control_type=preset.control_type_for(unit.preprocessor))
        recipe = (id(given), unit.preprocessor, a, b, resolution, unit.resize_mode, size)  # `given` lives on
        made = made_maps.get(recipe) if made_maps is not None else None
        if made is None:
            made = control_map(unit, image, size, resolution, weights_for)
            if made_maps is not None:
                made_maps[recipe] = made
        planned.append(PlannedControl(preset, made, settings, fields))
    return tuple(planned)


def control_notes(units: tuple[ControlUnit, ...], catalog: ControlNetCatalog) -> list[str]:
    """What a user should know of how the units will read their maps: a Union model given a map as it is reads it
    as the kind its preset names for "none" (a scribble), whatever the map shows."""
    notes = []
    for index, unit in enumerate(units):
        preset = catalog.get(unit.model) if unit.model in catalog else None
        if preset is not None and preset.control_types and unit.preprocessor == "none":
            notes.append(f"{unit.label or f'ControlNet unit {index + 1}'}: {preset.label} reads a map given as it "
                         f"is (preprocessor none) as a scribble map (its type {preset.control_type_for('none')}); "
                         "for a depth or edge map, pick the preprocessor of that kind and give it the photo.")
    return notes


def written_name(preset: ControlNetPreset) -> str:
    """The model's name in the PNG, as A1111 writes it: the file's or repo's name."""
    return preset.source.rstrip("/").rsplit("/", 1)[-1]


def pass_controls(controls: tuple[PlannedControl, ...], size: tuple[int, int],
                  hires: bool = False) -> PassControls | None:
    """What a denoising pass at `size` gives its units. Hires. fix's second pass: the maps at its size, and every
    unit soft-injected, as A1111 does there (a Balanced unit as "My prompt is more important")."""
    if not controls:
        return None
    images = tuple(control.image if control.image.size == size else
                   control.image.resize(size, Image.Resampling.LANCZOS) for control in controls)
    settings = tuple(replace(control.settings, control_mode=PROMPT_MORE_IMPORTANT)
                     if hires and control.settings.control_mode == BALANCED else control.settings
                     for control in controls)
    return PassControls(tuple(control.preset.key for control in controls), images, settings)


def control_call_arguments(image_argument: str, controls: PassControls) -> dict[str, Any]:
    """The ControlNet pipeline's arguments for the units: their maps, and weight 1 over the whole range for each,
    since ControlUnits applies each unit's own weight, range and mode."""
    count = len(controls.keys)
    return {image_argument: list(controls.images), "controlnet_conditioning_scale": [1.0] * count,
            "control_guidance_start": [0.0] * count, "control_guidance_end": [1.0] * count}


def controlnets_not_here(units: tuple[ControlUnit, ...], catalog: ControlNetCatalog, family: str,
                         downloads: HubDownloads, dtype: torch.dtype) -> list[str]:
    """Why the units' ControlNets cannot be had: a local folder missing, or not in the Hub cache while offline. A
    model of another family is refused as such (check_control_units): whether it is downloaded is moot."""
    problems = []
    for unit in units:
        if unit.model not in catalog or catalog.get(unit.model).family != family:
            continue
        controlnet = catalog.get(unit.model)
        if controlnet.local is not None and not controlnet.local.is_dir():
            problems.append(missing_controlnet_error(controlnet).reason)
        elif controlnet.local is None and downloads.is_offline() and not downloads.is_cached(
                controlnet.download_request(dtype)):
            problems.append(offline_error(controlnet.download_request(dtype)).reason)
    return problems


@contextmanager
def preprocessor_weights(name: str, catalog: ControlNetCatalog, downloads: HubDownloads) -> Iterator[Path | None]:
    """The folder with a learned preprocessor's files (None for one that needs none): a local folder, or the Hub
    cache, fetched now where the server may (offline and not cached: ModelUnavailable, naming the files), and kept
    from the cache's budget while the block runs."""
    preprocessor = PREPROCESSORS.get(name)
    if preprocessor is None or not preprocessor.needs_weights:
        yield None
        return
    weights = catalog.weights.get(name)
    if weights is None:
        raise ModelUnavailable(f"The {name} preprocessor's weights are not named in presets/controlnets.yaml "
                               "(preprocessor_weights).")
    if weights.local is not None:
        if not weights.local.is_dir():
            raise ModelUnavailable(f"The {name} preprocessor's weights are not here: {weights.local} does not exist.")
        yield weights.local
        return
    with downloads.in_use(weights.source):
        yield Path(downloads.ensure(weights.download_request()))


def preprocessors_not_here(units: tuple[ControlUnit, ...], catalog: ControlNetCatalog,
                           downloads: HubDownloads) -> list[str]:
    """Why the units' learned preprocessors cannot run: weights not named, a local folder missing, or not in the
    Hub cache while offline (said before any work, as a missing model is)."""
    problems = []
    for name in dict.fromkeys(unit.preprocessor for unit in units):
        preprocessor = PREPROCESSORS.get(name)
        if preprocessor is None or not preprocessor.needs_weights:
            continue
        weights = catalog.weights.get(name)
        if weights is None or weights.local is not None:
            try:
                with preprocessor_weights(name, catalog, downloads):
                    pass
            except ModelUnavailable as error:
                problems.append(error.reason)
        elif downloads.is_offline() and not downloads.is_cached(weights.download_request()):
            problems.append(f"The {name} preprocessor needs {', '.join(weights.files)} from {weights.repo}, which "
                            "is not downloaded, and this server is offline. Pick another preprocessor, or run "
                            "once with the Hub reachable.")
    return problems


def with_model_hashes(controls: tuple[PlannedControl, ...], hashes: list[str | None]) -> tuple[PlannedControl, ...]:
    return tuple(replace(control, fields=replace(control.fields, model_hash=model_hash))
                 for control, model_hash in zip(controls, hashes))


def unit_from_fields(fields: ControlNetFields, catalog: ControlNetCatalog) -> tuple[ControlUnit | None, str]:
    """A unit of the form from a PNG's fields, and a note ("" when all is well): the control image is not in a
    PNG, and a model this studio does not offer cannot be set."""
    preprocessor = next((p.name for p in PREPROCESSORS.values() if p.a1111_module == fields.module), None)
    model = next((preset.name for preset in catalog if written_name(preset) == fields.model or
                  preset.name == fields.model), None)
    if model is None:
        return None, f"The PNG's ControlNet model {fields.model!r} is not offered here."
    notes = []
    if preprocessor is None:  # the model's own then, never the raw image as its map
        preprocessor = catalog.get(model).preprocessor
        notes.append(f"The PNG's preprocessor {fields.module!r} is not offered here: {preprocessor!r} is set, the one "
                     f"{catalog.get(model).label} was trained on.")
    resolution = fields.processor_res
    if not MIN_PROCESSOR_RES <= resolution <= MAX_PROCESSOR_RES:  # A1111's API writes -1
        resolution = 512
    unit = ControlUnit(model=model, preprocessor=preprocessor, weight=fields.weight,
                       guidance_start=fields.guidance_start, guidance_end=fields.guidance_end,
                       control_mode=fields.control_mode if fields.control_mode in CONTROL_MODES else "Balanced",
                       resize_mode=fields.resize_mode if fields.resize_mode in RESIZE_MODES else CROP_AND_RESIZE,
                       pixel_perfect=fields.pixel_perfect, processor_res=resolution,
                       threshold_a=None if fields.threshold_a == -1 else fields.threshold_a,
                       threshold_b=None if fields.threshold_b == -1 else fields.threshold_b)
    return unit, " ".join(["The control image is not stored in a PNG: give it again.", *notes])


def is_blank(image: Image.Image) -> bool:
    """A map with nothing on it (a sketch preprocessed to all black)."""
    return not np.asarray(image.convert("L")).any()
