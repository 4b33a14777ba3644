"""Outpainting: the image on a larger canvas, the new area pre-filled and then repainted by the inpainting model.

As A1111's "Outpainting mk2" and Fooocus's outpaint do it: the canvas grows by a number of pixels on each side
asked for; the repaint mask is the new area and a band of twice the mask blur into the image on each side that
grew (so the seam itself is repainted), blurred; the new area starts as the chosen pre-fill. Every pixel of the
image outside that band comes back unchanged (the inpaint's paste-back).

The pre-fill only shapes what the model starts from where the denoising strength is below 1 (at 1 the model
starts from noise, and an inpainting model sees the new area as masked): A1111's and InvokeAI's advice is a
strength of 0.8 or so for the fills that carry the image's colours outwards.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from PIL import Image

EDGE, BLUR, NOISE = "Edge", "Blur", "Matched noise"
FILLS = (EDGE, BLUR, NOISE)  # Fooocus's and ComfyUI's edge extension; A1111's "fill"; mk2's matched noise
MAX_EXTENSION = 2048  # pixels on one side; the pixel limit usually binds first
SIDES = ("left", "right", "top", "bottom")  # the order of the form's fields and of the PNG's "Outpaint: ..."


@dataclass(frozen=True)
class Outpaint:
    """How far the canvas grows on each side (pixels of the input image) and how the new area is pre-filled."""

    left: int = 0
    top: int = 0
    right: int = 0
    bottom: int = 0
    fill: str = BLUR
    falloff: float = 1.0  # mk2's fall-off exponent: how fast the matched noise gives way to the image's colours
    colour_variation: float = 0.05  # mk2's colour variation: how much the noise varies in hue, not only lightness
    fill_seed: int | None = None  # the matched noise's seed (None: the request's); a PNG's, read back

    @property
    def sides(self) -> dict[str, int]:
        """How far each side grows, in SIDES' order."""
        return {side: getattr(self, side) for side in SIDES}

    @property
    def grows(self) -> bool:
        return any(self.sides.values())

    def canvas_size(self, size: tuple[int, int]) -> tuple[int, int]:
        return size[0] + self.left + self.right, size[1] + self.top + self.bottom


def placed(image_size: tuple[int, int], canvas_size: tuple[int, int], position: tuple[int, int], **options) -> Outpaint:
    """The extension that puts an image of `image_size` at `position` (its top-left corner) on a canvas of
    `canvas_size`: a mockup's placement, as an outpaint. Raises ValueError where it does not fit."""
    (width, height), (canvas_width, canvas_height), (x, y) = image_size, canvas_size, position
    if x < 0 or y < 0 or x + width > canvas_width or y + height > canvas_height:
        raise ValueError(f"A {width}×{height} image at ({x}, {y}) does not fit on a {canvas_width}×{canvas_height} "
                         "canvas: the canvas must hold the whole image.")
    return Outpaint(left=x, top=y, right=canvas_width - width - x, bottom=canvas_height - height - y, **options)


def outpaint_problems(outpaint: Outpaint, size: tuple[int, int] | None, max_pixels: int | None,
                      limit_name: str = "this server's limit") -> dict[str, str]:
    """Problems by field name, each a sentence; with the image's `size`, the canvas against `max_pixels`
    (`limit_name` says whose limit it is)."""
    problems = {}
    for side, value in outpaint.sides.items():
        if not isinstance(value, int) or not 0 <= value <= MAX_EXTENSION:
            problems[f"outpaint_{side}"] = (f"Outpaint {side} must be a whole number of pixels from 0 to "
                                            f"{MAX_EXTENSION} (got {value}).")
    if outpaint.fill not in FILLS:
        problems["outpaint_fill"] = f"Outpaint fill must be one of {', '.join(FILLS)} (got {outpaint.fill!r})."
    if not 0 < outpaint.falloff <= 4:
        problems["outpaint_falloff"] = f"Fall-off exponent must be above 0 and at most 4 (got {outpaint.falloff:g})."
    if not 0 <= outpaint.colour_variation <= 1:
        problems["outpaint_colour_variation"] = (f"Colour variation must be between 0 and 1 (got "
                                                 f"{outpaint.colour_variation:g}).")
    if problems or size is None or not max_pixels:
        return problems
    width, height = outpaint.canvas_size(size)
    if width * height > max_pixels:
        problems["outpaint"] = (f"The extended canvas would be {width}×{height} ({width * height:,} pixels), over "
                                f"{limit_name} of {max_pixels:,}: {largest_extension(outpaint, size, max_pixels)}.")
    return problems


def largest_extension(outpaint: Outpaint, size: tuple[int, int], max_pixels: int) -> str:
    """The largest extension in the same proportions that fits `max_pixels`, said as a user would type it."""
    low, high = 0.0, 1.0
    for _ in range(40):  # the canvas grows monotonically with the scale: bisect it
        middle = (low + high) / 2
        trial = scaled(outpaint, middle)
        width, height = trial.canvas_size(size)
        low, high = (middle, high) if width * height <= max_pixels else (low, middle)
    best = scaled(outpaint, low)
    sides = ", ".join(f"{side} {value}" for side, value in best.sides.items() if outpaint.sides[side])
    if not best.grows:
        return "the image itself is already at the limit, so it cannot grow"
    return f"at most {sides} px"


