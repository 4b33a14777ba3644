"""ControlNet preprocessors: a control unit's image -> the map its ControlNet reads (white lines on black for
scribble, lineart and canny models). Each runs on the CPU before any GPU work, at its processor resolution (the
image's shorter side), as A1111's ControlNet extension runs them (sd-webui-controlnet, annotator/ and
scripts/processor.py); the map is then fitted to the generation's size by the unit's resize mode."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class Threshold:
    label: str
    default: float
    minimum: float
    maximum: float


@dataclass(frozen=True)
class Preprocessor:
    name: str
    a1111_module: str  # its name in A1111's PNG fields
    description: str
    run: Callable[[np.ndarray, float, float], np.ndarray]  # (H×W×3 uint8, threshold a, threshold b) -> H×W×3 uint8
    threshold_a: Threshold | None = None
    threshold_b: Threshold | None = None

    def thresholds(self, a: float | None, b: float | None) -> tuple[float, float]:
        """The thresholds to run with (the defaults where not given), -1 where it takes none (as A1111 writes)."""
        return (self._value(self.threshold_a, a), self._value(self.threshold_b, b))

    @staticmethod
    def _value(threshold: Threshold | None, value: float | None) -> float:
        if threshold is None:
            return -1
        return threshold.default if value is None or value == -1 else float(value)


def _none(image: np.ndarray, a: float, b: float) -> np.ndarray:
    return image


def _invert(image: np.ndarray, a: float, b: float) -> np.ndarray:
    """A1111's "invert (from white bg & black line)": a drawing in dark lines on white becomes white on black (each
    channel inverted, as A1111 does: a coloured line becomes its complement, which the embedded ControlNet reads as
    well as a black one: docs/embedded-model.md)."""
    return 255 - image


def _scribble_xdog(image: np.ndarray, threshold: float, b: float) -> np.ndarray:
    """A1111's scribble_xdog: white where the difference of two Gaussian blurs (sigma 0.5 and 5) finds a dark
    line or edge stronger than the threshold; thick lines from a drawing or a photo, without a learned model."""
    import cv2

    fine = cv2.GaussianBlur(image.astype(np.float32), (0, 0), 0.5)
    coarse = cv2.GaussianBlur(image.astype(np.float32), (0, 0), 5.0)
    dog = (255 - np.min(coarse - fine, axis=2)).clip(0, 255).astype(np.uint8)
    lines = np.zeros_like(image)
    lines[2 * (255 - dog) > threshold] = 255
    return lines


def _canny(image: np.ndarray, low: float, high: float) -> np.ndarray:
    """OpenCV's Canny edges (A1111's "canny", thresholds 100 and 200 by default), white on black."""
    import cv2

    edges = cv2.Canny(image, int(low), int(high))
    return np.repeat(edges[:, :, None], 3, axis=2)


PREPROCESSORS: dict[str, Preprocessor] = {p.name: p for p in (
    Preprocessor("none", "none", "The image as it is: give the map the model expects.", _none),
    Preprocessor("invert", "invert (from white bg & black line)",
                 "Black lines on white (as sketches are drawn) become white on black, as the models read them.",
                 _invert),
    Preprocessor("scribble", "scribble_xdog", "Thick lines found in a drawing or a photo (XDoG).", _scribble_xdog,
                 threshold_a=Threshold("XDoG threshold", 32, 1, 64)),
    Preprocessor("canny", "canny", "Edges (OpenCV Canny).", _canny,
                 threshold_a=Threshold("Canny low threshold", 100, 1, 255),
                 threshold_b=Threshold("Canny high threshold", 200, 1, 255)),
)}


def preprocess(name: str, image: Image.Image, resolution: int, threshold_a: float | None = None,
               threshold_b: float | None = None) -> Image.Image:
    """The control map of `image` by the preprocessor `name`, run at `resolution` (the image's shorter side is
    scaled to it first, as A1111 does; "none" leaves the image as it is)."""
    preprocessor = PREPROCESSORS[name]
    rgb = image.convert("RGB")
    if name != "none":
        scale = resolution / min(rgb.size)
        size = (max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale)))
        if size != rgb.size:
            rgb = rgb.resize(size, Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BICUBIC)
    a, b = preprocessor.thresholds(threshold_a, threshold_b)
    return Image.fromarray(np.ascontiguousarray(preprocessor.run(np.asarray(rgb), a, b)))
