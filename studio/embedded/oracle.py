"""The oracle: reads an image of one shape on a plain background and says what it shows.

Pure geometry, no learned weights, so it can judge every model in the family (and itself on the procedural
images): the background is the colour of the border, the shape is the largest region that differs from it,
its colour the median inside it, its position the 3x3 cell of its centroid, and its kind follows from holes,
convexity and how much of its bounding box it fills.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError

from .scenes import BACKGROUNDS, PALETTE, SHAPE_COLOURS, SIZES, Scene

FOREGROUND_DISTANCE = 50.0  # RGB distance from the background beyond which a pixel belongs to a shape
MIN_SHAPE_FRACTION = 0.004  # smaller regions are specks, not shapes
_GRID = (("top left", "top", "top right"), ("left", "center", "right"), ("bottom left", "bottom", "bottom right"))


@dataclass(frozen=True)
class Reading:
    shape: str  # one of SHAPES, or "none" when no shape is found
    colour: str
    background: str
    position: str
    size: str
    features: dict

    def matches(self, scene: Scene) -> dict[str, bool]:
        main = scene.main
        return {
            "shape": self.shape == main.shape,
            "colour": self.colour == main.colour,
            "background": self.background == scene.background,
            "position": self.position == main.position,
            "size": self.size == main.size,
        }


def nearest_colour(rgb: np.ndarray, names: tuple[str, ...]) -> str:
    distances = [np.linalg.norm(rgb - np.asarray(PALETTE[name], dtype=np.float32)) for name in names]
    return names[int(np.argmin(distances))]


def background_colour(pixels: np.ndarray) -> np.ndarray:
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    return np.median(border, axis=0)


def shape_mask(pixels: np.ndarray, background: np.ndarray, within: np.ndarray | None = None) -> np.ndarray:
    """The largest connected region that differs from the background (optionally inside `within`)."""
    differs = np.linalg.norm(pixels - background, axis=-1) > FOREGROUND_DISTANCE
    if within is not None:
        differs &= within
    labels, count = ndimage.label(differs)
    if count == 0:
        return differs
    sizes = ndimage.sum(differs, labels, index=range(1, count + 1))
    return labels == (int(np.argmax(sizes)) + 1)


def classify_outline(mask: np.ndarray) -> tuple[str, dict]:
    filled = ndimage.binary_fill_holes(mask)
    area, filled_area = float(mask.sum()), float(filled.sum())
    ys, xs = np.nonzero(filled)
    box_area = float((xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1))
    corners = np.concatenate([np.stack([xs + dx, ys + dy], axis=1) for dx in (0, 1) for dy in (0, 1)])
    try:
        hull_area = ConvexHull(corners).volume  # in 2-D, "volume" is the area
    except QhullError:
        hull_area = box_area
    features = {
        "hole": 1.0 - area / filled_area,
        "extent": filled_area / box_area,
        "solidity": filled_area / hull_area,
    }
    if features["hole"] > 0.12:
        kind = "ring"
    elif features["solidity"] < 0.8:
        kind = "star"
    elif features["extent"] > 0.9:
        kind = "square"
    elif features["extent"] > 0.66:
        kind = "circle"
    else:
        kind = "triangle"
    return kind, features


def read(image: Image.Image | np.ndarray, within: np.ndarray | None = None) -> Reading:
    """Read the shape in an image. `within` (a boolean mask) limits the search, e.g. to an inpainted area."""
    pixels = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float32)
    side = pixels.shape[0]
    background_rgb = background_colour(pixels)
    background = nearest_colour(background_rgb, BACKGROUNDS)
    mask = shape_mask(pixels, background_rgb, within)
    if mask.sum() < MIN_SHAPE_FRACTION * mask.size:
        return Reading("none", "none", background, "none", "none", {"area": float(mask.sum())})

    kind, features = classify_outline(mask)
    # The colour from the inside of the shape, away from antialiased edges when there is an inside.
    inner = ndimage.binary_erosion(mask, iterations=1)
    colour_pixels = pixels[inner] if inner.sum() >= 4 else pixels[mask]
    colour = nearest_colour(np.median(colour_pixels, axis=0), SHAPE_COLOURS)

    filled = ndimage.binary_fill_holes(mask)
    cy, cx = ndimage.center_of_mass(filled)
    row, column = min(int(3 * cy / pixels.shape[0]), 2), min(int(3 * cx / pixels.shape[1]), 2)
    # Size from the half-width of the bounding box (squares are drawn at 0.85 of the radius).
    ys, xs = np.nonzero(filled)
    radius = max(xs.max() - xs.min() + 1, ys.max() - ys.min() + 1) / 2 / side
    threshold = (0.85 * SIZES["large"] + SIZES["small"]) / 2
    size = "large" if radius > threshold else "small"
    features.update(area=float(mask.sum()), radius=radius, centroid=(cx / side, cy / side))
    return Reading(kind, colour, background, _GRID[row][column], size, features)
