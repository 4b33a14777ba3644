"""Outpainting and soft inpainting measured on the embedded model with the oracle, through the studio's own
Inpainter (plan, run, paste back: what a user's request runs). bench/outpaint_quality.py prints the tables.

- Outpaint: a scene whose shape the image's right border cuts (the scene drawn at 64 px, its right part cut off);
  the image is extended right by what was cut. A case passes where the oracle finds one shape of the scene's colour
  on the scene's background, reaching across the old border (the extension continues it). The seam: the mean
  colour step across the old border in background rows, over the background's own step between neighbouring
  columns elsewhere (1 = no seam).
- Soft inpainting against the hard mask on the stroke-coherence cases (evaluation.cutting_cases, the measured set,
  never looked at to set a threshold): the share of clean results (evaluation.coherence) and the seam measure
  along the mask's edge and along the outer edge of its blur (where the paste-back ends).
"""

from __future__ import annotations

import random

import numpy as np
from PIL import Image

from studio.embedded import oracle, scenes
from studio.embedded.evaluation import (
    CUTTING_SEED,
    apart_from_background,
    coherence,
    cutting_cases,
    evaluation_scenes,
    plain_caption,
)
from studio.tasks.inpainting import InpaintRequest, mask_tools_for
from studio.tasks.outpainting import Outpaint
from studio.tasks.soft_inpainting import SoftInpainting

OUTPAINT_SEED = 4242
SIDE = 64


def border_cases(count: int, seed: int = OUTPAINT_SEED) -> list[tuple[scenes.Scene, int]]:
    """(scene, cut): scenes (half held-out combinations) whose main shape crosses x = SIDE - cut, so the image
    cut there has the shape cut by its right border."""
    rng = random.Random(seed)
    cases = []
    while len(cases) < count:
        scene, _ = evaluation_scenes(2, rng.randrange(10**9))[len(cases) % 2]
        cx, _ = scene.main.centre(SIDE)
        radius = scene.main.radius(SIDE)
        cut = rng.randrange(16, 33, 8)
        border = SIDE - cut
        if cx - radius * 0.6 < border < cx + radius * 0.6:  # the border runs through the shape's middle part
            cases.append((scene, cut))
    return cases


def continues_the_shape(result: Image.Image, scene: scenes.Scene, border: int) -> bool:
    """One shape, of the scene's colour, on the scene's background, on both sides of the old border."""
    pixels, background, _, _, regions = apart_from_background(result)
    found = oracle.shape_mask(pixels, background)
    reading = oracle.read(result)
    across = found[:, :border].any() and found[:, border:].any()
    return (regions == 1 and across and reading.colour == scene.main.colour
            and reading.background == scene.background)


def seam_ratio(result: Image.Image, edge: np.ndarray, background_only: np.ndarray) -> float:
    """The mean colour step (RGB distance to the right or lower neighbour) at the `edge` pixels, over the same
    step at the other background pixels: how much more the picture changes at the seam than the background does."""
    pixels = np.asarray(result.convert("RGB"), dtype=np.float32)
    step = np.zeros(pixels.shape[:2], dtype=np.float32)
    step[:, :-1] = np.linalg.norm(pixels[:, 1:] - pixels[:, :-1], axis=-1)
    step[:-1, :] = np.maximum(step[:-1, :], np.linalg.norm(pixels[1:] - pixels[:-1], axis=-1))
    at_edge, elsewhere = edge & background_only, ~edge & background_only
    if not at_edge.any() or not elsewhere.any():
        return float("nan")
    return float(step[at_edge].mean() / max(step[elsewhere].mean(), 1e-3))


def background_pixels(image: Image.Image, scene: scenes.Scene) -> np.ndarray:
    """Pixels the scene's background colour, away (2 px) from anything else: where a seam shows as itself."""
    from scipy import ndimage

    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    near = np.linalg.norm(pixels - np.asarray(scenes.PALETTE[scene.background], dtype=np.float32), axis=-1) < 40
    return ndimage.binary_erosion(near, iterations=2)