def scaled(outpaint: Outpaint, factor: float) -> Outpaint:
    return replace(outpaint, **{side: int(value * factor) for side, value in outpaint.sides.items()})


def extend(image: Image.Image, outpaint: Outpaint, mask_blur: int, user_mask: np.ndarray | None = None,
           seed: int = 0) -> tuple[Image.Image, np.ndarray]:
    """(the canvas with the image on it and the new area pre-filled, the repaint mask: the new area and a band of
    2 × mask_blur pixels into the image on each side that grew, plus any mask the user painted on the image)."""
    width, height = image.size
    canvas_size = outpaint.canvas_size(image.size)
    known = np.zeros(canvas_size[::-1], dtype=bool)
    known[outpaint.top:outpaint.top + height, outpaint.left:outpaint.left + width] = True
    pixels = np.zeros((*canvas_size[::-1], 3), dtype=np.float32)
    pixels[known] = np.asarray(image.convert("RGB"), dtype=np.float32).reshape(-1, 3)
    filled = PRE_FILLS[outpaint.fill](pixels, known, outpaint, np.random.default_rng(seed))
    canvas = Image.fromarray(np.clip(np.where(known[..., None], pixels, filled), 0, 255).round().astype(np.uint8))

    band = 2 * mask_blur
    keep = known.copy()  # the image's pixels the mask leaves alone: all but the band along each side that grew
    rows, columns = slice(outpaint.top, outpaint.top + height), slice(outpaint.left, outpaint.left + width)
    if outpaint.left:
        keep[rows, outpaint.left:outpaint.left + band] = False
    if outpaint.right:
        keep[rows, max(outpaint.left, outpaint.left + width - band):outpaint.left + width] = False
    if outpaint.top:
        keep[outpaint.top:outpaint.top + band, columns] = False
    if outpaint.bottom:
        keep[max(outpaint.top, outpaint.top + height - band):outpaint.top + height, columns] = False
    mask = ~keep
    if user_mask is not None:
        mask[rows, columns] |= user_mask
    return canvas, mask


# ----- pre-fills: what the new area starts as (float RGB 0-255, the known pixels as they are) -----


def edge_fill(pixels: np.ndarray, known: np.ndarray, outpaint: Outpaint, rng) -> np.ndarray:
    """Each new pixel the colour of the nearest image pixel (Fooocus's and ComfyUI's edge extension)."""
    from scipy import ndimage

    _, (rows, columns) = ndimage.distance_transform_edt(~known, return_indices=True)
    return pixels[rows, columns]


def blur_fill(pixels: np.ndarray, known: np.ndarray, outpaint: Outpaint, rng) -> np.ndarray:
    """A1111's "fill" (modules/masking.py): the image's colours smeared outwards by blurs of decreasing radius,
    each laid over the last, a blur normalised by how much of its window is image (premultiplied alpha). In
    floats: A1111's 8-bit premultiplied blur leaves grain where little of the window is image."""
    from scipy import ndimage

    alpha = known.astype(np.float32)
    premultiplied = np.dstack([pixels * alpha[..., None], alpha])
    result = np.zeros_like(pixels)
    covered = np.zeros(known.shape, dtype=np.float32)
    for radius, repeats in ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1)):
        layer = (ndimage.gaussian_filter(premultiplied, sigma=(radius, radius, 0), mode="constant", truncate=3.0)
                 if radius else premultiplied)
        layer_alpha = np.clip(layer[..., 3], 0, 1)
        colour = layer[..., :3] / np.maximum(layer[..., 3:], 1e-12)  # un-premultiplied, as A1111's RGBA
        for _ in range(repeats):  # alpha-composited over what is there, as A1111 lays each blur
            result = colour * layer_alpha[..., None] + result * (1 - layer_alpha[..., None])
            covered = layer_alpha + covered * (1 - layer_alpha)
    return result / np.maximum(covered[..., None], 1e-6)


def matched_noise_fill(pixels: np.ndarray, known: np.ndarray, outpaint: Outpaint, rng) -> np.ndarray:
    """mk2's idea: the blur fill with noise added whose spectrum is the image's own (so its grain and scale of
    detail match), as strong as the image's own variation, growing with the distance from the image by the
    fall-off exponent; `colour_variation` lets the noise differ between channels (0: in lightness only)."""
    from scipy import ndimage

    base = blur_fill(pixels, known, outpaint, rng)
    grey = rng.standard_normal(known.shape)
    noise = np.stack([(1 - outpaint.colour_variation) * grey + outpaint.colour_variation * rng.standard_normal(known.shape)
                      for _ in range(3)], axis=-1)
    image_part = pixels[known].reshape(-1, 3)
    spectrum = np.abs(np.fft.fft2(np.where(known[..., None], pixels - image_part.mean(0), 0), axes=(0, 1)))
    shaped = np.real(np.fft.ifft2(np.fft.fft2(noise, axes=(0, 1)) * spectrum, axes=(0, 1)))
    shaped *= image_part.std(0) / np.maximum(shaped.std(axis=(0, 1)), 1e-6)
    distance = ndimage.distance_transform_edt(~known)
    reach = max(float(distance.max()), 1.0)
    weight = (distance / reach) ** (1 / outpaint.falloff)
    return base + shaped * weight[..., None]


PRE_FILLS = {EDGE: edge_fill, BLUR: blur_fill, NOISE: matched_noise_fill}
