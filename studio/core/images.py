"""Images and masks as people upload them, made ready for a model: any mode, any size, clear errors."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter, ImageOps, UnidentifiedImageError

from studio.core.errors import InvalidRequest

MAX_INPUT_PIXELS = 50_000_000  # an 8000 x 6000 photo; larger inputs are refused before they are decoded


@dataclass(frozen=True)
class PreparedImage:
    """An input as the model sees it (RGB) and what must be restored afterwards."""

    rgb: Image.Image
    alpha: Image.Image | None  # "L", when the input had transparent pixels
    note: str | None  # said to the user when the input was changed in a way they should know


def open_image(path: str | Path, what: str = "image", max_pixels: int | None = None) -> Image.Image:
    """Open an uploaded file, or say plainly why it cannot be used. The size is checked before decoding."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                check_pixels(image.size, what, max_pixels)
                image.load()
                return ImageOps.exif_transpose(image)  # photos taken sideways come out upright, as viewers show them
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InvalidRequest([f"The {what} is too large to open (more than {MAX_INPUT_PIXELS:,} pixels)."]) from None
    except UnidentifiedImageError:  # PIL's message would show the server's temporary path
        raise InvalidRequest([f"The {what} file {Path(path).name!r} could not be read as an image: its content is "
                              "not in an image format. Upload a PNG, JPEG or WebP file."]) from None
    except (OSError, SyntaxError, ValueError) as error:
        raise InvalidRequest([f"The {what} file could not be read as an image ({type(error).__name__}: {error}). "
                              "Upload a PNG, JPEG or WebP file."]) from None


def check_pixels(size: tuple[int, int], what: str = "image", max_pixels: int | None = None) -> None:
    """Refuse inputs over the pixel limit (`max_pixels`, stricter in public mode, within MAX_INPUT_PIXELS)."""
    width, height = size
    limit = min(max_pixels or MAX_INPUT_PIXELS, MAX_INPUT_PIXELS)
    if width * height > limit:
        raise InvalidRequest([f"The {what} is {width}×{height}: more than {limit:,} pixels, the limit here. "
                              "Make it smaller first."])
    if width < 1 or height < 1:
        raise InvalidRequest([f"The {what} is empty (0 pixels)."])


def to_8bit(image: Image.Image) -> Image.Image:
    """16-bit and 32-bit greyscale ("I;16", "I", "F") as 8-bit "L", scaled rather than clipped at 255."""
    if image.mode not in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        return image
    values = np.asarray(image, dtype=np.float64)
    top = 65535.0 if image.mode.startswith("I;16") or values.max() > 255 else 255.0
    if image.mode == "F" and values.max() <= 1.0:
        top = 1.0
    return Image.fromarray(np.clip(values / top * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")


def alpha_of(image: Image.Image) -> Image.Image | None:
    """The alpha channel when some pixel is not fully opaque, else None."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        alpha = image.convert("RGBA").getchannel("A")
        return alpha if alpha.getextrema()[0] < 255 else None
    return None


def prepare_image(image: Image.Image, what: str = "image", max_pixels: int | None = None) -> PreparedImage:
    """RGB for the model. Transparent pixels are composited over white, and the alpha is kept to put back."""
    check_pixels(image.size, what, max_pixels)
    image = to_8bit(image)
    alpha = alpha_of(image)
    if alpha is None:
        return PreparedImage(image.convert("RGB"), None, None)
    white = Image.new("RGB", image.size, "white")
    white.paste(image.convert("RGBA"), mask=alpha)
    note = (f"The {what} has transparent areas: the model saw them over white, and they stay transparent "
            "outside the repainted area.")
    return PreparedImage(white, alpha, note)


def prepare_mask(mask: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """A boolean repaint mask: white is repainted; in a mask with transparency, the opaque strokes are."""
    check_pixels(mask.size, "mask")
    if mask.size != tuple(size):
        raise InvalidRequest([f"The mask is {mask.width}×{mask.height} but the image is {size[0]}×{size[1]}: "
                              "they must be the same size."])
    mask = to_8bit(mask)
    alpha = alpha_of(mask)
    if alpha is not None:
        return np.asarray(alpha) > 0
    return np.asarray(mask.convert("L")) >= 128


def blur_mask(mask: np.ndarray, radius: int) -> Image.Image:
    """The mask softened by a Gaussian blur, as A1111's "Mask blur" (0 = hard edges)."""
    image = Image.fromarray(mask.astype(np.uint8) * 255, mode="L")
    return image.filter(ImageFilter.GaussianBlur(radius)) if radius > 0 else image


def mask_box(mask: np.ndarray, padding: int) -> tuple[int, int, int, int]:
    """The (left, top, right, bottom) box around the mask's pixels, grown by `padding` within the image."""
    rows, columns = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    height, width = mask.shape
    return (max(0, columns[0] - padding), max(0, rows[0] - padding),
            min(width, columns[-1] + 1 + padding), min(height, rows[-1] + 1 + padding))


def working_size(width: int, height: int, preset, max_pixels: int | None = None, upscale: bool = False) -> tuple[int, int]:
    """The size a model works at for a `width` x `height` input: the same aspect ratio at about the preset's
    native pixel count (smaller inputs keep their size unless `upscale`), within its limits and size step."""
    scale = math.sqrt(preset.default_width * preset.default_height / (width * height))
    if not upscale:
        scale = min(scale, 1.0)
    w, h = width * scale, height * scale
    shrink = min(1.0, preset.max_size / max(w, h))
    if max_pixels:
        shrink = min(shrink, math.sqrt(max_pixels / (w * h)))
    w, h = w * shrink, h * shrink
    step = preset.size_step

    def fit(value: float) -> int:
        return int(min(preset.max_size, max(preset.min_size, round(value / step) * step)))

    return fit(w), fit(h)
