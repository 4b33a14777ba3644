"""Text to image: request validation, seeds, the denoising loop with progress and interruption."""

from __future__ import annotations

import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from PIL import Image

from .errors import InvalidRequest
from .memory import ModelManager, estimate_working_memory
from .metadata import format_parameters
from .pipelines import DiffusersFactory
from .presets import ModelPreset, PresetCatalog, StyleCatalog
from .schedulers import check_scheduler, make_scheduler

MAX_SEED = 2**32 - 1

# on_progress(done_steps, total_steps, description)
ProgressCallback = Callable[[int, int, str], None]


@dataclass(frozen=True)
class RequestLimits:
    """Server-wide limits on top of each preset's own. `public()` is the stricter set for a public demo."""

    max_prompt_chars: int = 2000
    max_batch_size: int = 8
    max_steps: int = 150
    max_guidance: float = 30.0
    max_pixels: int | None = None  # width * height cap on top of the preset's max size

    @classmethod
    def public(cls) -> RequestLimits:
        return cls(max_prompt_chars=1000, max_batch_size=4, max_steps=50, max_guidance=20.0, max_pixels=1024 * 1024)


@dataclass(frozen=True)
class SamplingRequest:
    """The settings every generating request has; each task's request adds its own."""

    prompt: str
    negative_prompt: str = ""
    preset: str = "embedded"
    scheduler: str = "Euler"
    steps: int = 20
    guidance_scale: float = 7.0
    seed: int = -1  # -1: a random seed, reported back
    batch_size: int = 1


@dataclass(frozen=True)
class TextToImageRequest(SamplingRequest):
    width: int = 64
    height: int = 64
    style: str = "None"


@dataclass
class GeneratedImage:
    image: Image.Image
    seed: int
    parameters: str  # A1111 "parameters" text for the PNG


@dataclass
class GenerationResult:
    images: list[GeneratedImage] = field(default_factory=list)
    interrupted: bool = False
    warnings: list[str] = field(default_factory=list)

    @property
    def seeds(self) -> list[int]:
        return [image.seed for image in self.images]


def check_sampling(request: SamplingRequest, preset: ModelPreset, limits: RequestLimits) -> dict[str, str]:
    """Problems with the fields every generating request has (prompt, steps, CFG, seed, batch, scheduler),
    by field name, each a sentence a user can act on. Empty when they are fine."""
    problems: dict[str, str] = {}
    prompt = request.prompt or ""
    if not prompt.strip():
        problems["prompt"] = "Enter a prompt: describe the image you want."
    for name, label, text in (("prompt", "Prompt", prompt), ("negative_prompt", "Negative prompt", request.negative_prompt or "")):
        if len(text) > limits.max_prompt_chars:
            problems[name] = f"{label} is too long ({len(text)} characters; the limit is {limits.max_prompt_chars})."
    max_steps = min(preset.max_steps, limits.max_steps)
    if not (1 <= request.steps <= max_steps):
        problems["steps"] = f"Steps must be between 1 and {max_steps} for {preset.label} (got {request.steps})."
    if not (0 <= request.guidance_scale <= limits.max_guidance):
        problems["guidance_scale"] = (
            f"CFG scale must be between 0 and {limits.max_guidance:g} (got {request.guidance_scale:g})."
        )
    if not (1 <= request.batch_size <= limits.max_batch_size):
        problems["batch_size"] = f"Batch size must be between 1 and {limits.max_batch_size} (got {request.batch_size})."
    if not (-1 <= request.seed <= MAX_SEED):
        problems["seed"] = f"Seed must be -1 (random) or between 0 and {MAX_SEED} (got {request.seed})."
    elif request.seed >= 0 and request.seed + request.batch_size - 1 > MAX_SEED:
        problems["seed"] = f"Seed + batch size - 1 must not exceed {MAX_SEED}."
    scheduler_problems = check_scheduler(request.scheduler, preset)
    if scheduler_problems:
        problems["scheduler"] = scheduler_problems[0]
    return problems


