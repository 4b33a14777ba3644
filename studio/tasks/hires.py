"""Hires. fix: AUTOMATIC1111's two-pass text to image. The first pass generates at the base size; its result is
upscaled by a factor, either as latents (the "Latent" modes: an interpolation of the latents, no model) or as an
image by an upscaler preset (Real-ESRGAN, the embedded RRDBNet, Lanczos); a second pass then runs image to image
on it at a denoising strength, with its own steps, and adds the detail the larger size can hold.

This module holds the settings, their checks, the sizes and the PNG fields; the passes run in generation.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from studio.a1111.metadata import parse_float, parse_int

# A1111's latent upscale modes (modules/shared.py), under its names
LATENT_UPSCALE_MODES = {
    "Latent": {"mode": "bilinear", "antialias": False},
    "Latent (antialiased)": {"mode": "bilinear", "antialias": True},
    "Latent (bicubic)": {"mode": "bicubic", "antialias": False},
    "Latent (bicubic antialiased)": {"mode": "bicubic", "antialias": True},
    "Latent (nearest)": {"mode": "nearest", "antialias": False},
    "Latent (nearest-exact)": {"mode": "nearest-exact", "antialias": False},
}
DEFAULT_HIRES_UPSCALER = "Latent"
MIN_HIRES_SCALE, MAX_HIRES_SCALE = 1.0, 4.0  # A1111's slider
HIRES_SIDE_FACTOR = 2  # the second pass may work at up to twice the preset's largest size
MAX_SCHEDULE_STEPS = 1000  # the noise levels SD models are trained on: a longer schedule has no meaning


@dataclass(frozen=True)
class HiresFix:
    """The Hires. fix settings of a text-to-image request (A1111's names in the comments)."""

    upscale: float = 2.0  # "Upscale by": the result's size over the first pass's
    upscaler: str = DEFAULT_HIRES_UPSCALER  # a latent mode, or an upscaler preset's name
    steps: int = 0  # "Hires steps": 0 = as many as the first pass
    denoising_strength: float = 0.5  # how much of the upscaled image the second pass redoes


@dataclass(frozen=True)
class HiresPlan:
    """The checked settings made ready for the device (picklable, for ZeroGPU's worker)."""

    settings: HiresFix
    size: tuple[int, int]  # the result's width, height
    steps: int  # the second pass's denoising steps (the first pass's steps when the settings say 0)
    upscaler_label: str  # as the PNG writes it ("Latent", "R-ESRGAN 4x+")

    @property
    def latent_mode(self) -> dict | None:
        return LATENT_UPSCALE_MODES.get(self.settings.upscaler)

    @property
    def steps_run(self) -> int:
        """A1111 runs exactly the hires steps (its "requested steps" img2img branch), not steps × strength."""
        return self.steps

    @property
    def schedule_steps(self) -> int:
        """The schedule whose last `steps` the second pass runs: A1111's int(steps / min(strength, 0.999)), so that
        they start at the noise level of the denoising strength."""
        return schedule_steps(self.steps, self.settings.denoising_strength)

    @property
    def pipeline_strength(self) -> float:
        """diffusers' img2img strength that runs exactly `steps` of `schedule_steps` (it runs int(N × strength)
        steps; the half step keeps float rounding from losing one)."""
        return min(1.0, (self.steps + 0.5) / self.schedule_steps)

    def parameters(self) -> dict[str, str | int]:
        """The PNG fields, as A1111 writes them (Hires steps only when set)."""
        fields: dict[str, str | int] = {"Denoising strength": f"{self.settings.denoising_strength:g}",
                                        "Hires upscale": f"{self.settings.upscale:g}"}
        if self.settings.steps:
            fields["Hires steps"] = self.settings.steps
        fields["Hires upscaler"] = self.upscaler_label
        return fields


def schedule_steps(steps: int, strength: float) -> int:
    return max(steps, int(steps / min(strength, 0.999)))


def hires_size(width: int, height: int, upscale: float, multiple: int) -> tuple[int, int]:
    """The second pass's size: the base size times the factor, rounded down to what the model takes (A1111
    truncates to whole latent pixels the same way)."""
    def side(base: int) -> int:
        return max(multiple, int(base * upscale) // multiple * multiple)

    return side(width), side(height)


def check_hires(hires: HiresFix, width: int, height: int, first_pass_steps: int, preset, max_steps: int,
                max_pixels: int | None, upscalers: list[str]) -> dict[str, str]:
    """Problems with the Hires. fix settings by field name, each a sentence a user can act on."""
    problems: dict[str, str] = {}
    if not isinstance(hires.steps, int):
        return {"hires_steps": f"Hires steps must be a whole number (got {hires.steps:g})."}
    if hires.upscaler not in LATENT_UPSCALE_MODES and hires.upscaler not in upscalers:
        problems["hires_upscaler"] = (f"Unknown hires upscaler {hires.upscaler!r}. Choose one of: "
                                      f"{', '.join([*LATENT_UPSCALE_MODES, *upscalers])}.")
    if not MIN_HIRES_SCALE <= hires.upscale <= MAX_HIRES_SCALE:
        problems["hires_upscale"] = (f"Hires upscale must be from {MIN_HIRES_SCALE:g} to {MAX_HIRES_SCALE:g} "
                                     f"(got {hires.upscale:g}).")
    if not 0 <= hires.steps <= max_steps:
        problems["hires_steps"] = (f"Hires steps must be between 0 (as many as the first pass) and {max_steps} "
                                   f"(got {hires.steps}).")
    if not 0 < hires.denoising_strength <= 1:
        problems["denoising_strength"] = ("Denoising strength must be above 0 and at most 1 "
                                          f"(got {hires.denoising_strength:g}).")
    elif "hires_steps" not in problems:
        steps = hires.steps or first_pass_steps
        if schedule_steps(steps, hires.denoising_strength) > MAX_SCHEDULE_STEPS:
            problems["denoising_strength"] = (
                f"Hires steps ÷ denoising strength must be at most {MAX_SCHEDULE_STEPS} ({steps} ÷ "
                f"{hires.denoising_strength:g}): the second pass runs the last {steps} steps of a schedule that long. "
                "Raise the strength or lower the steps.")
    if "hires_upscale" in problems:
        return problems
    target = hires_size(width, height, hires.upscale, preset.size_step)
    largest = HIRES_SIDE_FACTOR * preset.max_size
    if max(target) > largest:
        problems["hires_upscale"] = (f"Hires. fix would make {target[0]}×{target[1]}; {preset.label} goes up to "
                                     f"{largest} px a side with it. Lower the factor or the size.")
    elif max_pixels and target[0] * target[1] > max_pixels:
        problems["hires_upscale"] = (f"Hires. fix would make {target[0]}×{target[1]}: more than {max_pixels:,} "
                                     "pixels, the limit here. Lower the factor or the size.")
    return problems


def upscale_latents(latents: torch.Tensor, size: tuple[int, int], mode: dict, vae_scale_factor: int) -> torch.Tensor:
    """The first pass's latents at the second pass's size (`size` in pixels), as A1111's latent modes do."""
    width, height = size
    # in float32: torch has no antialiased bilinear or bicubic for fp16 on the CPU
    enlarged = torch.nn.functional.interpolate(latents.float(), size=(height // vae_scale_factor, width // vae_scale_factor),
                                               mode=mode["mode"], antialias=mode["antialias"])
    return enlarged.to(latents.dtype)


def hires_from_parameters(extra: dict[str, str], width: int, height: int, find_upscaler,
                          current: HiresFix) -> tuple[HiresFix | None, list[str]]:
    """Hires. fix settings from an image's A1111 fields (None when it was made without), and notes on what could
    not be taken over. `find_upscaler(name)` gives our name for an upscaler a PNG names (ours or A1111's), or None.
    A1111's "Hires resize: WxH" becomes the factor from the base width."""
    if not any(key in extra for key in ("Hires upscale", "Hires resize", "Hires upscaler")):
        return None, []
    notes = []
    upscale = parse_float(extra.get("Hires upscale"))
    resize = extra.get("Hires resize", "")
    if upscale is None and "x" in resize and width:
        resize_width, resize_height = (parse_int(value) for value in resize.split("x", 1))
        if resize_width and resize_height:
            upscale = round(resize_width / width, 2)
            if height and not math.isclose(resize_height / height, upscale, rel_tol=0.02):
                notes.append(f"The image was resized to {resize} by Hires. fix, another shape than {width}×{height}; "
                             f"here it is upscaled ×{upscale:g} without cropping.")
    written = extra.get("Hires upscaler", DEFAULT_HIRES_UPSCALER)
    # A1111's "None" upscaler leaves the image as it is and its resize to the size is Lanczos: our Lanczos
    upscaler = written if written in LATENT_UPSCALE_MODES else find_upscaler("Lanczos" if written == "None" else written)
    if upscaler is None:
        notes.append(f"The image was upscaled by {written!r} in Hires. fix, which this studio does not have; the hires "
                     f"upscaler stays {current.upscaler}.")
        upscaler = current.upscaler
    strength = parse_float(extra.get("Denoising strength"))
    steps = parse_int(extra.get("Hires steps"))
    return HiresFix(upscale=current.upscale if upscale is None else upscale, upscaler=upscaler,
                    steps=0 if steps is None else steps,
                    denoising_strength=current.denoising_strength if strength is None else strength), notes
