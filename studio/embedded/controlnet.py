"""A ControlNet for the embedded model, trained here on sketches of the drawn scenes, so that the offline studio does
what a sketch user expects (the shape and its place from the drawing, the colours from the prompt) and the
ControlNet mechanics are tested on a real model.

    python -m studio.embedded train-controlnet     # models/embedded-controlnet-scribble (fp16, under 5 MB)
    python -m studio.embedded evaluate-controlnet  # the oracle's table on held-out sketches, with and without it

The drawings are black strokes on white, as people draw; the ControlNet reads them inverted (white on black: the
invert preprocessor's map). Training draws each scene's shape in one of four stroke styles (a clean outline, a
filled blob, a wobbly hand-drawn outline of varied width, an outline with gaps); the evaluation draws in a fifth,
never trained on ("sketchy": two or three thin overlapping strokes that overshoot), on scenes of its own seed.
The prompts give colours only half the time in training ("a red shape on a blue background"), as the evaluation's
always do; the other half are the scenes' full captions, and 10% are empty (classifier-free guidance)."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, ControlNetModel, DDPMScheduler, UNet2DConditionModel
from PIL import Image, ImageDraw, ImageOps
from safetensors.torch import save_file
from transformers import CLIPTextModel, CLIPTokenizer

from studio.embedded import oracle, scenes
from studio.embedded.stages import CFG_DROPOUT, NOISE_SCHEDULE, PIPELINE_DIR, SIDE, encode, tokenize
from studio.embedded.training import SEED, Stage

CONTROLNET_DIR = "embedded-controlnet-scribble"
TRAINING_STYLES = ("outline", "filled", "wobbly", "partial")
HELD_OUT_STYLE = "sketchy"
EVALUATION_SEED = SEED + 31  # scenes the evaluation draws; training never sees them
SUPERSAMPLE = 4


# ----- sketches -----

def outlines(shape: scenes.Shape, side: int = SIDE) -> list[list[tuple[float, float]]]:
    """The shape's outline(s) as closed polygons in pixels (a ring has two)."""
    cx, cy = shape.centre(side)
    radius = shape.radius(side)

    def circle(r: float, count: int = 48) -> list[tuple[float, float]]:
        return [(cx + r * math.cos(2 * math.pi * k / count), cy + r * math.sin(2 * math.pi * k / count))
                for k in range(count)]

    if shape.shape == "circle":
        return [circle(radius)]
    if shape.shape == "ring":
        return [circle(radius), circle(radius * 0.55, 32)]
    if shape.shape == "square":
        half = radius * 0.85
        return [[(cx - half, cy - half), (cx + half, cy - half), (cx + half, cy + half), (cx - half, cy + half)]]
    return [scenes._shape_polygon(shape.shape, cx, cy, radius)]


def densified(polygon: list[tuple[float, float]], step: float = 1.0) -> list[tuple[float, float]]:
    """Points every `step` px along the closed polygon."""
    points = []
    for (x0, y0), (x1, y1) in zip(polygon, polygon[1:] + polygon[:1]):
        count = max(1, int(math.hypot(x1 - x0, y1 - y0) / step))
        points += [(x0 + (x1 - x0) * k / count, y0 + (y1 - y0) * k / count) for k in range(count)]
    return points


def wobbled(points: list[tuple[float, float]], rng: random.Random, amount: float) -> list[tuple[float, float]]:
    """A hand's wobble: a smooth random offset along the stroke (a few slow waves), up to `amount` px."""
    waves = [(rng.uniform(0.5, 3.0), rng.uniform(0, 2 * math.pi), rng.uniform(0.3, 1.0)) for _ in range(3)]
    total = sum(weight for _, _, weight in waves)
    out = []
    for index, (x, y) in enumerate(points):
        t = 2 * math.pi * index / max(1, len(points))
        dx = sum(w * math.sin(f * t + p) for f, p, w in waves) / total
        dy = sum(w * math.cos(f * t + p * 1.3) for f, p, w in waves) / total
        out.append((x + amount * dx, y + amount * dy))
    return out


