"""Soft inpainting, as A1111 1.8's built-in extension does it (the differential-diffusion idea): a soft mask says
per pixel how much may change, and the denoising keeps the original in proportion, more of it early in the
schedule; at the end the original comes back wherever the result barely differs from it.

Two parts, both in the latents:
- after every step, the latents are blended with the original (noised to the level of the next evaluation) with
  the weight mask ** (sigma ** schedule_bias × preservation_strength), sigma being the noise-to-signal ratio of that
  level (A1111's k-diffusion sigma; for a flow-matching model s / (1 - s)), the vectors' lengths interpolated with
  the power `transition_contrast_boost` so that a half-kept region does not lose its contrast;
- the final latents' distance from the original's decides, per pixel, how much of the result is pasted back
  over the original (difference threshold and contrast, mask influence).

A1111's `extensions-builtin/soft-inpainting/scripts/soft_inpainting.py` blends k-diffusion's x0 estimate; the
studio's samplers are diffusers' schedulers, so the blend is of the step's latents at their noise level (A1111's
"mask before denoising" order), which needs no sampler's internals and so works for every sampler and family.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
from PIL import Image, ImageFilter

from studio.a1111.metadata import parse_float


@dataclass(frozen=True)
class SoftInpainting:
    """A1111's six settings, with its defaults."""

    schedule_bias: float = 1.0  # > 1 keeps more of the original early in the schedule, < 1 late
    preservation_strength: float = 0.5  # how strongly partly masked content is kept
    transition_contrast_boost: float = 4.0  # the power the blended vectors' lengths are interpolated with
    mask_influence: float = 0.0  # how much the mask, besides the difference, decides the final paste
    difference_threshold: float = 0.5  # the latent distance at which the original is pasted back half
    difference_contrast: float = 2.0  # how sharp that transition is


# A1111's slider ranges, its UI labels, and the PNG fields it writes ("Soft inpainting enabled: True" first)
RANGES = {"schedule_bias": (0, 8), "preservation_strength": (0, 8), "transition_contrast_boost": (1, 32),
          "mask_influence": (0, 1), "difference_threshold": (0, 8), "difference_contrast": (0, 8)}
LABELS = {"schedule_bias": "Schedule bias", "preservation_strength": "Preservation strength",
          "transition_contrast_boost": "Transition contrast boost", "mask_influence": "Mask influence",
          "difference_threshold": "Difference threshold", "difference_contrast": "Difference contrast"}
ENABLED_FIELD = "Soft inpainting enabled"
PNG_FIELDS = {name: f"Soft inpainting {label[0].lower()}{label[1:]}" for name, label in LABELS.items()}


def soft_problems(soft: SoftInpainting) -> dict[str, str]:
    """Each setting outside A1111's range, by field name ("soft_<name>"), as a sentence."""
    problems = {}
    for name, (low, high) in RANGES.items():
        value = getattr(soft, name)
        if not isinstance(value, (int, float)) or not np.isfinite(value) or not (low <= value <= high):
            problems[f"soft_{name}"] = f"Soft inpainting's {LABELS[name]} must be between {low} and {high} (got {value})."
    return problems


def soft_parameters(soft: SoftInpainting | None) -> dict:
    """The PNG fields, as A1111 writes them."""
    if soft is None:
        return {}
    return {ENABLED_FIELD: True, **{PNG_FIELDS[name]: f"{value:g}" for name, value in asdict(soft).items()}}


def soft_from_parameters(extra: dict) -> SoftInpainting | None:
    """The settings an A1111 PNG records (its defaults for any it lacks); None where soft inpainting was off."""
    if str(extra.get(ENABLED_FIELD, "")).strip().lower() != "true":
        return None
    values = {}
    for field in fields(SoftInpainting):
        value = parse_float(extra.get(PNG_FIELDS[field.name]))
        if value is not None:
            values[field.name] = value
    return SoftInpainting(**values)


# ----- during denoising -----


def kept_weight(mask: torch.Tensor, sigma: float, soft: SoftInpainting) -> torch.Tensor:
    """The weight of the step's own latents (1 - the original's) where the mask is `mask` (1 = repaint), at noise
    level `sigma`: A1111's mask ** (sigma ** schedule_bias × preservation_strength); 0 where the mask is 0, also
    at preservation strength 0 (where the power is 0 and 0 ** 0 would be 1)."""
    return torch.where(mask > 0, torch.pow(mask, (sigma ** soft.schedule_bias) * soft.preservation_strength), 0.0)


def latent_blend(original: torch.Tensor, current: torch.Tensor, weight: torch.Tensor, boost: float) -> torch.Tensor:
    """original × (1 - weight) + current × weight, its vectors (over channels) rescaled to the lengths' blend
    taken with the power `boost` (A1111's "transition contrast boost"): a linear blend of two unlike vectors is
    shorter than both, which shows as a faded, low-contrast transition."""
    blended = original * (1 - weight) + current * weight
    length = torch.linalg.vector_norm(blended, dim=1, keepdim=True).double() + 1e-5
    wanted = (torch.linalg.vector_norm(original, dim=1, keepdim=True).double().pow(boost) * (1 - weight[:, :1]).double()
              + torch.linalg.vector_norm(current, dim=1, keepdim=True).double().pow(boost) * weight[:, :1].double())
    return blended * (wanted.pow(1 / boost) / length).to(blended.dtype)


# ----- after denoising: how much of the result is pasted back -----


def difference_opacity(distance: np.ndarray, latent_mask: np.ndarray, soft: SoftInpainting) -> np.ndarray:
    """The result's opacity over the original (0-1, latent resolution) from the per-cell distance between the
    final latents and the original's: A1111's pixel composite. The distance map is smoothed first by a near-maximum
    and then a middle-percentile filter over a 5×5 window (A1111 weights its window by a Gaussian; scipy's filters
    are unweighted)."""
    from scipy import ndimage

    smoothed = ndimage.percentile_filter(distance, 95, size=5, mode="nearest")
    smoothed = ndimage.median_filter(smoothed, size=5, mode="nearest")
    scalar = 1 - np.clip(latent_mask, 0, 1) ** (soft.preservation_strength / 2)
    scalar = 0.5 * (1 - soft.mask_influence) + scalar * soft.mask_influence
    half_distance = soft.difference_threshold * scalar / (1.00001 - scalar)
    ratio = smoothed / np.maximum(half_distance, 1e-8)
    kept = smootherstep(1 / (1 + ratio ** soft.difference_contrast))
    return 1 - kept


def smootherstep(x: np.ndarray) -> np.ndarray:
    return x * x * x * (x * (6 * x - 15) + 10)


def composite_mask(distance: np.ndarray, soft_mask: Image.Image, soft: SoftInpainting) -> Image.Image:
    """The difference opacity at `soft_mask`'s size (the working size), resized and blurred (A1111's 4 px at
    512 px, scaled with the image). The caller limits it to the mask at the input's size."""
    latent_mask = np.asarray(soft_mask.resize(distance.shape[::-1], Image.Resampling.BOX), dtype=np.float32) / 255
    opacity = difference_opacity(distance, latent_mask, soft)
    image = Image.fromarray(np.clip(opacity * 255, 0, 255).astype(np.uint8), mode="L")
    image = image.resize(soft_mask.size, Image.Resampling.LANCZOS)
    radius = max(1, round(4 * min(soft_mask.size) / 512))
    return image.filter(ImageFilter.GaussianBlur(radius))
