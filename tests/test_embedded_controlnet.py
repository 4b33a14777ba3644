"""The embedded family's ControlNet: its sketches (four training styles, a fifth held out), its training loop on the
frozen embedded model (smoke), and the shipped model: trained on sketches, it puts the sketched shape where it is
drawn, in the prompt's colours (measured in docs/embedded-model.md with `python -m studio.embedded
evaluate-controlnet`)."""

import random
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from studio.embedded import oracle, scenes
from studio.embedded.controlnet import (
    CONTROLNET_DIR,
    HELD_OUT_STYLE,
    SMOKE_RECIPE,
    TRAINING_STYLES,
    colour_prompt,
    control_map,
    draw_sketch,
    evaluation_cases,
    train_controlnet,
)
from studio.embedded.stages import PIPELINE_DIR
from tests.conftest import ROOT


def ink(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("L")) < 128


@pytest.mark.parametrize("style", [*TRAINING_STYLES, HELD_OUT_STYLE])
def test_each_style_draws_the_shape_where_the_scene_has_it(style):
    rng = random.Random(4)
    for _ in range(20):
        scene = scenes.random_scene(rng, scenes.all_triples())
        drawing = ink(draw_sketch(scene.main, style, rng))
        left, top, right, bottom = scenes.shape_box(scene.main, 64, margin=3)
        inside = drawing[top:bottom, left:right].sum()
        assert drawing.sum() > 10 and inside >= 0.9 * drawing.sum(), (style, scene)


def test_a_filled_sketch_reads_as_its_shape_and_the_styles_differ():
    rng = random.Random(5)
    shapes = [scenes.random_shape(rng, shape, "black") for shape in ("circle", "square", "triangle", "star", "ring")]
    for shape in shapes:
        drawing = draw_sketch(shape, "filled", rng)
        assert oracle.read(drawing).shape == shape.shape
    shape = shapes[1]
    drawings = {style: ink(draw_sketch(shape, style, random.Random(1))) for style in (*TRAINING_STYLES, HELD_OUT_STYLE)}
    assert len({drawing.tobytes() for drawing in drawings.values()}) == len(drawings)
    assert drawings["filled"].sum() > 2 * drawings[HELD_OUT_STYLE].sum()  # a blob, against thin strokes


def test_the_control_map_is_white_strokes_on_black_and_the_prompt_gives_colours_only():
    scene = scenes.random_scene(random.Random(2), scenes.all_triples())
    drawing = draw_sketch(scene.main, "outline", random.Random(2))
    assert np.array_equal(np.asarray(control_map(drawing)), 255 - np.asarray(drawing))
    prompt = colour_prompt(scene)
    assert prompt == f"a {scene.main.colour} shape on a {scene.background} background"
    assert scene.main.shape not in prompt
    cases = evaluation_cases(5)
    assert len(cases) == 5 and cases[0][0] == evaluation_cases(1)[0][0]  # the same held-out cases every run


def test_the_training_loop_runs_on_the_frozen_model_and_exports_a_small_fp16_controlnet(tmp_path):
    models = tmp_path / "models"
    shutil.copytree(ROOT / "models" / PIPELINE_DIR, models / PIPELINE_DIR)
    result = train_controlnet(tmp_path / "run", models, SMOKE_RECIPE)
    assert result.steps == SMOKE_RECIPE.steps and np.isfinite(result.final_loss)
    files = list((models / CONTROLNET_DIR).glob("*.safetensors"))
    assert len(files) == 1 and files[0].stat().st_size < 5_000_000
    from diffusers import ControlNetModel
    from safetensors import safe_open

    with safe_open(files[0], "pt") as weights:  # stored in fp16
        assert {weights.get_tensor(name).dtype for name in weights.keys()} == {torch.float16}
    assert ControlNetModel.from_pretrained(models / CONTROLNET_DIR).config.conditioning_embedding_out_channels == [
        16, 32, 32]


def test_the_shipped_controlnet_puts_the_sketched_shape_where_it_is_drawn_in_the_prompts_colours():
    """The committed model on 12 held-out sketches of a seed of their own (not the 100 measured in
    docs/embedded-model.md, which set these bars: 97-99% there): with it, shape and place come from the sketch and
    colours from the prompt; image to image from the drawing does neither (22-42% there)."""
    from studio.embedded.controlnet import EVALUATION_SEED, evaluate_sketch_to_image

    scores = evaluate_sketch_to_image(ROOT / "models", count=12, seed=EVALUATION_SEED + 1000)
    guided, red, plain = scores["controlnet"], scores["controlnet, drawn in the brush's red"], scores["image to image"]
    for score in (guided, red):
        assert min(score.shape, score.position, score.colour, score.background) >= 10, vars(score)
    assert plain.shape + plain.position <= guided.shape + guided.position - 8, (vars(plain), vars(guided))
