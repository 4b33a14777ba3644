"""The embedded flow family measured with the oracle, through the studio's own engine: the prompt read by the FLUX
family code (T5's window, CLIP's pooled embedding, A1111's syntax), true CFG, each flow sampler and its shift. As
`python -m studio.embedded evaluate-flow` prints it (docs/embedded-model.md quotes it).

The evaluation scenes are the UNet family's (half from held-out triples, fixed seeds); the CFG the preset starts at
is chosen on other scenes (VALIDATION_SEED; drawn the same way, so half of them from held-out triples too), never on
these.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image

from studio.a1111.schedulers import FLOW_SCHEDULERS
from studio.embedded import oracle, scenes
from studio.embedded.evaluation import (
    BARS,
    EVAL_SEED,
    evaluation_scenes,
    inpaint_cases,
    oracle_tallies,
    shape_inside,
)
from studio.embedded.flow import FLOW_DIR, SHIFT

PRESET = "embedded-flux"
VALIDATION_SEED = EVAL_SEED + 20
SHIFTS = (0.3, 1.0, SHIFT, 8.0, 20.0)  # below 1: more of the steps at low noise; above: at high noise
SHIFT_STEPS = (3, 6, 20)  # few steps, where the schedule matters most, and the default
CFG_CHOICES = (1.0, 2.0, 3.0, 5.0)  # 1: no CFG (one evaluation a step)
SIZES = (48, 64, 96, 128)  # trained at 64 px, fine-tuned at 64 and 128
SIZE_SEED = EVAL_SEED + 30
KEYS = ("colour", "background", "shape", "position", "size")


def flow_engines(models_dir: Path):
    """The studio's engines over the embedded flow preset alone, its weights from `models_dir`; and the preset."""
    from studio.models.presets import PresetCatalog, load_presets
    from studio.tasks.engines import local_engines

    # its smallest size measured too: the preset offers 64 px and up because of what 48 px gives
    preset = replace(load_presets().get(PRESET), local=Path(models_dir) / FLOW_DIR, min_size=min(SIZES))
    return local_engines(PresetCatalog([preset], PRESET)), preset


def drawer(engine, preset, **settings):
    """draw(prompt, seed) -> the image the engine makes at the preset's defaults, with `settings` changed."""
    from studio.tasks.generation import TextToImageRequest

    defaults = replace(TextToImageRequest.preset_defaults(preset), live_preview="Off", **settings)

    def draw(prompt: str, seed: int):
        return engine.generate(replace(defaults, prompt=prompt, seed=seed)).images[0].image

    return draw


def evaluate_flow_inpaint(inpainter, preset, count: int) -> dict:
    """The UNet family's inpainting cases (a box mask where no shape is, the shape to paint) through the studio's
    Inpaint (FluxInpaintPipeline), at the preset's defaults and strength 1. The prompt names the shape's place too:
    the model has no Fill variant and sees the mask only as the original put back outside it after each step, so
    a shape drawn elsewhere is painted over (the UNet family's 9-channel inpainting model reads the mask)."""
    from studio.tasks.inpainting import InpaintRequest

    right = unchanged = 0
    for index, (before, target, mask) in enumerate(inpaint_cases(count)):
        init = scenes.render(before)
        request = InpaintRequest(prompt=scenes.caption(scenes.Scene(before.background, (target,))),
                                 preset=PRESET, seed=EVAL_SEED + index,
                                 steps=preset.default_steps, guidance_scale=preset.inpaint_default_guidance,
                                 scheduler=preset.default_scheduler, strength=1.0, mask_blur=0, live_preview="Off")
        result = np.asarray(inpainter.inpaint(init, Image.fromarray(mask.astype(np.uint8) * 255), request)
                            .images[0].image.convert("RGB"))
        reading = oracle.read(Image.fromarray(result), within=mask)
        matches = reading.matches(replace(before, shapes=(target,)))
        right += shape_inside(reading, mask) and matches["shape"] and matches["colour"]
        unchanged += np.array_equal(result[~mask], np.asarray(init)[~mask])
    return {"n": count, "right shape and colour inside the mask": right / count,
            "outside pixels identical": unchanged / count}


def background_grain(image: Image.Image, scene: scenes.Scene) -> float:
    """The spread of the image's pixels (0-255, per channel) over its plain background: where both the drawn scene
    and the image show the background colour, 4 px from any shape in either (a shape drawn elsewhere is not counted
    as grain). Noise the sampler left; 0 for a flat background."""
    from scipy import ndimage

    colour = np.asarray(scenes.PALETTE[scene.background], dtype=np.float32)
    drawn = np.asarray(scenes.render(scene), dtype=np.float32)
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    shapes = (np.linalg.norm(drawn - colour, axis=-1) >= 1) | (
        np.linalg.norm(pixels - colour, axis=-1) > oracle.FOREGROUND_DISTANCE)
    flat = ~ndimage.binary_dilation(shapes, iterations=4)
    return float(pixels[flat].std(0).mean()) if flat.any() else float("nan")


def shift_tallies(engine, preset, steps: int, shift: float, count: int) -> dict:
    """Oracle tallies (Euler, `steps`) at a shift of the user's, with the background's grain (mean over images)."""
    samples: list = []
    seed = EVAL_SEED + 21
    tallies = oracle_tallies(drawer(engine, preset, steps=steps, shift=shift), count, seed=seed, samples=samples)
    grains = [background_grain(image, scene)
              for (_, image, _), (scene, _) in zip(samples, evaluation_scenes(count, seed))]
    return tallies | {"grain": float(np.nanmean(grains))}