def draw_sketch(shape: scenes.Shape, style: str, rng: random.Random, side: int = SIDE) -> Image.Image:
    """The shape drawn in black on white, in a stroke style: "outline", "filled", "wobbly", "partial" (training)
    or "sketchy" (held out)."""
    big = side * SUPERSAMPLE
    image = Image.new("L", (big, big), 255)
    draw = ImageDraw.Draw(image)

    def scaled(points):
        return [(x * SUPERSAMPLE, y * SUPERSAMPLE) for x, y in points]

    polygons = outlines(shape, side)
    if style == "filled":
        draw.polygon(scaled(polygons[0]), fill=0)
        if len(polygons) > 1:  # a ring's hole
            draw.polygon(scaled(polygons[1]), fill=255)
    for polygon in polygons if style != "filled" else ():
        if style == "outline":
            width = rng.uniform(1.0, 2.5)
            draw.line(scaled(polygon + polygon[:1]), fill=0, width=round(width * SUPERSAMPLE), joint="curve")
        elif style == "wobbly":
            points = wobbled(densified(polygon), rng, rng.uniform(0.5, 2.0))
            width = rng.uniform(1.0, 3.5)
            draw.line(scaled(points + points[:1]), fill=0, width=round(width * SUPERSAMPLE), joint="curve")
        elif style == "partial":
            points = densified(polygon)
            gap = rng.uniform(0.1, 0.3) * len(points)
            start = rng.randrange(len(points))
            kept = [points[(start + gap.__int__() + k) % len(points)] for k in range(len(points) - int(gap))]
            draw.line(scaled(kept), fill=0, width=round(rng.uniform(1.0, 2.5) * SUPERSAMPLE), joint="curve")
        elif style == "sketchy":
            points = densified(polygon)
            for _ in range(rng.choice((2, 3))):  # thin strokes, each a little off, overshooting where it closes
                stroke = wobbled(points, rng, rng.uniform(0.3, 1.0))
                overshoot = stroke[: max(2, len(stroke) // 8)]
                shifted = [(x + rng.uniform(-0.7, 0.7), y + rng.uniform(-0.7, 0.7)) for x, y in stroke + overshoot]
                draw.line(scaled(shifted), fill=0, width=max(1, round(0.7 * SUPERSAMPLE)), joint="curve")
        else:
            raise ValueError(f"Unknown sketch style {style!r}.")
    return image.resize((side, side), Image.Resampling.BOX).convert("RGB")


def control_map(drawing: Image.Image) -> Image.Image:
    """What the ControlNet reads: the drawing inverted (white strokes on black), as the invert preprocessor does."""
    return Image.fromarray(255 - np.asarray(drawing.convert("RGB")))


def colour_prompt(scene: scenes.Scene, rng: random.Random | None = None) -> str:
    """A prompt that gives the colours only: the shape's and the background's."""
    colour = scenes.colour_word(scene.main.colour, rng)
    background = scenes.colour_word(scene.background, rng)
    if rng is not None and rng.random() < 0.3:
        return f"a {colour} shape, {background} background"
    return f"a {colour} shape on a {background} background"


# ----- training -----

class ControlNetStage(Stage):
    """A ControlNet over the frozen embedded UNet (its encoder copied by diffusers' from_unet, its zero
    convolutions starting at zero), trained on sketch -> scene pairs with the UNet's own v-prediction loss."""

    name = "controlnet"
    lr = 5e-4
    ema_decay = 0.999
    dataset_size = 6000

    def build(self) -> ControlNetModel:
        unet = UNet2DConditionModel.from_pretrained(self.models_dir / PIPELINE_DIR / "unet")
        # the map is at the image's size; the VAE downsamples by 4: two stride-2 steps in the conditioning embedding
        return ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32, 32))

    def prepare(self) -> None:
        folder = self.models_dir / PIPELINE_DIR
        self._unet = UNet2DConditionModel.from_pretrained(folder / "unet").eval().requires_grad_(False)
        self._tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
        self._text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder").eval().requires_grad_(False)
        self._noise = DDPMScheduler(num_train_timesteps=1000, **NOISE_SCHEDULE)
        cache = self.run_dir / "dataset.pt"
        if not cache.exists():
            rng = random.Random(SEED + 30)
            scene_list = [scenes.random_scene(rng) for _ in range(self.dataset_size)]
            vae = AutoencoderKL.from_pretrained(folder / "vae").eval().requires_grad_(False)
            torch.save({"scenes": scene_list, "latents": encode(vae, scene_list)}, cache)
        self._data = torch.load(cache, weights_only=False)

    def loss(self, model, rng, generator):
        indices = [rng.randrange(len(self._data["scenes"])) for _ in range(self.batch_size)]
        chosen = [self._data["scenes"][i] for i in indices]
        captions = []
        for scene in chosen:
            draw = rng.random()
            captions.append("" if draw < CFG_DROPOUT else colour_prompt(scene, rng) if draw < 0.55
                            else scenes.caption(scene, rng))
        maps = [control_map(draw_sketch(scene.main, rng.choice(TRAINING_STYLES), rng)) for scene in chosen]
        condition = torch.from_numpy(np.stack([np.asarray(image, dtype=np.float32) / 255 for image in maps]))
        condition = condition.permute(0, 3, 1, 2)
        latents = self._data["latents"][indices]
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, 1000, (len(latents),), generator=generator)
        noisy = self._noise.add_noise(latents, noise, timesteps)
        with torch.no_grad():
            text = self._text_encoder(tokenize(self._tokenizer, captions))[0]
        down, middle = model(noisy, timesteps, encoder_hidden_states=text, controlnet_cond=condition,
                             return_dict=False)
        prediction = self._unet(noisy, timesteps, encoder_hidden_states=text, down_block_additional_residuals=down,
                                mid_block_additional_residual=middle).sample
        return F.mse_loss(prediction, self._noise.get_velocity(latents, noise, timesteps))

    def export(self, model) -> dict:
        folder = self.models_dir / CONTROLNET_DIR
        folder.mkdir(parents=True, exist_ok=True)
        model.save_config(folder)  # the weights in fp16 (half the file; loaded in the studio's dtype)
        save_file({name: tensor.to(torch.float16).contiguous() for name, tensor in model.state_dict().items()},
                  folder / "diffusion_pytorch_model.safetensors")
        size = sum(path.stat().st_size for path in folder.glob("*.safetensors"))
        return {"megabytes": round(size / 1e6, 2)}


