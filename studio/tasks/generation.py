"""Text to image: its request and checks, and its engine (with Hires. fix's second pass)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from diffusers.image_processor import VaeImageProcessor
from PIL import Image

from studio.a1111.prompts import parse_prompt
from studio.core.downloads import HubDownloads
from studio.core.jobs import JobControl, LocalJob
from studio.models.controlnets import ControlNetCatalog
from studio.models.loras import (
    LoraCatalog,
)
from studio.models.presets import ModelPreset, PresetCatalog, StyleCatalog
from studio.models.stages import Conditioning, DiffusionStages
from studio.tasks.control import control_notes, plan_controls
from studio.tasks.hires import (
    LATENT_UPSCALE_MODES,
    HiresFix,
    HiresPlan,
    check_hires,
    hires_size,
    upscale_latents,
)
from studio.tasks.requests import (
    GenerationResult,
    MadeImage,
    ProgressCallback,
    RequestLimits,
    SamplingRequest,
    check_sampling,
    flow_plan,
    fraction_problems,
    resolve_seed,
)
from studio.tasks.sampling import PhaseOfJob, SamplingEngine, SamplingPlan, SecondPass
from studio.tasks.upscaling import UpscaleRequest, Upscaling


@dataclass(frozen=True)
class TextToImageRequest(SamplingRequest):
    width: int = 64
    height: int = 64
    style: str = "None"
    hires: HiresFix | None = None  # Hires. fix: a second pass at a larger size; None = off

    @classmethod
    def preset_defaults(cls, preset: ModelPreset, prompt: str = "", seed: int = -1) -> TextToImageRequest:
        """One image at the preset's own sampler, steps, CFG and size (Compare's cells, the evaluation command)."""
        return cls(prompt=prompt, preset=preset.name, scheduler=preset.default_scheduler, steps=preset.default_steps,
                   guidance_scale=preset.default_guidance, width=preset.default_width, height=preset.default_height,
                   seed=seed)


def check_text_to_image(request: TextToImageRequest, preset: ModelPreset, limits: RequestLimits) -> dict[str, str]:
    """Problems with the request by field name, each a sentence a user can act on. Empty when it is fine."""
    problems = check_sampling(request, preset, limits)
    fractions = fraction_problems(request, {"width": "Width", "height": "Height"})
    if fractions:
        return problems | fractions  # the size checks below assume whole numbers
    for name, value in (("width", request.width), ("height", request.height)):
        if not (preset.min_size <= value <= preset.max_size) or value % preset.size_step:
            problems[name] = (
                f"{name.capitalize()} must be a multiple of {preset.size_step} between {preset.min_size} and "
                f"{preset.max_size} for {preset.label} (got {value})."
            )
    if limits.max_pixels and request.width * request.height > limits.max_pixels and "width" not in problems:
        problems["width"] = f"Image too large: width × height must be at most {limits.max_pixels:,} pixels here."
    return problems


class TextToImage(SamplingEngine):
    """Plans and runs text-to-image requests, Hires. fix's two passes included."""

    def __init__(self, stages: DiffusionStages, presets: PresetCatalog, styles: StyleCatalog, limits: RequestLimits,
                 version: str, downloads: HubDownloads | None = None, upscaling: Upscaling | None = None,
                 loras: LoraCatalog | None = None, controlnets: ControlNetCatalog | None = None):
        super().__init__(stages, presets, limits, version, downloads, loras, controlnets)
        self.styles = styles
        self.upscaling = upscaling  # Hires. fix's upscaler presets, on the same manager (latent modes without it)

    @property
    def hires_upscalers(self) -> list[str]:
        """The upscaler presets Hires. fix can use besides the latent modes."""
        return self.upscaling.catalog.names if self.upscaling else []

    def prompt_as_run(self, request: TextToImageRequest) -> str:
        if request.style not in self.styles.names:
            return request.prompt
        return self.styles.get(request.style).apply(request.prompt.strip(), request.negative_prompt)[0]

    def check(self, request: TextToImageRequest, preset: ModelPreset) -> dict[str, str]:
        problems = check_text_to_image(request, preset, self.limits)
        if request.style not in self.styles.names:
            problems["style"] = f"Unknown style {request.style!r}. Available styles: {', '.join(self.styles.names)}."
        if request.hires is not None and not ({"width", "height", "steps"} & problems.keys()):
            problems |= check_hires(request.hires, request.width, request.height, request.steps, preset,
                                    min(preset.max_steps, self.limits.max_steps), self.limits.max_pixels,
                                    self.hires_upscalers)
            if not problems and request.hires.upscaler in self.hires_upscalers:
                # the upscaler's own limits (a ×4 model passes through 16× the pixels), now rather than on the GPU
                target = hires_size(request.width, request.height, request.hires.upscale, preset.size_step)
                sizes = self.upscaling.size_problems((request.width, request.height),
                                                     self._hires_upscale_request(request.hires, target,
                                                                                 (request.width, request.height)))
                if sizes:
                    problems["hires_upscaler"] = sizes[0]
        return problems

    @staticmethod
    def _hires_upscale_request(settings: HiresFix, target: tuple[int, int], size: tuple[int, int]) -> UpscaleRequest:
        """What Hires. fix asks of its upscaler: the first pass's image to at least the second pass's size (then
        Lanczos to it exactly); realesr-general-x4v3 as itself (denoise strength 1: one model, as ZeroGPU holds)."""
        return UpscaleRequest(settings.upscaler, scale=max(target[0] / size[0], target[1] / size[1]),
                              denoise_strength=1.0)

    def plan(self, request: TextToImageRequest, made_maps: dict | None = None) -> SamplingPlan:
        """The checked request with its style applied and its seed resolved (raises InvalidRequest). `made_maps`:
        ControlNet maps shared by the plans of one job (plan_controls)."""
        preset = self.validate(request)
        prompt, negative_prompt = self.styles.get(request.style).apply(request.prompt.strip(), request.negative_prompt)
        size = (request.width, request.height)
        plan = SamplingPlan(
            preset=preset, task="text2img", prompt=prompt, negative_prompt=negative_prompt,
            scheduler=request.scheduler, steps=request.steps, guidance_scale=request.guidance_scale,
            seed=resolve_seed(request.seed, request.batch_size), batch_size=request.batch_size, size=size,
            clip_skip=request.clip_skip, call_arguments={"width": request.width, "height": request.height},
            warnings=self.prompt_warnings(preset, request.prompt, tuple(request.controls))
            + control_notes(tuple(request.controls), self.controlnets), lora_uses=parse_prompt(prompt).loras,
            **self.live_preview_plan(request, preset), **flow_plan(request, preset, "text2img"),
            controls=plan_controls(tuple(request.controls), self.controlnets, size,
                                   weights_for=self.preprocessor_weights, made_maps=made_maps),
        )
        if request.hires is not None:
            settings = request.hires
            upscaler = None if settings.upscaler in LATENT_UPSCALE_MODES else self.upscaling.catalog.get(settings.upscaler)
            plan.hires = HiresPlan(settings, hires_size(*size, settings.upscale, preset.size_step),
                                   settings.steps or request.steps,
                                   upscaler.written_name if upscaler else settings.upscaler)
            plan.hires_upscaler_native_scale = upscaler.native_scale if upscaler else 1
        return plan

    @contextlib.contextmanager
    def model_files(self, plan: SamplingPlan, on_progress: ProgressCallback | None = None) -> Iterator[SamplingPlan]:
        """The preset's files, and the hires upscaler's release file (fetched before any device work too)."""
        with super().model_files(plan, on_progress) as resolved:
            if plan.hires is not None and plan.hires.latent_mode is None:
                self.upscaling.fetch(self.upscaling.catalog.get(plan.hires.settings.upscaler), on_progress=on_progress)
            yield resolved

    def generate(self, request: TextToImageRequest, on_progress: ProgressCallback | None = None,
                 cancel: threading.Event | None = None) -> GenerationResult:
        """Plan, fetch and run in this process: images for the prompt; image i uses seed + i."""
        with self.model_files(self.plan(request)) as plan:
            return self.run(plan, LocalJob(on_progress, cancel))

    def _one_image(self, plan: SamplingPlan, encoded: Callable[[], Conditioning], index: int,
                   job: JobControl) -> MadeImage:
        """With Hires. fix, image `index` in two turns on the device, with the upscale between them (an upscaler
        model takes a turn per tile): other jobs' images go in between. Stop before the second pass gives the
        first pass's image, as A1111 does."""
        hires = plan.hires
        if hires is None:
            return super()._one_image(plan, encoded, index, job)
        label = self._image_label(plan, index)
        after_first_pass = index * plan.steps_per_image_total + plan.steps_per_image
        first_pixels = None
        with self.manager.turn(owner=job.owner):
            latents, steps_done = self._denoise(plan, encoded(), index, job)
            if steps_done < plan.steps_per_image:  # Stop in the first pass: that pass's image, cut short
                return self._finish_image(plan, plan.task, latents, plan.size, steps_done, plan.steps_per_image)
            if hires.latent_mode is None:  # an upscaler works on the image
                first_pixels = self.stages.decode(plan.preset, plan.task, latents, *plan.size)
        warnings: list[str] = []
        upscaled = None
        if hires.latent_mode is None:
            first = VaeImageProcessor().postprocess(first_pixels, output_type="pil")[0]
            upscaled = self._upscaled(plan, first, PhaseOfJob(job, after_first_pass, plan.total_steps,
                                                              f"{label}, upscaling"), warnings)
        if job.cancelled or (hires.latent_mode is None and upscaled is None):
            # stopped before the second pass: the first pass's image, finished, and a word that it is not hires
            warnings.append(f"Stopped before Hires. fix's second pass: image {index + 1} is the first pass's, "
                            f"{plan.size[0]}×{plan.size[1]}.")
            with self.manager.turn(owner=job.owner):
                if first_pixels is None:
                    made = self._finish_image(plan, plan.task, latents, plan.size, steps_done, steps_done)
                else:
                    made = MadeImage(first_pixels, self.stages.check(plan.preset, plan.task, first_pixels)[0], None,
                                     False, {})
            made.warnings += warnings
            return made
        with self.manager.turn(owner=job.owner):
            if hires.latent_mode is not None:  # on the device, in this turn; in float32 (no fp16 antialiasing)
                scale_factor = self.models.vae_scale_factor(plan.preset, "img2img")
                upscaled = upscale_latents(latents, hires.size, hires.latent_mode, scale_factor)
            second = SecondPass(hires.size, {"image": upscaled, "strength": hires.pipeline_strength},
                                hires.schedule_steps, hires.steps, after_first_pass)
            latents, hires_done = self._denoise(plan, encoded(), index, job, second)
            made = self._finish_image(plan, "img2img", latents, hires.size, hires_done, hires.steps_run,
                                      hires.parameters(), in_hires=True)
        made.warnings += warnings
        return made

    def _upscaled(self, plan: SamplingPlan, image: Image.Image, job: JobControl,
                  warnings: list[str]) -> Image.Image | None:
        """The first pass's image at the second pass's size by the hires upscaler preset (its passes, then
        Lanczos to the exact size); None when Stop ended it."""
        width, height = plan.hires.size
        request = self._hires_upscale_request(plan.hires.settings, plan.hires.size, image.size)
        outcome = self.upscaling.run(self.upscaling.plan(image, request), job)
        warnings += outcome.warnings
        if outcome.image is None:
            return None
        upscaled = outcome.image.convert("RGB")
        return upscaled if upscaled.size == (width, height) else upscaled.resize((width, height),
                                                                                 Image.Resampling.LANCZOS)