def evaluate_outpaint(inpainter, count: int, fills=("Blur", "Edge", "Matched noise"), strengths=(1.0, 0.85),
                      steps: int | None = None) -> list[dict]:
    """One row per (fill, strength): the share of cases whose extension continues one shape of the right colour
    on the right background, and the mean seam ratio."""
    preset = inpainter.presets.get("embedded")
    rows = []
    for strength in strengths:
        for fill in fills if strength < 1 else fills[:1]:  # at strength 1 the fill is never seen
            passed, seams = 0, []
            for index, (scene, cut) in enumerate(border_cases(count)):
                border = SIDE - cut
                full = scenes.render(scene)
                image = full.crop((0, 0, border, SIDE))
                request = InpaintRequest(prompt=plain_caption(scene), seed=OUTPAINT_SEED + index, strength=strength,
                                         steps=steps or preset.default_steps, scheduler=preset.default_scheduler,
                                         guidance_scale=preset.inpaint_default_guidance,
                                         mask_blur=mask_tools_for(image.size).mask_blur,
                                         outpaint=Outpaint(right=cut, fill=fill))
                result = inpainter.inpaint(image, None, request).images[0].image.convert("RGB")
                passed += continues_the_shape(result, scene, border)
                edge = np.zeros((SIDE, SIDE), dtype=bool)
                edge[:, border - 1] = True  # the step from the last old column to the first new one
                seams.append(seam_ratio(result, edge, background_pixels(result, scene)))
            rows.append({"fill": fill if strength < 1 else "any (strength 1)", "strength": strength, "n": count,
                         "continues": passed / count, "seam": float(np.nanmean(seams)) if seams else float("nan")})
    return rows


def evaluate_soft(inpainter, count: int, steps: int | None = None, seed: int = CUTTING_SEED) -> list[dict]:
    """The stroke-coherence cases inpainted with the hard mask (the default blur, and A1111's "high blur" for soft
    inpainting) and with soft inpainting: clean share and seam ratios along the mask's edge and the blur's end."""
    from scipy import ndimage

    from studio.core.images import blur_mask
    from studio.tasks.inpainting import sharpened

    preset = inpainter.presets.get("embedded")
    high_blur = 4 * mask_tools_for((SIDE, SIDE)).mask_blur
    settings = [("hard mask", mask_tools_for((SIDE, SIDE)).mask_blur, None), ("hard mask", high_blur, None),
                ("soft inpainting", high_blur, SoftInpainting())]
    rows = []
    for label, blur, soft in settings:
        clean, seams, outer_seams = 0, [], []
        for index, (scene, mask) in enumerate(cutting_cases(count, seed)):
            init = scenes.render(scene)
            request = InpaintRequest(prompt=plain_caption(scene), seed=seed + index, steps=steps or preset.default_steps,
                                     scheduler=preset.default_scheduler, guidance_scale=preset.inpaint_default_guidance,
                                     mask_blur=blur, soft=soft)
            mask_image = Image.fromarray(mask.astype(np.uint8) * 255)
            result = inpainter.inpaint(init, mask_image, request).images[0].image.convert("RGB")
            clean += coherence(result, scene, mask)["coherent"]
            edge = ndimage.binary_dilation(mask, iterations=1) & ~ndimage.binary_erosion(mask, iterations=1)
            background = background_pixels(result, scene)
            seams.append(seam_ratio(result, edge, background))
            reach = np.asarray(sharpened(blur_mask(mask, blur))) > 0  # what the paste-back can change
            outer = ndimage.binary_dilation(reach) & ~ndimage.binary_erosion(reach)
            outer_seams.append(seam_ratio(result, outer, background))
        rows.append({"setting": label, "mask blur": blur, "n": count, "clean": clean / count,
                     "seam": float(np.nanmean(seams)), "outer seam": float(np.nanmean(outer_seams))})
    return rows
