"""What every generating request has, and its checks: the request limits a server sets, the sampling fields
(prompt, steps, CFG, seed, batch, scheduler, clip skip) and their messages, seeds, and the results a job returns.
Shared by Text to image, Inpaint, Compare and the Arena (studio.tasks.sampling runs them)."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from studio.a1111.prompts import prompt_mistakes
from studio.a1111.schedulers import check_scheduler
from studio.models.families import family_of, samplers_for
from studio.models.presets import ModelPreset
from studio.tasks.previews import DEFAULT_PREVIEW_EVERY, LIVE_PREVIEWS, TAESD


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
    max_upload_pixels: int = 50_000_000  # uploads larger than this are refused before they are decoded
    max_loras: int = 8  # LoRAs one prompt may apply at once
    max_control_units: int = 3  # ControlNet units one request may use at once (A1111's default)
    # live previews of presets whose safety checker looks at every image: a preview is not checked, so on a public
    # demo it could show what the checker then hides; off there (studio.tasks.previews.preview_every_of)
    previews_of_checked_presets: bool = True

    @classmethod
    def public(cls) -> RequestLimits:
        return cls(max_prompt_chars=1000, max_batch_size=4, max_steps=50, max_guidance=20.0, max_pixels=1024 * 1024,
                   max_upload_pixels=4_000_000, max_loras=4, max_control_units=2, previews_of_checked_presets=False)


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
    clip_skip: int = 1  # A1111's: 1 = the text encoder's last layer, 2 = the one before it (anime models)
    controls: tuple = ()  # ControlNet units (studio.tasks.control.ControlUnit), at most RequestLimits' count
    # Off, Fast or TAESD (studio.tasks.previews; TAESD: Fast where the preset has none): made only while someone
    # watches the job
    live_preview: str = TAESD
    preview_every: int = DEFAULT_PREVIEW_EVERY  # steps between two previews; 0 (the default): Auto, <= 3% of the time
    # flow-matching models (SD 3, FLUX): the schedule's shift (None: the model's own; FLUX's follows the image's
    # size; 0 too), and FLUX.1-dev's distilled guidance, Forge's "Distilled CFG Scale" (None: the preset's)
    shift: float | None = None
    distilled_guidance: float | None = None


@dataclass
class GeneratedImage:
    image: Image.Image
    seed: int
    parameters: str  # A1111 "parameters" text for the PNG
    stopped_at: int | None = None  # Stop cut its denoising short after this many of its steps
    stopped_in_hires: bool = False  # ... of Hires. fix's second pass
    latent_distance: np.ndarray | None = None  # soft inpainting: the final latents' distance from the original's

    @property
    def unfinished(self) -> str:
        """How far an image Stop cut short got ("" when it is finished)."""
        if not self.stopped_at:
            return ""
        return f"stopped at {'hires ' if self.stopped_in_hires else ''}step {self.stopped_at}"

    @property
    def caption(self) -> str:
        return f"Seed {self.seed}" + (f" · unfinished ({self.unfinished})" if self.stopped_at else "")


@dataclass
class MadeImage:
    """One image as the device work leaves it, before it becomes a PIL image."""

    pixels: torch.Tensor  # in [-1, 1], on the CPU
    flagged: bool  # by the safety checker
    stopped_at: int | None  # Stop cut the last pass short after this many steps
    stopped_in_hires: bool
    parameters: dict  # the image's own PNG fields (Hires. fix's, where it ran; where Stop cut it)
    warnings: list[str] = field(default_factory=list)
    latent_distance: np.ndarray | None = None  # soft inpainting's, per latent cell (for the final paste)


@dataclass
class GenerationResult:
    images: list[GeneratedImage] = field(default_factory=list)
    interrupted: bool = False
    warnings: list[str] = field(default_factory=list)

    @property
    def seeds(self) -> list[int]:
        return [image.seed for image in self.images]


def whole(value):
    """A number from a form or the API as an int when it is a whole number (sliders send 20.0); a fraction stays
    a float, for the checks to refuse rather than silently round (steps 2.5 is not 2)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def fraction_problems(request, labels: dict[str, str]) -> dict[str, str]:
    """A problem for each field (name -> label) that is not a whole number."""
    return {name: f"{label} must be a whole number (got {getattr(request, name):g})."
            for name, label in labels.items() if not isinstance(getattr(request, name), int)}


WHOLE_SAMPLING_FIELDS = {"steps": "Steps", "seed": "Seed", "batch_size": "Batch size", "clip_skip": "Clip skip",
                         "preview_every": "Preview every N steps"}
MAX_CLIP_SKIP = 12  # A1111's slider: a CLIP ViT-L text encoder has 12 layers


