"""ControlNet preprocessors: a control unit's image -> the map its ControlNet reads (white lines on black for
scribble, lineart and canny models; near is white for depth). Each runs on the CPU before any GPU work, at its
processor resolution (the image's shorter side), as A1111's ControlNet extension runs them (sd-webui-controlnet,
annotator/ and scripts/processor.py); the map is then fitted to the generation's size by the unit's resize mode.

Lineart, soft edge and depth are learned detectors: their weights are files fetched like models (which files,
presets/controlnets.yaml's `preprocessor_weights`), and the detectors are controlnet_aux's (lineart, HED) and
transformers' (Depth Anything V2). Each is loaded for the map it makes and let go after it: they run on the CPU
(the device belongs to the memory manager) and load in well under a second (their files are 17 to 99 MB)."""

from __future__ import annotations

import pickle
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from studio.core.errors import ModelUnavailable


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
    # (H×W×3 uint8, threshold a, threshold b, its weights' folder or None) -> H×W×3 uint8
    run: Callable[[np.ndarray, float, float, Path | None], np.ndarray]
    threshold_a: Threshold | None = None
    threshold_b: Threshold | None = None
    needs_weights: bool = False  # a learned detector: its files are named in presets/controlnets.yaml

    def thresholds(self, a: float | None, b: float | None) -> tuple[float, float]:
        """The thresholds to run with (the defaults where not given), -1 where it takes none (as A1111 writes)."""
        return (self._value(self.threshold_a, a), self._value(self.threshold_b, b))

    @staticmethod
    def _value(threshold: Threshold | None, value: float | None) -> float:
        if threshold is None:
            return -1
        return threshold.default if value is None or value == -1 else float(value)


def _none(image: np.ndarray, a: float, b: float, weights: Path | None = None) -> np.ndarray:
    return image


def _invert(image: np.ndarray, a: float, b: float, weights: Path | None = None) -> np.ndarray:
    """A1111's "invert (from white bg & black line)": a drawing in dark lines on white becomes white on black (each
    channel inverted, as A1111 does: a coloured line becomes its complement, which the embedded ControlNet reads as
    well as a black one: docs/embedded-model.md)."""
    return 255 - image


def _scribble_xdog(image: np.ndarray, threshold: float, b: float, weights: Path | None = None) -> np.ndarray:
    """A1111's scribble_xdog: white where the difference of two Gaussian blurs (sigma 0.5 and 5) finds a dark
    line or edge stronger than the threshold; thick lines from a drawing or a photo, without a learned model."""
    import cv2

    fine = cv2.GaussianBlur(image.astype(np.float32), (0, 0), 0.5)
    coarse = cv2.GaussianBlur(image.astype(np.float32), (0, 0), 5.0)
    dog = (255 - np.min(coarse - fine, axis=2)).clip(0, 255).astype(np.uint8)
    lines = np.zeros_like(image)
    lines[2 * (255 - dog) > threshold] = 255
    return lines


def _canny(image: np.ndarray, low: float, high: float, weights: Path | None = None) -> np.ndarray:
    """OpenCV's Canny edges (A1111's "canny", thresholds 100 and 200 by default), white on black."""
    import cv2

    edges = cv2.Canny(image, int(low), int(high))
    return np.repeat(edges[:, :, None], 3, axis=2)


# the learned detectors run with the shorter side at most this (HED's activations at 2048² would hold gigabytes);
# their map is then fitted to the image's size like any other
MAX_LEARNED_RESOLUTION = 1024
LINEART_FILE = "sk_model.pth"  # lllyasviel/Annotators: informative-drawings' "realistic" line model
HED_FILE = "ControlNetHED.pth"  # lllyasviel/Annotators: lllyasviel's Apache-2.0 HED


def _lineart(image: np.ndarray, a: float, b: float, weights: Path | None = None) -> np.ndarray:
    """A1111's "lineart_realistic": informative-drawings' line model (controlnet_aux's Generator), white lines on
    black, as lllyasviel's lineart ControlNet reads them."""
    from controlnet_aux.lineart import Generator, LineartDetector

    model = Generator(3, 1, 3)
    with readable_weights("lineart", weights / LINEART_FILE) as path:
        model.load_state_dict(torch_load(path))
    detector = LineartDetector(model.eval(), model)
    return _at_input_size(detector(image, detect_resolution=min(image.shape[:2]),
                                   image_resolution=min(image.shape[:2]), output_type="np"), image)