def check_text_to_image(request: TextToImageRequest, preset: ModelPreset, limits: RequestLimits) -> dict[str, str]:
    """Problems with the request by field name, each a sentence a user can act on. Empty when it is fine."""
    problems = check_sampling(request, preset, limits)
    for name, value in (("width", request.width), ("height", request.height)):
        if not (preset.min_size <= value <= preset.max_size) or value % preset.size_step:
            problems[name] = (
                f"{name.capitalize()} must be a multiple of {preset.size_step} between {preset.min_size} and "
                f"{preset.max_size} for {preset.label} (got {value})."
            )
    if limits.max_pixels and request.width * request.height > limits.max_pixels and "width" not in problems:
        problems["width"] = f"Image too large: width × height must be at most {limits.max_pixels:,} pixels here."
    return problems


def resolve_seed(seed: int, batch_size: int = 1) -> int:
    return secrets.randbelow(MAX_SEED - batch_size + 2) if seed == -1 else seed


class SamplingEngine:
    """What text to image and inpainting share: presets and limits, validation, and the batch loop on a
    pipeline leased from the shared ModelManager. Holds no per-request state."""

    def __init__(self, manager: ModelManager, factory: DiffusersFactory, presets: PresetCatalog,
                 limits: RequestLimits, version: str):
        self.manager = manager
        self.factory = factory
        self.presets = presets
        self.limits = limits
        self.version = version

    def problems(self, request: SamplingRequest) -> dict[str, str]:
        """Problems with the request by field name, each a sentence a user can act on. Empty when it is fine."""
        if request.preset not in self.presets:
            return {"preset": f"Unknown preset {request.preset!r}. Available presets: {', '.join(self.presets.names)}."}
        return self.check(request, self.presets.get(request.preset))

    def check(self, request: SamplingRequest, preset: ModelPreset) -> dict[str, str]:
        return check_sampling(request, preset, self.limits)

    def validate(self, request: SamplingRequest) -> ModelPreset:
        problems = self.problems(request)
        if problems:
            raise InvalidRequest(list(problems.values()))
        return self.presets.get(request.preset)

    def run_batch(
        self,
        preset: ModelPreset,
        task: str,
        request: SamplingRequest,
        size: tuple[int, int],
        prompts: tuple[str, str],
        run: Callable,
        describe: Callable[[int], str],
        finish: Callable[[Image.Image], Image.Image] = lambda image: image,
        steps_per_image: int | None = None,
        warnings: list[str] | None = None,
        on_progress: ProgressCallback | None = None,
        cancel: threading.Event | None = None,
    ) -> GenerationResult:
        """Image i of the batch uses seed + i and is made on its own with a fresh scheduler, so it is
        reproducible alone (bit for bit). Stop (`cancel`) ends the current image early and skips the rest.

        `run(pipe, generator, on_step)` calls the pipeline for one image, `finish(image)` post-processes it,
        and `describe(seed)` is its A1111 parameters text.
        """
        seed = resolve_seed(request.seed, request.batch_size)
        cancel = cancel or threading.Event()
        steps = steps_per_image or request.steps
        result = GenerationResult(warnings=list(warnings or []))
        working_memory = estimate_working_memory(*size, 1, self.manager.dtype, guidance=request.guidance_scale > 1)

        with self.manager.lease(preset, task, working_memory=working_memory) as lease:
            pipe = lease.pipeline
            result.warnings += truncation_warnings(pipe, *prompts)
            for index in range(request.batch_size):
                if cancel.is_set():
                    result.interrupted = True
                    break
                image_seed = seed + index
                pipe.scheduler = make_scheduler(request.scheduler, pipe.scheduler.config, preset.scheduler_overrides)
                generator = torch.Generator("cpu").manual_seed(image_seed)  # CPU noise: same on every device
                output = run(pipe, generator, step_callback(index, steps, request.batch_size, on_progress, cancel))
                if cancel.is_set():
                    result.interrupted = True  # this image was cut short; the VAE decoded where it stopped
                if any(getattr(output, "nsfw_content_detected", None) or []):
                    result.warnings.append(f"The safety checker flagged the image with seed {image_seed}; it was "
                                           "replaced by a black image.")
                image = finish(output.images[0])
                parameters = describe(image_seed)
                image.info["parameters"] = parameters  # written as a PNG text chunk when saved as PNG
                result.images.append(GeneratedImage(image, image_seed, parameters))
        if on_progress:
            on_progress(steps * request.batch_size, steps * request.batch_size, "Done")
        return result