@dataclass(frozen=True)
class ControlNetRecipe:
    steps: int = 3500
    batch_size: int = 64


SMOKE_RECIPE = ControlNetRecipe(steps=3, batch_size=4)


def train_controlnet(run_dir: Path, models_dir: Path, recipe: ControlNetRecipe = ControlNetRecipe()):
    stage = ControlNetStage(run_dir, models_dir, steps=recipe.steps, batch_size=recipe.batch_size)
    if recipe is SMOKE_RECIPE:
        stage.dataset_size, stage.save_every = 16, 2
    return stage.result() or stage.run()


# ----- evaluation -----

@dataclass
class SketchScores:
    """How often the oracle reads each attribute as asked, over the evaluation's sketches."""

    count: int = 0
    shape: int = 0
    position: int = 0
    colour: int = 0
    background: int = 0

    def add(self, matches: dict[str, bool]) -> None:
        self.count += 1
        for key in ("shape", "position", "colour", "background"):
            setattr(self, key, getattr(self, key) + bool(matches[key]))

    def rate(self, key: str) -> float:
        return getattr(self, key) / max(1, self.count)


def evaluation_cases(count: int, style: str = HELD_OUT_STYLE,
                     seed: int = EVALUATION_SEED) -> list[tuple[scenes.Scene, Image.Image]]:
    """Scenes of the evaluation's own seed (every shape, colour and background, held-out triples too) and their
    sketches in `style`."""
    rng = random.Random(seed)
    cases = []
    for _ in range(count):
        scene = scenes.random_scene(rng, scenes.all_triples())
        cases.append((scene, draw_sketch(scene.main, style, rng)))
    return cases


def evaluate_sketch_to_image(models_dir: Path, count: int = 100, steps: int = 20,
                             seed: int = EVALUATION_SEED) -> dict[str, SketchScores]:
    """Sketch to image on the held-out sketches with a colour-only prompt, at the Inpaint tab's CFG: with the
    ControlNet (strength 1, the sketch as its control image through the invert preprocessor; in black, and in the
    brush's red) and without it (image to image from the drawing, at the tab's strength without it)."""
    from studio.models.controlnets import ControlNetCatalog, ControlNetPreset
    from studio.models.presets import load_presets
    from studio.tasks.control import ControlUnit
    from studio.tasks.engines import local_engines
    from studio.tasks.inpainting import SKETCH_COLOURS, SKETCH_STRENGTH, InpaintRequest

    models_dir = Path(models_dir)
    embedded = replace(load_presets().get("embedded"), local=models_dir / PIPELINE_DIR)
    catalog = ControlNetCatalog([ControlNetPreset("embedded-scribble", "Embedded scribble", "embedded",
                                                  local=models_dir / CONTROLNET_DIR)])
    from studio.models.presets import PresetCatalog

    inpainter = local_engines(PresetCatalog([embedded], "embedded"), controlnets=catalog).inpainter
    red = "controlnet, drawn in the brush's red"
    scores = {"controlnet": SketchScores(), red: SketchScores(), "image to image": SketchScores()}
    unit = ControlUnit("embedded-scribble", None, "invert")
    for index, (scene, drawing) in enumerate(evaluation_cases(count, seed=seed)):
        base = InpaintRequest(prompt=colour_prompt(scene), preset="embedded", seed=900 + index, steps=steps,
                              scheduler="Euler", guidance_scale=embedded.inpaint_default_guidance)  # the tab's CFG
        # the tab's first brush colour, whatever colour the prompt asks for: the lines are read, not their colour
        in_red = ImageOps.colorize(drawing.convert("L"), black=SKETCH_COLOURS[0], white="white")
        runs = {"controlnet": (drawing, replace(base, strength=1.0, controls=(unit,))),
                red: (in_red, replace(base, strength=1.0, controls=(unit,))),
                "image to image": (drawing, replace(base, strength=SKETCH_STRENGTH))}
        for name, (sketch, request) in runs.items():
            image = inpainter.sketch_to_image(sketch, request).images[0].image
            scores[name].add(oracle.read(image).matches(scene))
    return scores


def format_scores(scores: dict[str, SketchScores]) -> str:
    lines = ["| Sketch to image | shape (sketch) | position (sketch) | colour (prompt) | background (prompt) |",
             "|---|---|---|---|---|"]
    for name, score in scores.items():
        cells = " | ".join(f"{100 * score.rate(key):.0f}% ({getattr(score, key)}/{score.count})"
                           for key in ("shape", "position", "colour", "background"))
        lines.append(f"| {name} | {cells} |")
    return "\n".join(lines)
