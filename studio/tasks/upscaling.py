"""The Upscale tab's engine: an image made larger by an upscaler preset, tile by tile within the memory budget.

Like every tab's work it is planned on the CPU (`plan`), its files are fetched outside the device lock
(`model_files`), and its device work (`run`) leases the network from the one ModelManager, pass by pass, taking
turns with other jobs. Any scale from 1 to 8: the model's native passes until the image is at least that large,
then a Lanczos resize to the exact size, as A1111 does. Transparency is upscaled by the same model (as Real-ESRGAN
and A1111 do) and kept; greyscale stays greyscale, 16-bit stays 16-bit.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from studio.core.devices import format_bytes, release_memory
from studio.core.errors import InvalidRequest, OutOfMemoryBudget, StudioError
from studio.core.images import check_pixels
from studio.core.jobs import PREVIEW_SIDE, JobControl, LocalJob
from studio.core.memory import ModelManager
from studio.core.tiling import MIN_TILE, run_tiled
from studio.models.faces import NO_FACE_RESTORATION, FaceRestoration, FaceRestorerPreset
from studio.models.upscalers import ReleaseFiles, UpscalerCatalog, UpscalerPreset, upscaler_key

MIN_SCALE, MAX_SCALE = 1.0, 8.0
TILE_SIZES = (1024, 768, 512, 384, 256, 192, 128, 96, MIN_TILE)  # automatic tiling tries these, largest first
# a pass's tiles are shown filling in at most this often: each look is two PNGs (the slider's pair) the page's
# process encodes
PREVIEW_INTERVAL_S = 0.25
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


class Cancelled(StudioError):
    pass


@dataclass(frozen=True)
class UpscaleLimits:
    max_input_pixels: int = 16_000_000  # a 4000 x 4000 photo
    max_output_pixels: int = 64_000_000  # 8000 x 8000: the full-size result is held on the CPU

    @classmethod
    def public(cls) -> UpscaleLimits:
        """A shared demo: 1024² in, 4096² out."""
        return cls(max_input_pixels=1024 * 1024, max_output_pixels=4096 * 4096)


@dataclass(frozen=True)
class UpscaleRequest:
    upscaler: str
    scale: float = 4.0  # 1 to 8
    tile: int | None = None  # input pixels per tile side: None chooses from the memory budget, 0 never tiles
    denoise_strength: float = 0.5  # realesr-general-x4v3 only: 1 removes the most noise, 0 keeps it
    face_restoration: str = NO_FACE_RESTORATION  # a face restorer, run on the upscaled image
    face_visibility: float = 1.0  # A1111's: how much of the restored faces is blended in


@dataclass
class UpscalePlan:
    """A checked request and its input as arrays (picklable: it crosses ZeroGPU's process boundary)."""

    request: UpscaleRequest
    preset: UpscalerPreset
    rgb: np.ndarray  # H×W×3 float32 in [0, 1]
    alpha: np.ndarray | None  # H×W float32, when some pixel is transparent
    mode: str  # the output's PIL mode: "RGB", "RGBA", "L", "LA" or "I;16"
    size: tuple[int, int]  # the result's width, height
    parameters: str | None  # the input's own A1111 parameters, kept in the result as A1111's extras tab does
    key: object = None  # the model's ModelKey

    @property
    def passes(self) -> int:
        return passes_for(self.request.scale, self.preset.native_scale)

    face_restorer: FaceRestorerPreset | None = None

    @property
    def postprocessing(self) -> str:
        """A1111's extras text: `Postprocess upscale by: 4, Postprocess upscaler: R-ESRGAN 4x+` (and, after face
        restoration, `GFPGAN visibility: 1`)."""
        text = f"Postprocess upscale by: {self.request.scale:g}, Postprocess upscaler: {self.preset.written_name}"
        if self.face_restorer:
            text += f", {self.face_restorer.a1111_name} visibility: {self.request.face_visibility:g}"
        return text

    @property
    def gpu_seconds(self) -> int:
        """Output pixels of every pass (each pass works on the last one's output), 1 s per 200 k, + 10 s."""
        height, width = self.rgb.shape[:2]
        native = self.preset.native_scale
        work = sum(height * width * native ** (2 * (k + 1)) for k in range(self.passes))
        planes = 2 if self.alpha is not None and self.alpha.min() < 1 else 1
        faces = 15 if self.face_restorer else 0  # detection on the result, GFPGAN on each face
        return int(min(300, 10 + faces + work * planes / 200_000))


@dataclass
class UpscaleResult:
    image: Image.Image | None  # None when Stop ended the job
    tile: int  # the tile side the last pass used (0: none)
    warnings: list[str] = field(default_factory=list)
    interrupted: bool = False


def passes_for(scale: float, native: int) -> int:
    """Native passes that do not go beyond `scale` (at least one); a Lanczos resize does the rest. ×8 with a ×4
    model: one pass, then ×2; ×2 with it: one pass, then ×0.5. None for a plain resize."""
    if native <= 1:
        return 0
    return max(1, math.floor(math.log(scale) / math.log(native) + 1e-9))


def check_upscale(request: UpscaleRequest, catalog: UpscalerCatalog, faces: FaceRestoration | None = None) -> list[str]:
    problems = []
    if faces is not None:
        problems += faces.check(request.face_restoration)
    elif request.face_restoration != NO_FACE_RESTORATION:
        problems.append(f"Face restoration is not available here; use {NO_FACE_RESTORATION!r}.")
    if not 0 <= request.face_visibility <= 1:
        problems.append(f"Face visibility must be from 0 to 1 (got {request.face_visibility:g}).")
    if request.upscaler not in catalog.names:
        problems.append(f"Unknown upscaler {request.upscaler!r}. Available upscalers: {', '.join(catalog.names)}.")
    if not MIN_SCALE <= request.scale <= MAX_SCALE:
        problems.append(f"Scale must be from {MIN_SCALE:g} to {MAX_SCALE:g} (got {request.scale:g}).")
    if request.tile is not None and not isinstance(request.tile, int):  # not silently rounded: 100.5 is not 100
        problems.append(f"Tile size must be a whole number of pixels (got {request.tile:g}).")
    elif request.tile is not None and request.tile != 0 and request.tile < MIN_TILE:
        problems.append(f"A tile must be at least {MIN_TILE} pixels, or 0 for no tiling (got {request.tile}).")
    if not 0 <= request.denoise_strength <= 1:
        problems.append(f"Denoise strength must be from 0 to 1 (got {request.denoise_strength:g}).")
    return problems


def image_arrays(image: Image.Image) -> tuple[np.ndarray, np.ndarray | None, str]:
    """(RGB float32 in [0, 1], alpha or None, the output mode) for any PIL mode: palette and 1-bit images become
    RGB(A) or L, 16-bit greyscale keeps its precision."""
    if image.mode in SIXTEEN_BIT_MODES:
        values = np.asarray(image, dtype=np.float32)
        grey = values / (65535.0 if image.mode != "I" or values.max() > 255 else 255.0)
        return np.repeat(np.clip(grey, 0, 1)[..., None], 3, axis=2), None, "I;16"
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("1", "F"):
        image = image.convert("L")
    if image.mode in ("L", "LA"):
        grey = np.asarray(image.getchannel("L"), dtype=np.float32) / 255
        alpha = np.asarray(image.getchannel("A"), dtype=np.float32) / 255 if image.mode == "LA" else None
        return np.repeat(grey[..., None], 3, axis=2), alpha, image.mode
    has_alpha = image.mode in ("RGBA", "PA", "LA") or "A" in image.getbands()
    rgba = image.convert("RGBA" if has_alpha else "RGB")
    rgb = np.asarray(rgba.convert("RGB"), dtype=np.float32) / 255
    alpha = np.asarray(rgba.getchannel("A"), dtype=np.float32) / 255 if has_alpha else None
    return rgb, alpha, "RGBA" if has_alpha else "RGB"


def output_image(rgb: np.ndarray, alpha: np.ndarray | None, mode: str, size: tuple[int, int]) -> Image.Image:
    """The upscaled arrays as an image of the input's kind, resized (Lanczos) to exactly `size`."""
    def channel(values: np.ndarray) -> Image.Image:
        plane = Image.fromarray(values.astype(np.float32), mode="F")
        return plane if plane.size == size else plane.resize(size, Image.Resampling.LANCZOS)

    def quantised(plane: Image.Image, top: int, dtype) -> np.ndarray:
        return np.clip(np.asarray(plane) * top + 0.5, 0, top).astype(dtype)

    if mode == "I;16":
        grey = channel(rgb.mean(axis=2))
        return Image.fromarray(quantised(grey, 65535, np.uint16), mode="I;16")
    if mode in ("L", "LA"):
        planes = [quantised(channel(rgb.mean(axis=2)), 255, np.uint8)]
    else:
        planes = [quantised(channel(rgb[..., index]), 255, np.uint8) for index in range(3)]
    if alpha is not None:
        planes.append(quantised(channel(alpha), 255, np.uint8))
    return Image.fromarray(np.stack(planes, axis=2) if len(planes) > 1 else planes[0], mode=mode)


def working_memory(architecture: dict, height: int, width: int, dtype: torch.dtype) -> int:
    """Activations of one forward pass on a height×width input, from the architecture: the widest features at the
    input's resolution and at the output's (RRDBNet's dense blocks concatenate up to num_feat + 4 × num_grow_ch
    channels; its upsampling convolutions run at 2× and 4×). Measured against the CPU's peak in
    bench/upscale_tiling.py."""
    pixels, size = height * width, torch.finfo(dtype).bits // 8
    scale = int(architecture.get("scale", architecture.get("upscale", 4)))
    features = int(architecture.get("num_feat", 64))
    if architecture.get("arch", "RRDBNet") == "RRDBNet":
        low = 3 * (features + 4 * int(architecture.get("num_grow_ch", 32)))
        high = 3 * features * max(scale, 2) ** 2
    else:  # SRVGGNetCompact: a plain stack of convolutions at the input's resolution, then a pixel shuffle
        low = 3 * features
        high = 3 * 3 * scale**2
    return pixels * (low + high) * size


class Upscaling:
    """Plans and runs upscale requests on the shared ModelManager."""

    def __init__(self, manager: ModelManager, catalog: UpscalerCatalog, files: ReleaseFiles,
                 limits: UpscaleLimits | None = None, faces: FaceRestoration | None = None):
        self.manager = manager
        self.catalog = catalog
        self.files = files
        self.limits = limits or UpscaleLimits()
        self.faces = faces  # the face restorers whose files are present (None: no face restoration)

    # ----- CPU: the request checked and the input read -----

    def plan(self, image: Image.Image, request: UpscaleRequest) -> UpscalePlan:
        problems = check_upscale(request, self.catalog, self.faces)
        if problems:
            raise InvalidRequest(problems)
        restoring = request.face_restoration != NO_FACE_RESTORATION
        if restoring and image.mode in SIXTEEN_BIT_MODES:
            raise InvalidRequest(["Face restoration works on 8-bit colour images; this one is 16-bit greyscale. "
                                  f"Choose {NO_FACE_RESTORATION!r}, or convert it first."])
        check_pixels(image.size, "image", self.limits.max_input_pixels)
        problems = self.size_problems(image.size, request)
        if problems:
            raise InvalidRequest(problems)
        width, height = image.size
        size = (max(1, round(width * request.scale)), max(1, round(height * request.scale)))
        preset = self.catalog.get(request.upscaler)
        rgb, alpha, mode = image_arrays(image)
        plan = UpscalePlan(request, preset, rgb, alpha, mode, size, image.info.get("parameters"))
        if preset.is_model:
            plan.key = upscaler_key(preset, self.files, request.denoise_strength)
        if restoring:
            plan.face_restorer = self.faces.presets[request.face_restoration]
        return plan

    def size_problems(self, size: tuple[int, int], request: UpscaleRequest) -> list[str]:
        """The output-size limits for an input of `size` (Hires. fix checks them before any GPU work)."""
        width, height = size
        result = (max(1, round(width * request.scale)), max(1, round(height * request.scale)))
        if result[0] * result[1] > self.limits.max_output_pixels:
            return [f"{width}×{height} at ×{request.scale:g} would be {result[0]}×{result[1]}: more than "
                    f"{self.limits.max_output_pixels:,} pixels, the limit here. Choose a smaller scale or a smaller image."]
        preset = self.catalog.get(request.upscaler)
        passes = passes_for(request.scale, preset.native_scale)
        largest = int(height * width * max(preset.native_scale ** passes, request.scale) ** 2)
        if largest > self.limits.max_output_pixels:  # a ×4 pass of a ×1 request is 16× the pixels
            return [f"{preset.label} works at ×{preset.native_scale}: {width}×{height} would pass through "
                    f"{largest:,} pixels, more than {self.limits.max_output_pixels:,}, the limit here. Choose a smaller "
                    "image, or Lanczos."]
        return []

    @contextmanager
    def model_files(self, plan: UpscalePlan, on_progress=None) -> Iterator[UpscalePlan]:
        """The release files fetched and checked before any device work (a no-op for a folder or a resize); yields
        the plan, which needs nothing resolved."""
        self.fetch(plan.preset, plan.request.denoise_strength, on_progress)
        yield plan

    def fetch(self, preset: UpscalerPreset, denoise_strength: float = 1.0, on_progress=None) -> None:
        """A preset's release files fetched and checked (Hires. fix's too); nothing for a folder or a resize."""
        if preset.file:
            self.files.ensure(preset.file, on_progress)
            if preset.has_denoise and denoise_strength < 1:  # blends in the partner's weights
                self.files.ensure(preset.denoise_file, on_progress)

    # ----- device: passes of the network, tile by tile -----

    def run(self, plan: UpscalePlan, job: JobControl | None = None) -> UpscaleResult:
        job = job or LocalJob()
        warnings: list[str] = []
        rgb, alpha, tile = plan.rgb, plan.alpha, 0
        if plan.preset.is_model:
            planes = [rgb] + ([np.repeat(alpha[..., None], 3, axis=2)] if self._alpha_by_model(plan) else [])
            counter = ProgressCounter(job, plan.passes * len(planes))
            results = []
            try:
                for number, plane in enumerate(planes):
                    for _ in range(plan.passes):
                        if job.cancelled:
                            raise Cancelled("Stopped.")
                        # the colour's passes are shown as their tiles fill in (not the alpha's)
                        shown = TilesFillingIn(job, plane, plan.preset.native_scale) \
                            if number == 0 and job.wants_previews else None
                        plane, tile = self._one_pass(plan, plane, counter, warnings, shown)
                        counter.pass_done()
                    results.append(plane)
            except Cancelled:  # Stop: nothing half-upscaled is returned
                return UpscaleResult(None, tile, warnings, interrupted=True)
            rgb = results[0]
            if len(results) > 1:
                alpha = results[1].mean(axis=2)
        image = output_image(rgb, alpha, plan.mode, plan.size)
        if plan.face_restorer:
            if job.cancelled:
                return UpscaleResult(None, tile, warnings, interrupted=True)
            units = max(1, plan.passes) * ProgressCounter.UNIT  # Lanczos has no pass: still a non-empty bar
            job.report(units, units, f"Restoring faces ({plan.face_restorer.label})")
            image, faces = self._restore_faces(image, plan)
            if not faces:
                warnings.append(f"{plan.face_restorer.label} found no face in the image; it is only upscaled.")
        if plan.parameters:
            image.info["parameters"] = plan.parameters
        image.info["postprocessing"] = plan.postprocessing
        return UpscaleResult(image, tile, warnings)

    def upscale(self, image: Image.Image, request: UpscaleRequest, on_progress=None,
                cancel: threading.Event | None = None) -> UpscaleResult:
        """Plan, fetch and run in this process."""
        plan = self.plan(image, request)
        with self.model_files(plan, on_progress) as plan:
            return self.run(plan, LocalJob(on_progress, cancel))

    def _restore_faces(self, image: Image.Image, plan: UpscalePlan) -> tuple[Image.Image, int]:
        """The faces of the upscaled image restored in its colours; its transparency, or its greyness, kept."""
        rgb = np.asarray(image.convert("RGB"))
        restored, count = self.faces.restore(rgb, plan.face_restorer.name, plan.request.face_visibility)
        result = Image.fromarray(restored, mode="RGB")
        if image.mode in ("L", "LA"):
            result = result.convert("L")
        if "A" in image.getbands():
            result.putalpha(image.getchannel("A"))
        return result, count

    def _alpha_by_model(self, plan: UpscalePlan) -> bool:
        """A fully opaque alpha is only resized; any transparency goes through the model like the colours."""
        return plan.alpha is not None and plan.alpha.min() < 1

    def _one_pass(self, plan: UpscalePlan, plane: np.ndarray, counter: ProgressCounter,
                  warnings: list[str], shown: TilesFillingIn | None = None) -> tuple[np.ndarray, int]:
        """One native pass over `plane` (H×W×3), halving the tile on out of memory down to MIN_TILE."""
        height, width = plane.shape[:2]
        architecture = plan.preset.architecture
        multiple = size_multiple(architecture)
        tile = self._first_tile(plan, height, width)
        tile -= tile % multiple
        image = padded(torch.from_numpy(np.ascontiguousarray(plane.transpose(2, 0, 1)))[None], multiple)
        while True:
            needed = working_memory(architecture, *self._tile_shape(tile, height, width), self.manager.dtype)

            def network(piece: torch.Tensor, needed=needed) -> torch.Tensor:
                # each tile is one turn on the device, with the network leased for it alone: other visitors'
                # images go in between the tiles of a large upscale, as between the images of a batch
                with self.manager.turn(owner=counter.job.owner), \
                        self.manager.use({"upscaler": plan.key}, needed) as models:
                    return models["upscaler"](piece)

            try:
                upscaled = run_tiled(network, image, plan.preset.native_scale, tile, self.manager.device,
                                     self.manager.dtype, counter.tile_done, multiple, shown)
                break
            except (torch.OutOfMemoryError, OutOfMemoryBudget) as error:
                smaller = min(tile or max(height, width), max(height, width)) // 2
                if smaller < MIN_TILE:
                    release_memory(self.manager.device)
                    raise OutOfMemoryBudget(
                        f"Out of memory on {self.manager.device} upscaling {width}×{height}, even in tiles of "
                        f"{MIN_TILE} px (about {format_bytes(needed)} of working memory). Try a smaller image "
                        f"or scale. ({str(error).splitlines()[0] if str(error) else type(error).__name__})"
                    ) from None
                warnings.append(f"Out of memory with {'no tiling' if not tile else f'{tile} px tiles'}; "
                                f"tiles of {smaller} px were used instead.")
                tile = smaller - smaller % multiple  # the pass starts again; its progress with it
            release_memory(self.manager.device)
        scale = plan.preset.native_scale
        result = upscaled[0, :, : height * scale, : width * scale].clamp_(0, 1).permute(1, 2, 0).numpy()
        return result, tile

    def _first_tile(self, plan: UpscalePlan, height: int, width: int) -> int:
        """The request's tile, or the largest that fits the device's free memory (0 when the whole image does)."""
        if plan.request.tile is not None:
            return plan.request.tile
        status = self.manager.status()
        free = status.device_budget - status.device_used - status.reserved
        if not self.manager.is_loaded(plan.key):
            free -= self.manager.loaders[plan.key.kind].size(plan.key, self.manager.dtype)
        architecture = plan.preset.architecture
        if working_memory(architecture, height, width, self.manager.dtype) <= free:
            return 0
        for tile in TILE_SIZES:
            if tile < max(height, width) and working_memory(architecture, *self._tile_shape(tile, height, width),
                                                             self.manager.dtype) <= free:
                return tile
        return MIN_TILE  # the manager makes room or says why not

    @staticmethod
    def _tile_shape(tile: int, height: int, width: int) -> tuple[int, int]:
        return (min(tile, height), min(tile, width)) if tile else (height, width)


def size_multiple(architecture: dict) -> int:
    """What the input's sides must divide by: RRDBNet ×2 and ×1 fold pixels into channels (pixel unshuffle)."""
    scale = int(architecture.get("scale", architecture.get("upscale", 4)))
    return {1: 4, 2: 2}.get(scale, 1) if architecture.get("arch", "RRDBNet") == "RRDBNet" else 1


def padded(image: torch.Tensor, multiple: int) -> torch.Tensor:
    """Padded at the bottom and right to sides that divide by `multiple` (the extra output is cropped)."""
    height, width = image.shape[-2:]
    bottom, right = -height % multiple, -width % multiple
    if not (bottom or right):
        return image
    return torch.nn.functional.pad(image, (0, right, 0, bottom), mode="replicate")  # reflect fails on 1 px sides


class TilesFillingIn:
    """An upscale pass's live preview: the tiles made so far over the pass's input enlarged (bilinear), at most
    PREVIEW_SIDE a side, drawn from every few output pixels (a strided view: no full-size copy), at most every
    PREVIEW_INTERVAL_S."""

    def __init__(self, job: JobControl, plane: np.ndarray, scale: int):
        height, width = plane.shape[0] * scale, plane.shape[1] * scale
        self.job, self.stride = job, max(1, math.ceil(max(height, width) / PREVIEW_SIDE))
        self.size = (math.ceil(width / self.stride), math.ceil(height / self.stride))
        enlarged = Image.fromarray((np.clip(plane, 0, 1) * 255).round().astype(np.uint8)).resize(
            self.size, Image.Resampling.BILINEAR)
        self.base = torch.from_numpy(np.asarray(enlarged, dtype=np.float32) / 255).permute(2, 0, 1)
        self.shown_at = 0.0

    def __call__(self, output: torch.Tensor, weight: torch.Tensor) -> None:
        now = time.monotonic()
        if now - self.shown_at < PREVIEW_INTERVAL_S:
            return
        self.shown_at = now
        width, height = self.size
        made = output[0, :, ::self.stride, ::self.stride][:, :height, :width]
        weights = weight[0, :, ::self.stride, ::self.stride][:, :height, :width]
        shown = torch.where(weights > 0, made / weights.clamp_min(1e-12), self.base).clamp_(0, 1)
        self.job.show(Image.fromarray((shown.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()))


@dataclass
class ProgressCounter:
    """The job's progress over all passes (each pass one unit, its tiles fractions of it); stops the work when
    the job is cancelled."""

    job: JobControl
    passes: int
    done_passes: int = 0
    UNIT = 1000

    def tile_done(self, done: int, total: int) -> None:
        self.job.report(self.done_passes * self.UNIT + self.UNIT * done // total, self.passes * self.UNIT,
                        f"Pass {self.done_passes + 1}/{self.passes}, tile {done}/{total}")
        if self.job.cancelled:
            raise Cancelled("Stopped.")

    def pass_done(self) -> None:
        self.done_passes += 1