def check_sampling(request: SamplingRequest, preset: ModelPreset, limits: RequestLimits) -> dict[str, str]:
    """Problems with the fields every generating request has (prompt, steps, CFG, seed, batch, scheduler),
    by field name, each a sentence a user can act on. Empty when they are fine."""
    fractions = fraction_problems(request, WHOLE_SAMPLING_FIELDS)
    if fractions:
        return fractions  # the range checks below assume whole numbers
    problems: dict[str, str] = {}
    prompt = request.prompt or ""
    if not prompt.strip():
        problems["prompt"] = "Enter a prompt: describe the image you want."
    for name, label, text in (("prompt", "Prompt", prompt), ("negative_prompt", "Negative prompt", request.negative_prompt or "")):
        if len(text) > limits.max_prompt_chars:
            problems[name] = f"{label} is too long ({len(text)} characters; the limit is {limits.max_prompt_chars})."
        elif mistakes := prompt_mistakes(text):
            problems[name] = f"In the {label.lower()}, " + " ".join(mistakes)
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
    if request.live_preview not in LIVE_PREVIEWS:
        problems["live_preview"] = (f"Live preview must be one of {', '.join(LIVE_PREVIEWS)} "
                                    f"(got {request.live_preview!r}).")
    if not (0 <= request.preview_every <= max_steps):
        problems["preview_every"] = (f"Preview every N steps must be between 1 and {max_steps}, or 0 for Auto "
                                     f"(got {request.preview_every}).")
    if not (1 <= request.clip_skip <= MAX_CLIP_SKIP):
        problems["clip_skip"] = f"Clip skip must be between 1 and {MAX_CLIP_SKIP} (got {request.clip_skip})."
    elif request.clip_skip > 1 and not family_of(preset).clip_skip:
        problems["clip_skip"] = (f"Clip skip applies to SD 1.x models; {preset.label} reads its text encoders' "
                                 "layers as it was trained to (A1111 ignores it there too). Set it to 1.")
    family = family_of(preset)
    scheduler_problems = check_scheduler(request.scheduler, samplers_for(preset), preset.label, family.flow_matching)
    if scheduler_problems:
        problems["scheduler"] = scheduler_problems[0]
    problems |= flow_problems(request, preset)
    return problems


MAX_SHIFT = 20.0
MAX_DISTILLED_GUIDANCE = 30.0  # Forge's slider


def flow_problems(request: SamplingRequest, preset: ModelPreset) -> dict[str, str]:
    """The settings of flow-matching models: the schedule's shift and FLUX's distilled guidance. Other families
    ignore them (a form sends every field whatever the preset)."""
    problems = {}
    if not family_of(preset).flow_matching:
        return problems
    if request.shift and not 0 < request.shift <= MAX_SHIFT:
        problems["shift"] = (f"Shift must be above 0 and at most {MAX_SHIFT:g}, or 0 for the model's own "
                             f"(got {request.shift:g}).")
    if request.distilled_guidance is not None and not 0 <= request.distilled_guidance <= MAX_DISTILLED_GUIDANCE:
        problems["distilled_guidance"] = (f"Distilled CFG Scale must be between 0 and {MAX_DISTILLED_GUIDANCE:g} "
                                          f"(got {request.distilled_guidance:g}).")
    return problems


def flow_plan(request: SamplingRequest, preset: ModelPreset, task: str) -> dict:
    """A plan's flow-matching fields: the shift (None: the model's own) and the distilled guidance (None where
    the model takes none: FLUX.1-schnell, SD 3)."""
    if not family_of(preset).flow_matching:
        return {}
    default = preset.inpaint_default_distilled_guidance if task == "inpaint" else preset.distilled_guidance
    distilled = None
    if default is not None:
        distilled = default if request.distilled_guidance is None else request.distilled_guidance
    return dict(shift=request.shift or None, distilled_guidance=distilled)


def flow_parameters(plan) -> dict[str, str]:
    """The PNG fields Forge writes for flow-matching models (`plan`: a SamplingPlan): "Distilled CFG Scale" for a
    guidance-distilled one (FLUX.1-dev), and "Shift" where the user set one (the model's own is not written)."""
    fields = {}
    if plan.distilled_guidance is not None:
        fields["Distilled CFG Scale"] = f"{plan.distilled_guidance:g}"
    if plan.shift is not None:
        fields["Shift"] = f"{plan.shift:g}"
    return fields


def resolve_seed(seed: int, batch_size: int = 1) -> int:
    return secrets.randbelow(MAX_SEED - batch_size + 2) if seed == -1 else seed