class TextToImage(SamplingEngine):
    """Runs text-to-image requests on pipelines leased from the shared ModelManager."""

    def __init__(self, manager: ModelManager, factory: DiffusersFactory, presets: PresetCatalog,
                 styles: StyleCatalog, limits: RequestLimits, version: str):
        super().__init__(manager, factory, presets, limits, version)
        self.styles = styles

    def check(self, request: TextToImageRequest, preset: ModelPreset) -> dict[str, str]:
        problems = check_text_to_image(request, preset, self.limits)
        if request.style not in self.styles.names:
            problems["style"] = f"Unknown style {request.style!r}. Available styles: {', '.join(self.styles.names)}."
        return problems

    def generate(
        self,
        request: TextToImageRequest,
        on_progress: ProgressCallback | None = None,
        cancel: threading.Event | None = None,
    ) -> GenerationResult:
        """Images for the prompt (with the style applied); image i uses seed + i."""
        preset = self.validate(request)
        prompt, negative_prompt = self.styles.get(request.style).apply(request.prompt.strip(), request.negative_prompt)

        def run(pipe, generator, on_step):
            return pipe(
                prompt=prompt,
                negative_prompt=negative_prompt or None,
                num_inference_steps=request.steps,
                guidance_scale=request.guidance_scale,
                width=request.width,
                height=request.height,
                generator=generator,
                callback_on_step_end=on_step,
                output_type="pil",
            )

        def describe(seed: int) -> str:
            return format_parameters(
                prompt, negative_prompt, steps=request.steps, scheduler=request.scheduler,
                guidance_scale=request.guidance_scale, seed=seed, width=request.width, height=request.height,
                model=preset.name, model_hash=self.factory.model_hash(preset), version=self.version,
            )

        return self.run_batch(preset, "text2img", request, (request.width, request.height), (prompt, negative_prompt),
                              run, describe, on_progress=on_progress, cancel=cancel)


def step_callback(index: int, steps: int, batch_size: int, on_progress: ProgressCallback | None,
                  cancel: threading.Event):
    """diffusers' callback_on_step_end for image `index` of a batch: reports progress, stops when cancelled."""
    total = steps * batch_size

    def on_step_end(pipe, step, timestep, callback_kwargs):
        if on_progress:
            done = index * steps + step + 1
            on_progress(done, total, f"Image {index + 1}/{batch_size}, step {step + 1}/{steps}")
        if cancel.is_set():
            pipe._interrupt = True  # diffusers skips the remaining steps, then decodes
        return callback_kwargs

    return on_step_end


def truncation_warnings(pipe, prompt: str, negative_prompt: str) -> list[str]:
    """CLIP reads a fixed number of tokens; say so when a prompt is longer rather than dropping words silently."""
    tokenizer = pipe.tokenizer
    limit = tokenizer.model_max_length
    warnings = []
    for label, text in (("prompt", prompt), ("negative prompt", negative_prompt)):
        ids = tokenizer(text, truncation=False).input_ids if text else []
        if len(ids) > limit:
            kept = tokenizer.decode(ids[1 : limit - 1])
            warnings.append(
                f"The {label} is {len(ids)} tokens long; the model reads {limit}, so only "
                f"\u201c{kept.strip()}\u201d was used."
            )
    return warnings


def request_from_parameters(text: str, presets: PresetCatalog, current: TextToImageRequest) -> TextToImageRequest:
    """A form filled from an image's A1111 parameters; fields it lacks keep their `current` values.

    The style is reset to "None" because the stored prompt already has the style applied.
    """
    from .metadata import parse_parameters

    params = parse_parameters(text)
    preset = params.model if params.model in presets else current.preset
    return TextToImageRequest(
        prompt=params.prompt,
        negative_prompt=params.negative_prompt,
        preset=preset,
        scheduler=params.scheduler or current.scheduler,
        steps=params.steps or current.steps,
        guidance_scale=params.guidance_scale if params.guidance_scale is not None else current.guidance_scale,
        width=params.width or current.width,
        height=params.height or current.height,
        seed=params.seed if params.seed is not None else current.seed,
        batch_size=1,
        style="None",
    )