def _softedge_hed(image: np.ndarray, a: float, b: float, weights: Path | None = None) -> np.ndarray:
    """A1111's "softedge_hed": HED's soft edges (controlnet_aux's HEDdetector on lllyasviel's Apache-2.0 port)."""
    from controlnet_aux.hed import ControlNetHED_Apache2, HEDdetector

    network = ControlNetHED_Apache2()
    with readable_weights("softedge", weights / HED_FILE) as path:
        network.load_state_dict(torch_load(path))
    detector = HEDdetector(network.float().eval())
    return _at_input_size(detector(image, detect_resolution=min(image.shape[:2]),
                                   image_resolution=min(image.shape[:2]), output_type="np"), image)


def _depth_anything(image: np.ndarray, a: float, b: float, weights: Path | None = None) -> np.ndarray:
    """A1111's "depth_anything_v2": Depth Anything V2's relative depth (transformers), scaled to 0-255 over the
    image with near white, as depth ControlNets read it."""
    import torch
    from transformers import AutoImageProcessor, AutoModelForDepthEstimation

    with readable_weights("depth", weights) as folder:  # float32: the maps are made on the CPU
        processor = AutoImageProcessor.from_pretrained(folder)
        model = AutoModelForDepthEstimation.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.inference_mode():
        depth = model(**processor(images=image, return_tensors="pt")).predicted_depth
        depth = torch.nn.functional.interpolate(depth[:, None], size=image.shape[:2], mode="bicubic")[0, 0]
    low, high = float(depth.min()), float(depth.max())
    scaled = ((depth - low) / max(high - low, 1e-12) * 255).clamp(0, 255).to(torch.uint8).numpy()
    return np.repeat(scaled[:, :, None], 3, axis=2)


@contextmanager
def readable_weights(name: str, path: Path) -> Iterator[Path]:
    """A learned preprocessor's weights being read: a file that cannot be (cut short, not what it should be) is
    ModelUnavailable naming it, as a model's is, not an error from deep inside torch."""
    try:
        yield path
    except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as error:
        raise ModelUnavailable(f"The {name} preprocessor's weights ({path}) could not be read: {error}. Delete them "
                               "to have them fetched again.") from error


def torch_load(path: Path) -> dict:
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


def _at_input_size(detected: np.ndarray, image: np.ndarray) -> np.ndarray:
    """controlnet_aux rounds its maps' sides to multiples of 64: back to the image's size, as three channels."""
    map_image = Image.fromarray(detected).convert("RGB")
    if map_image.size != (image.shape[1], image.shape[0]):
        map_image = map_image.resize((image.shape[1], image.shape[0]), Image.Resampling.BILINEAR)
    return np.asarray(map_image)


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
    Preprocessor("lineart", "lineart_realistic", "Clean lines of a photo or drawing (a learned line model).",
                 _lineart, needs_weights=True),
    Preprocessor("softedge", "softedge_hed", "Soft edges of a photo (HED).", _softedge_hed, needs_weights=True),
    Preprocessor("depth", "depth_anything_v2", "A depth map of a photo, near is white (Depth Anything V2).",
                 _depth_anything, needs_weights=True),
)}


def preprocess(name: str, image: Image.Image, resolution: int, threshold_a: float | None = None,
               threshold_b: float | None = None, weights: Path | None = None) -> Image.Image:
    """The control map of `image` by the preprocessor `name`, run at `resolution` (the image's shorter side is
    scaled to it first, as A1111 does; "none" leaves the image as it is). `weights`: the folder with a learned
    detector's files."""
    preprocessor = PREPROCESSORS[name]
    if preprocessor.needs_weights and weights is None:
        raise ValueError(f"The {name} preprocessor needs its weights' folder.")
    if preprocessor.needs_weights:  # their activations grow with the square of the side
        resolution = min(resolution, MAX_LEARNED_RESOLUTION)
    rgb = image.convert("RGB")
    if name != "none":
        scale = resolution / min(rgb.size)
        size = (max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale)))
        if size != rgb.size:
            rgb = rgb.resize(size, Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BICUBIC)
    a, b = preprocessor.thresholds(threshold_a, threshold_b)
    return Image.fromarray(np.ascontiguousarray(preprocessor.run(np.asarray(rgb), a, b, weights)))