def read_at_64(draw):
    """draw, its image read by the oracle at the model's native 64 px (as bench/hires_fix.py reads 128 px ones)."""
    return lambda prompt, seed: draw(prompt, seed).convert("RGB").resize((64, 64), Image.Resampling.LANCZOS)


def size_tallies(engine, preset, count: int) -> dict:
    """Oracle tallies at each of SIZES, and with Hires. fix (Latent ×2 at strength 0.5 from 64 px to 128)."""
    from studio.tasks.hires import HiresFix

    found = {f"{size} px": oracle_tallies(read_at_64(drawer(engine, preset, width=size, height=size)), count,
                                          seed=SIZE_SEED)
             for size in SIZES}
    hires = HiresFix(upscaler="Latent", upscale=2.0, denoising_strength=0.5)
    found["128 px by Hires. fix"] = oracle_tallies(read_at_64(drawer(engine, preset, hires=hires)), count,
                                                   seed=SIZE_SEED)
    return found


def both(tallies: dict, key: str) -> float:
    """A measure over seen and held-out scenes together."""
    seen, held = tallies["seen"], tallies["held-out"]
    return (seen[key] * seen["n"] + held[key] * held["n"]) / (seen["n"] + held["n"])


@dataclass
class FlowReport:
    samplers: dict = field(default_factory=dict)  # sampler -> oracle tallies at the preset's defaults
    shifts: dict = field(default_factory=dict)  # (steps, shift) -> tallies (Euler)
    guidance: dict = field(default_factory=dict)  # CFG -> tallies on the validation scenes
    inpaint: dict = field(default_factory=dict)
    sizes: dict = field(default_factory=dict)  # "96 px" -> tallies
    defaults: dict = field(default_factory=dict)


def evaluate_flow(models_dir: Path, prompt_count: int = 200, shift_count: int = 60,
                  guidance_count: int = 100, inpaint_count: int = 100, size_count: int = 40) -> FlowReport:
    engines, preset = flow_engines(models_dir)
    engine = engines.text_to_image
    report = FlowReport(defaults=dict(steps=preset.default_steps, cfg=preset.default_guidance))
    for sampler in FLOW_SCHEDULERS:
        report.samplers[sampler] = oracle_tallies(drawer(engine, preset, scheduler=sampler), prompt_count)
    for steps in SHIFT_STEPS:
        for shift in SHIFTS:
            report.shifts[steps, shift] = shift_tallies(engine, preset, steps, shift, shift_count)
    for cfg in CFG_CHOICES:
        report.guidance[cfg] = oracle_tallies(drawer(engine, preset, guidance_scale=cfg), guidance_count,
                                              seed=VALIDATION_SEED)
    report.inpaint = evaluate_flow_inpaint(engines.inpainter, preset, inpaint_count)
    report.sizes = size_tallies(engine, preset, size_count)
    return report


def format_flow_table(report: FlowReport) -> str:
    steps, cfg = report.defaults["steps"], report.defaults["cfg"]
    lines = [f"Each flow sampler at the preset's defaults ({steps} steps, CFG {cfg:g}, shift {SHIFT:g}); "
             "seen / held-out prompts:", "",
             "| sampler | " + " | ".join(KEYS) + " | prompts | bars |", "|---|" + "---|" * (len(KEYS) + 2)]
    for sampler, tallies in report.samplers.items():
        cells = [f"{tallies['seen'][key]:.0%} / {tallies['held-out'][key]:.0%}" for key in KEYS]
        met = all(min(tallies["seen"][key], tallies["held-out"][key]) >= BARS[key] for key in KEYS if key in BARS)
        lines.append(f"| {sampler} | " + " | ".join(cells)
                     + f" | {tallies['seen']['n']} / {tallies['held-out']['n']} | {'met' if met else 'NOT met'} |")
    lines += ["", "Bars: colour and background ≥ 95%, shape ≥ 85%, position ≥ 80% on both.", "",
              "The schedule's shift (Euler; seen and held-out together; grain: the spread of the background's "
              "pixels, 0-255):", "",
              "| steps | shift | colour | background | shape | position | grain |", "|---|---|---|---|---|---|---|"]
    for (steps, shift), tallies in report.shifts.items():
        own = " (its own)" if shift == SHIFT else ""
        lines.append(f"| {steps} | {shift:g}{own} | "
                     + " | ".join(f"{both(tallies, key):.0%}" for key in ("colour", "background", "shape", "position"))
                     + f" | {tallies['grain']:.2f} |")
    lines += ["", "CFG on the validation scenes (Euler, default steps), where the preset's default was chosen:", "",
              "| CFG | colour | background | shape | position |", "|---|---|---|---|---|"]
    for scale, tallies in report.guidance.items():
        lines.append(f"| {scale:g} | "
                     + " | ".join(f"{both(tallies, key):.0%}" for key in ("colour", "background", "shape", "position"))
                     + " |")
    if report.sizes:
        lines += ["", "Other sizes (Euler, default steps and CFG; read at 64 px; seen and held-out together):", "",
                  "| size | colour | background | shape | position |", "|---|---|---|---|---|"]
        for size, tallies in report.sizes.items():
            lines.append(f"| {size} | " + " | ".join(f"{both(tallies, key):.0%}"
                                                    for key in ("colour", "background", "shape", "position")) + " |")
    inpaint = report.inpaint
    if inpaint:
        lines += ["", f"Inpaint (a box where no shape is, the prompt naming the place; {inpaint['n']} cases, Euler, "
                      f"strength 1): the right shape "
                      f"and colour inside the mask {inpaint['right shape and colour inside the mask']:.0%} "
                      f"(bar {BARS['inpaint']:.0%}), outside pixels identical "
                      f"{inpaint['outside pixels identical']:.0%}."]
    return "\n".join(lines)
