"""Inpainting (from a drawn mask or coloured sketch strokes) and sketch to image, on pipelines leased from
the shared ModelManager.

Whatever the input's mode and size, the model sees RGB at about its native pixel count; the result comes back
at the input's size, and every pixel outside the (blurred) mask is the input's own pixel, unchanged.
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass, replace

import numpy as np
from diffusers.image_processor import VaeImageProcessor
from PIL import Image, ImageChops

from studio.a1111.metadata import parse_float, parse_int, parse_parameters
from studio.a1111.prompts import parse_prompt
from studio.core.errors import InvalidRequest
from studio.core.images import PreparedImage, blur_mask, mask_box, prepare_image, prepare_mask, working_size
from studio.core.jobs import LocalJob
from studio.models.presets import ModelPreset
from studio.tasks.control import control_notes, plan_controls, sketch_unit
from studio.tasks.outpainting import FILLS, SIDES, Outpaint, extend, outpaint_problems
from studio.tasks.parameters import sampling_fields_from_parameters
from studio.tasks.requests import (
    GenerationResult,
    ProgressCallback,
    RequestLimits,
    SamplingRequest,
    check_sampling,
    flow_plan,
    fraction_problems,
    resolve_seed,
)
from studio.tasks.sampling import SamplingEngine, SamplingPlan
from studio.tasks.soft_inpainting import (
    SoftInpainting,
    composite_mask,
    soft_from_parameters,
    soft_parameters,
    soft_problems,
)
from studio.tasks.step_hooks import SoftBlend

WHOLE_PICTURE, ONLY_MASKED = "Whole picture", "Only masked"
INPAINT_AREAS = (WHOLE_PICTURE, ONLY_MASKED)
MAX_MASK_BLUR = 64
MAX_PADDING = 256
# Inpaint sketch: the brush colours of the Inpaint tab's palette, and the denoising strength it starts at (a sketch
# must survive, so it is only partly re-noised; inpainting models repaint best from noise)
SKETCH_COLOURS = ("#e41a1c", "#ff8c00", "#ffd700", "#2ca02c", "#1f5fe0", "#8a2be2", "#ff69b4", "#ffffff", "#111111",
                  "#808080")
SKETCH_STRENGTH = 0.75
PREVIEW_PICTURE_SIDE = 512  # a live preview shows the whole picture at most this large (it crosses to the page often)


@dataclass(frozen=True)
class MaskTools:
    """Brush radius, mask blur and padding for an image of a given size (in its pixels)."""

    brush_radius: int
    mask_blur: int
    padding: int


REFERENCE_SIDE = 512  # A1111's defaults (blur 4, padding 32) are for 512 px images


def mask_tools_for(size: tuple[int, int]) -> MaskTools:
    """Defaults that scale with the image: a brush radius of a twentieth of its shorter side (26 px on 512 px,
    about gradio's fixed 25; 3 px on 64 px, where 25 px masked half the image), blur and padding as A1111's at
    512 px, scaled."""
    side = max(1, min(size))
    scale = side / REFERENCE_SIDE
    return MaskTools(brush_radius=max(1, round(side / 20)), mask_blur=max(1, round(4 * scale)),
                     padding=min(MAX_PADDING, max(2, round(32 * scale))))


def sketch_mask(strokes: Image.Image) -> Image.Image:
    """Inpaint sketch's repaint mask: the painted strokes (white, or opaque in a transparent image) grown by one
    brush width of the image's size (twice mask_tools_for's radius).

    The strokes alone left ghosts: the stroke's outer edge stayed as drawn in the latent cells the pipeline counts
    as unmasked (it reads the mask once per cell, at the cell's corner) while the model, with no room around the
    sketched shape, drew it where it liked inside, often smaller: a bar and an outline beside the shape; and
    slivers of the old shape that the strokes just missed were pasted back unchanged, the model continuing them
    into the mask. The margin is repainted too, as the sketch's surroundings (docs/embedded-model.md, "A sketch
    over a shape")."""
    # imported here, not at the top: the engine then runs where scipy is not installed and no sketch is inpainted
    # (bench/gpu_check.py on GPU machines without scipy, whose 35 MB wheel cannot travel with the script)
    from scipy import ndimage

    painted = prepare_mask(strokes, strokes.size)
    if not painted.any():
        return Image.fromarray(painted.astype(np.uint8) * 255, mode="L")
    margin = 2 * mask_tools_for(strokes.size).brush_radius
    grown = ndimage.distance_transform_edt(~painted) <= margin
    return Image.fromarray(grown.astype(np.uint8) * 255, mode="L")


@dataclass(frozen=True)
class InpaintRequest(SamplingRequest):
    """Settings of an inpaint, inpaint-sketch or sketch-to-image request (the image and mask come apart)."""

    strength: float = 1.0  # denoising strength: 1 repaints from noise, lower keeps more of what is there
    mask_blur: int = 4
    inpaint_area: str = WHOLE_PICTURE  # or ONLY_MASKED: crop around the mask, inpaint at full resolution
    padding: int = 32  # around the mask, for ONLY_MASKED
    # Sketch to image: also guide with the preset family's sketch ControlNet (presets/controlnets.yaml's
    # for_sketches), reading the drawing itself; the form and the API turn it on
    sketch_controlnet: bool = False
    outpaint: Outpaint | None = None  # grow the canvas and fill the new area (Inpaint mode only)
    soft: SoftInpainting | None = None  # soft inpainting (None: off): the blurred mask is kept, not thresholded


def check_inpaint(request: InpaintRequest, preset: ModelPreset, limits: RequestLimits) -> dict[str, str]:
    problems = check_sampling(request, preset, limits)
    fractions = fraction_problems(request, {"mask_blur": "Mask blur", "padding": "Padding"})
    if fractions:
        return problems | fractions  # the range checks below assume whole numbers
    if not (0 < request.strength <= 1):
        problems["strength"] = f"Denoising strength must be above 0 and at most 1 (got {request.strength:g})."
    elif "steps" not in problems and int(request.steps * request.strength) < 1:
        problems["strength"] = (f"Steps × denoising strength must be at least 1 ({request.steps} × "
                                f"{request.strength:g} leaves no step): raise one of them.")
    if not (0 <= request.mask_blur <= MAX_MASK_BLUR):
        problems["mask_blur"] = f"Mask blur must be between 0 and {MAX_MASK_BLUR} pixels (got {request.mask_blur})."
    if request.inpaint_area not in INPAINT_AREAS:
        problems["inpaint_area"] = f"Inpaint area must be one of {', '.join(INPAINT_AREAS)} (got {request.inpaint_area!r})."
    if not (0 <= request.padding <= MAX_PADDING):
        problems["padding"] = f"Padding must be between 0 and {MAX_PADDING} pixels (got {request.padding})."
    if request.outpaint is not None:
        problems |= outpaint_problems(request.outpaint, None, None)
    if request.soft is not None:
        problems |= soft_problems(request.soft)
    return problems


def canvas_limit(preset: ModelPreset, limits: RequestLimits) -> tuple[int, str]:
    """The most pixels an outpainted canvas may have, and whose limit that is: what the preset renders at its
    largest (its max size squared), unless the server's limits (a public demo's pixel cap, the upload limit) are
    lower."""
    server = min(limits.max_pixels or limits.max_upload_pixels, limits.max_upload_pixels)
    if server < preset.max_size**2:
        return server, "this server's limit"
    return preset.max_size**2, f"the limit for {preset.label} ({preset.max_size}×{preset.max_size})"


@dataclass
class Finishing:
    """What putting an inpainted image back together needs; it stays in the main process (CPU work, outside
    the device lock)."""

    source: PreparedImage
    overlay: Image.Image  # the mask the result is pasted back through, at the input's size
    region: tuple[int, int, int, int] | None  # "Only masked": the crop the model worked on
    crop_size: tuple[int, int]
    soft: SoftBlend | None = None  # soft inpainting: each image's own overlay, from its distance to the original
    grown: Image.Image | None = None  # an outpaint's new area (L, 255): always the model's, whatever the overlay

    @functools.cached_property
    def _preview_picture(self) -> tuple[float, Image.Image, Image.Image]:
        """(scale, the picture, the overlay) at a live preview's size: made once per job, not per preview."""
        scale = min(1.0, PREVIEW_PICTURE_SIDE / max(self.source.rgb.size))
        size = tuple(max(1, round(side * scale)) for side in self.source.rgb.size)
        return (scale, self.source.rgb.resize(size, Image.Resampling.BILINEAR),
                self.overlay.resize(size, Image.Resampling.BILINEAR))

    def preview_in_picture(self, preview: Image.Image) -> Image.Image:
        """A live preview of the working image (a pixel per latent) where the result will go: pasted into the
        picture through the mask, as finish_inpaint pastes the result, so the edit shows in place."""
        scale, picture, overlay = self._preview_picture
        if self.region is None:
            return Image.composite(preview.convert("RGB").resize(picture.size, Image.Resampling.BILINEAR), picture,
                                   overlay)
        left, top, right, bottom = (round(edge * scale) for edge in self.region)
        layer = picture.copy()
        layer.paste(preview.convert("RGB").resize((max(1, right - left), max(1, bottom - top)),
                                                  Image.Resampling.BILINEAR), (left, top))
        return Image.composite(layer, picture, overlay)


class Inpainter(SamplingEngine):
    """Plans inpaint and sketch-to-image requests, runs them as stages on the shared ModelManager, and pastes
    the results back."""

    main_task = "inpaint"  # sketch to image runs "img2img" (the base model alone)

    def check(self, request: InpaintRequest, preset: ModelPreset) -> dict[str, str]:
        return check_inpaint(request, preset, self.limits)

    def problems(self, request: InpaintRequest, task: str | None = None) -> dict[str, str]:
        if task == "img2img":  # sketch to image: checked with the units it will run
            request = self.with_sketch_controlnet(request)
        return super().problems(request, task)

    def with_sketch_controlnet(self, request: InpaintRequest) -> InpaintRequest:
        """Sketch to image's request as it runs: with `sketch_controlnet`, the family's sketch ControlNet reads the
        drawing, as the first unit, unless a unit of the request already uses it (a form filled from a PNG)."""
        if not request.sketch_controlnet or request.preset not in self.presets:
            return request
        unit = sketch_unit(self.controlnets, self.presets.get(request.preset).family)
        if unit is None or any(given.model == unit.model for given in request.controls):
            return request
        return replace(request, controls=(unit, *request.controls))

    # ----- inpaint (and inpaint sketch: the strokes already painted into `image`, `mask` where they are) -----

    def plan_inpaint(self, image: Image.Image, mask: Image.Image | None, request: InpaintRequest
                     ) -> tuple[SamplingPlan, Finishing]:
        """Check the request and prepare the model's input (CPU work). Raises InvalidRequest. An outpaint needs no
        mask (None): the new area is the mask, and strokes painted on the image are repainted with it."""
        preset = self.validate(request)
        source = prepare_image(image, max_pixels=self.limits.max_upload_pixels)
        repaint = prepare_mask(mask, source.rgb.size) if mask is not None else np.zeros(source.rgb.size[::-1], bool)
        outpainting = request.outpaint is not None and request.outpaint.grows
        grown = None
        if outpainting:
            # the seeds first: the matched-noise fill is drawn from the batch's first (or a PNG's fill seed), and
            # the PNG must give it again
            seed = resolve_seed(request.seed, request.batch_size)
            fill_seed = seed if request.outpaint.fill_seed is None else request.outpaint.fill_seed
            request = replace(request, seed=seed, outpaint=replace(request.outpaint, fill_seed=fill_seed))
            source, repaint, grown = self._outpaint_canvas(source, repaint, request, preset)
        if not repaint.any():
            raise InvalidRequest(["The mask is empty: paint over the part of the image to redo (white = repaint)."])
        blurred = blur_mask(repaint, request.mask_blur)
        only_masked = request.inpaint_area == ONLY_MASKED
        # Both work at about the preset's native pixel count, resizing up or down as A1111 does: "Whole picture"
        # the whole image, "Only masked" a crop around the mask (more detail for a small area).
        if only_masked:
            left, top, right, bottom = mask_box(repaint, request.padding)
            size = working_size(right - left, bottom - top, preset, self.limits.max_pixels, upscale=True)
        else:
            size = working_size(*source.rgb.size, preset, self.limits.max_pixels, upscale=True)

        extra = {"Denoising strength": f"{request.strength:g}", "Mask blur": request.mask_blur,
                 "Inpaint area": request.inpaint_area}
        if only_masked:
            extra["Masked area padding"] = request.padding
        if outpainting:
            extra |= outpaint_parameters(request.outpaint)
        extra |= soft_parameters(request.soft)

        # "Only masked" works on a crop around the mask (grown by the padding, then to the working aspect
        # ratio, as diffusers' padding_mask_crop does), at the full working size: more detail for small areas.
        region = VaeImageProcessor.get_crop_region(blurred, *size, pad=request.padding) if only_masked else None
        crop = source.rgb.crop(region) if region else source.rgb
        crop_mask = blurred.crop(region) if region else blurred
        working_mask = crop_mask.resize(size, Image.Resampling.BILINEAR)
        soft = SoftBlend(request.soft, working_mask) if request.soft is not None else None
        arguments = dict(image=crop.resize(size, Image.Resampling.LANCZOS), mask_image=working_mask,
                         width=size[0], height=size[1], strength=request.strength)
        plan = self._plan(preset, "inpaint", request, size, arguments, extra,
                          ([source.note] if source.note else [])
                          + self.prompt_warnings(preset, request.prompt, tuple(request.controls))
                          + control_notes(tuple(request.controls), self.controlnets),
                          self._controls(request, size, arguments["image"], region, source.rgb.size), soft)
        # A1111 pastes "Whole picture" back through the blurred mask sharpened (doubled, clipped): the repainted
        # area is fully the model's up to half the blur's falloff, so no faded ghost of the old content shows.
        overlay = blurred if only_masked else sharpened(blurred)
        if grown is not None:  # an outpaint's new area is the model's alone (opaque, no pre-fill showing)
            overlay = ImageChops.lighter(overlay, grown)
        return plan, Finishing(source, overlay, region, crop.size, soft, grown)

    def canvas_problems(self, request: InpaintRequest, size: tuple[int, int]) -> dict[str, str]:
        """An outpaint's problems with an image of `size` (its canvas against the limit), by field name; checked
        before a job waits in the queue, and again when it is planned."""
        if request.outpaint is None or request.preset not in self.presets:
            return {}
        return outpaint_problems(request.outpaint, size, *canvas_limit(self.presets.get(request.preset), self.limits))

    def _outpaint_canvas(self, source: PreparedImage, repaint: np.ndarray, request: InpaintRequest,
                         preset: ModelPreset) -> tuple[PreparedImage, np.ndarray, Image.Image]:
        """The image on its larger canvas (the new area pre-filled, transparent where the image was not), the
        repaint mask on it, and the new area (L). Raises InvalidRequest where the canvas would pass the limit."""
        problems = self.canvas_problems(request, source.rgb.size)
        if problems:
            raise InvalidRequest(list(problems.values()))
        outpaint = request.outpaint
        canvas, mask = extend(source.rgb, outpaint, request.mask_blur, repaint, seed=outpaint.fill_seed)
        grown = Image.new("L", canvas.size, 255)
        grown.paste(0, (outpaint.left, outpaint.top, outpaint.left + source.rgb.width, outpaint.top + source.rgb.height))
        alpha = None
        if source.alpha is not None:
            alpha = Image.new("L", canvas.size, 0)
            alpha.paste(source.alpha, (outpaint.left, outpaint.top))
        return PreparedImage(canvas, alpha, source.note), mask, grown

    def finish_inpaint(self, finishing: Finishing, result: GenerationResult) -> GenerationResult:
        """Every image back at the input's size (an outpaint's: the canvas's), the input's own pixels outside the
        mask (CPU work)."""
        for item in result.images:
            generated = item.image.convert("RGB").resize(finishing.crop_size, Image.Resampling.LANCZOS)
            if finishing.region:
                whole = finishing.source.rgb.copy()
                whole.paste(generated, finishing.region[:2])
                generated = whole
            overlay = finishing.overlay
            if finishing.soft is not None and item.latent_distance is not None:
                overlay = soft_overlay(finishing, item.latent_distance)
            item.image = paste_back(generated, finishing.source, overlay)
            item.image.info["parameters"] = item.parameters
        return result

    def inpaint(self, image: Image.Image, mask: Image.Image, request: InpaintRequest,
                on_progress: ProgressCallback | None = None, cancel: threading.Event | None = None) -> GenerationResult:
        """Plan, run and finish in this process: repaint the white part of `mask` in `image`."""
        plan, finishing = self.plan_inpaint(image, mask, request)
        with self.model_files(plan) as resolved:
            result = self.run(resolved, LocalJob(on_progress, cancel))
        return self.finish_inpaint(finishing, result)

    # ----- sketch to image: image-to-image from a drawing -----

    def plan_sketch(self, sketch: Image.Image, request: InpaintRequest) -> SamplingPlan:
        """An image-to-image plan from a coloured sketch (transparent areas count as white paper), guided by the
        family's sketch ControlNet where the request asks for it."""
        request = self.with_sketch_controlnet(request)
        preset = self.validate(request, "img2img")
        drawing = prepare_image(sketch, "sketch", max_pixels=self.limits.max_upload_pixels)
        if all(low == high for low, high in drawing.rgb.getextrema()):  # one flat colour: nothing drawn
            raise InvalidRequest(["The sketch is empty: draw something with the brush first."])
        size = working_size(*drawing.rgb.size, preset, self.limits.max_pixels, upscale=True)
        arguments = dict(image=drawing.rgb.resize(size, Image.Resampling.LANCZOS), strength=request.strength)
        return self._plan(preset, "img2img", request, size, arguments,
                          {"Denoising strength": f"{request.strength:g}"},
                          self.prompt_warnings(preset, request.prompt, tuple(request.controls))
                          + control_notes(tuple(request.controls), self.controlnets),
                          self._controls(request, size, arguments["image"]))

    def sketch_to_image(self, sketch: Image.Image, request: InpaintRequest,
                        on_progress: ProgressCallback | None = None,
                        cancel: threading.Event | None = None) -> GenerationResult:
        with self.model_files(self.plan_sketch(sketch, request)) as plan:
            return self.run(plan, LocalJob(on_progress, cancel))

    # ----- shared -----

    def _controls(self, request: InpaintRequest, size: tuple[int, int], own_image: Image.Image,
                  region: tuple[int, int, int, int] | None = None, picture_size: tuple[int, int] | None = None):
        """The request's units; one without an image of its own reads the picture the model works on (the
        sketch, or the image being inpainted). "Only masked" works on `region` of the picture: a unit's own image
        is fitted to the whole picture and cut to the same region first, as A1111 does, so its map lines up."""
        units = tuple(request.controls)
        if region is not None:
            units = tuple(replace(unit, image=unit.image.resize(picture_size, Image.Resampling.LANCZOS).crop(region))
                          if unit.image is not None else unit for unit in units)
        return plan_controls(units, self.controlnets, size, own_image, self.preprocessor_weights)

    def _plan(self, preset, task, request: InpaintRequest, size, arguments, extra, warnings,
              controls=(), soft: SoftBlend | None = None) -> SamplingPlan:
        # diffusers skips the first (1 - strength) of the schedule, so each image takes steps × strength steps.
        return SamplingPlan(
            preset=preset, task=task, prompt=request.prompt.strip(), negative_prompt=request.negative_prompt,
            scheduler=request.scheduler, steps=request.steps, guidance_scale=request.guidance_scale,
            seed=resolve_seed(request.seed, request.batch_size), batch_size=request.batch_size, size=size,
            clip_skip=request.clip_skip, call_arguments=arguments, parameters_extra=extra,
            steps_per_image=int(request.steps * request.strength), warnings=warnings,
            lora_uses=parse_prompt(request.prompt).loras, controls=controls, soft=soft,
            **self.live_preview_plan(request, preset), **flow_plan(request, preset, task),
        )


def soft_overlay(finishing: Finishing, distance) -> Image.Image:
    """Soft inpainting's paste-back mask for one image, at the input's size: from how far its final latents
    are from the original's (studio.tasks.soft_inpainting.composite_mask), in place for "Only masked", and never
    above the hard paste-back's mask, which fades to 0 with the blurred mask: no pixel outside it changes, and the
    result does not end in a step where the blur ends. An outpaint's new area is always the model's."""
    made = composite_mask(distance, finishing.soft.mask, finishing.soft.settings)
    made = made.resize(finishing.crop_size, Image.Resampling.BILINEAR)
    if finishing.region is not None:
        whole = Image.new("L", finishing.source.rgb.size, 0)
        whole.paste(made, finishing.region[:2])
        made = whole
    made = ImageChops.darker(made, finishing.overlay)
    return ImageChops.lighter(made, finishing.grown) if finishing.grown is not None else made


def outpaint_parameters(outpaint: Outpaint) -> dict:
    """The PNG fields of an outpaint, as A1111's mk2 script names its settings; for matched noise the seed it was
    drawn from (the batch's first: image i's own Seed is seed + i)."""
    fields = {"Outpaint": ", ".join(f"{side} {value}" for side, value in outpaint.sides.items() if value),
              "Outpaint fill": outpaint.fill}
    if outpaint.fill == "Matched noise":
        fields |= {"Fall-off exponent": f"{outpaint.falloff:g}", "Color variation": f"{outpaint.colour_variation:g}",
                   "Outpaint fill seed": outpaint.fill_seed}
    return fields


def sharpened(blurred_mask: Image.Image) -> Image.Image:
    """A1111's overlay mask for "Whole picture": clip(2 × blurred mask)."""
    doubled = np.clip(np.asarray(blurred_mask, dtype=np.float32) * 2, 0, 255).astype(np.uint8)
    return Image.fromarray(doubled, mode="L")


def paste_back(generated: Image.Image, source, blurred_mask: Image.Image) -> Image.Image:
    """The generated pixels where the mask is, the input's own pixels (exactly) where it is not; at the
    input's size, with the input's transparency kept outside the mask."""
    out = Image.composite(generated, source.rgb, blurred_mask)
    if source.alpha is not None:
        alpha = np.maximum(np.asarray(source.alpha), np.asarray(blurred_mask))
        out.putalpha(Image.fromarray(alpha, mode="L"))
    return out


def inpaint_request_from_parameters(text: str, presets, current: InpaintRequest, loras=None,
                                    controlnets=None) -> tuple[InpaintRequest, list[str]]:
    """An inpaint form filled from an image's A1111 parameters (denoising strength, mask blur, inpaint area and
    padding too), and notes on what could not be taken over; what the text lacks keeps its `current` value."""
    params = parse_parameters(text)
    fields, notes = sampling_fields_from_parameters(params, presets, current, loras, controlnets)
    extra = params.extra
    area = extra.get("Inpaint area", current.inpaint_area)
    strength = parse_float(extra.get("Denoising strength"))
    mask_blur, padding = parse_int(extra.get("Mask blur")), parse_int(extra.get("Masked area padding"))
    if "Mask blur" not in extra:  # not an inpainted image's: its Distilled CFG Scale is the base model's (FLUX.1-dev's
        fields["distilled_guidance"] = None  # 3.5), not the inpainting model's (FLUX.1 Fill's 30): the model's own
    return replace(
        current, **fields,
        strength=current.strength if strength is None else strength,
        mask_blur=current.mask_blur if mask_blur is None else mask_blur,
        inpaint_area=area if area in INPAINT_AREAS else current.inpaint_area,
        padding=current.padding if padding is None else padding,
        soft=soft_from_parameters(extra), outpaint=outpaint_from_parameters(extra, current.outpaint),
    ), notes


def outpaint_from_parameters(extra: dict, current: Outpaint | None) -> Outpaint | None:
    """The outpaint a PNG records ("Outpaint: right 32, top 16", its fill), else None: a PNG without one leaves the
    form's sides at 0, so that inpainting it does not grow the canvas again."""
    text = extra.get("Outpaint")
    if not text:
        return None
    sides = {}
    for part in str(text).split(","):
        name, _, value = part.strip().partition(" ")
        if name in SIDES and parse_int(value) is not None:
            sides[name] = parse_int(value)
    base = current or Outpaint()
    fill = extra.get("Outpaint fill", base.fill)
    falloff, variation = parse_float(extra.get("Fall-off exponent")), parse_float(extra.get("Color variation"))
    return Outpaint(**sides, fill=fill if fill in FILLS else base.fill,
                    falloff=base.falloff if falloff is None else falloff,
                    colour_variation=base.colour_variation if variation is None else variation,
                    fill_seed=parse_int(extra.get("Outpaint fill seed")))
