"""The shipped embedded family does what its card says, judged by the oracle on fixed seeds.

Text to image goes through the real app's API at the preset's default settings; the other models are
checked the way `python -m studio.embedded evaluate` does, on a handful of cases.
"""

from pathlib import Path

import numpy as np
import pytest
from gradio_client import Client
from PIL import Image, ImageColor

from studio.a1111.schedulers import GENERAL_SCHEDULERS
from studio.embedded import oracle, scenes
from studio.embedded.evaluation import evaluate_clip, evaluate_inpaint, evaluate_upscaler
from studio.models.presets import load_presets
from studio.tasks.generation import TextToImageRequest

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"
# Fixed before looking at any output: four seen and four held-out (shape, colour, background) triples.
PROMPTS = [
    scenes.Scene("blue", (scenes.Shape("circle", "red", "center", "large"),)),
    scenes.Scene("black", (scenes.Shape("star", "yellow", "top left", "large"),)),
    scenes.Scene("white", (scenes.Shape("triangle", "green", "bottom right", "large"),)),
    scenes.Scene("yellow", (scenes.Shape("ring", "purple", "left", "large"),)),
] + [
    scenes.Scene(background, (scenes.Shape(shape, colour, position, "large"),))
    for (shape, colour, background), position in zip(sorted(scenes.held_out_triples())[::6], ("right", "top", "bottom left", "center"))
]


@pytest.fixture(scope="module")
def client(app_url):
    return Client(app_url, verbose=False)


def generate(client, prompt: str, seed: int) -> Image.Image:
    preset = load_presets().get("embedded")
    gallery, _, _ = client.predict(
        prompt=prompt, negative_prompt="", preset="embedded", scheduler=preset.default_scheduler,
        steps=preset.default_steps, guidance_scale=preset.default_guidance, width=preset.default_width,
        height=preset.default_height, seed=seed, batch_size=1, style="None", api_name="/text_to_image",
    )
    with Image.open(gallery[0]["image"]) as image:
        return image.convert("RGB")


def test_prompts_give_what_they_ask_through_the_app(client, artifacts):
    right = {key: 0 for key in ("shape", "colour", "background", "position")}
    strip = []
    for seed, scene in enumerate(PROMPTS, start=1):
        image = generate(client, scenes.caption(scene), seed)
        strip.append(image)
        matches = oracle.read(image).matches(scene)
        for key in right:
            right[key] += matches[key]
    sheet = Image.new("RGB", (64 * len(strip), 64))
    for index, image in enumerate(strip):
        sheet.paste(image, (64 * index, 0))
    sheet.save(artifacts / "embedded-prompts.png")
    assert right["colour"] >= 7 and right["background"] >= 7, right
    assert right["shape"] >= 6 and right["position"] >= 6, right


def test_a_red_square_is_red_and_square(client):
    readings = [oracle.read(generate(client, "a red square", seed)) for seed in range(4)]
    assert sum(r.colour == "red" and r.shape == "square" for r in readings) >= 3, readings


@pytest.mark.parametrize("scheduler", GENERAL_SCHEDULERS)
def test_every_scheduler_draws_what_is_asked(engine, scheduler):
    """A scheduler built from the model's config must suit it (DDIM once clipped latents to [-1, 1])."""
    result = engine.generate(TextToImageRequest(
        prompt="a large red circle in the center on a blue background", scheduler=scheduler, steps=20, guidance_scale=3, seed=1,
    ))
    reading = oracle.read(result.images[0].image)
    assert (reading.colour, reading.background) == ("red", "blue"), reading


def test_clip_ranks_the_right_caption_first():
    result = evaluate_clip(MODELS, 20)
    assert min(result["seen"], result["held-out"]) >= 0.8, result


def test_inpainting_puts_the_asked_shape_inside_the_mask_and_keeps_the_rest():
    result = evaluate_inpaint(MODELS, 6)
    assert result["outside pixels identical (after paste-back)"] == 1.0
    assert result["right shape and colour inside the mask"] >= 4 / 6, result


def test_upscaler_beats_bicubic_by_two_db():
    result = evaluate_upscaler(MODELS, 6)
    assert result["gain_db"] >= 2.0, result


def test_shipped_weights_fit_the_size_budget():
    folders = ["embedded-sd", "embedded-sd-inpainting", "embedded-clip", "embedded-upscaler"]
    total = sum(path.stat().st_size for folder in folders for path in (MODELS / folder).rglob("*") if path.is_file())
    assert total <= 40 * 1024**2, f"{total / 1024**2:.1f} MB"


def test_grey_and_gray_are_both_understood():
    """People write both spellings; the captions use both, so the model learned both (the prompt is not patched)."""
    from studio.embedded.evaluation import embedded_defaults, generate, load_text_to_image

    pipe, defaults = load_text_to_image(MODELS), embedded_defaults()
    for word in ("grey", "gray"):
        backgrounds = [oracle.read(generate(pipe, f"a blue square on a {word} background", seed, defaults)).background
                       for seed in range(4)]
        assert backgrounds.count("gray") >= 3, (word, backgrounds)


def test_the_coherence_check_passes_clean_shapes_and_fails_a_faded_half():
    """The check behind the cutting-mask figure can fail: a shape half faded into the background is not coherent."""
    from studio.embedded.evaluation import coherence, cutting_cases

    cases = cutting_cases(20)
    assert all(coherence(scenes.render(scene), scene, mask)["coherent"] for scene, mask in cases)
    for scene, mask in cases:
        pixels = np.asarray(scenes.render(scene), dtype=np.float32)
        pixels[mask] = 0.5 * pixels[mask] + 0.5 * np.asarray(scenes.PALETTE[scene.background], dtype=np.float32)
        assert not coherence(Image.fromarray(pixels.astype(np.uint8)), scene, mask)["coherent"]


def test_inpainting_a_stroke_through_a_shape_gives_one_clean_shape():
    """A regression guard on the first 30 of the 100 cases in docs/embedded-model.md (90% there): the studio's
    inpainting gives one clean shape 27 times. Before it kept the unmasked latents at every step it gave 22 (20 at
    CFG 3), and the UNet trained on boxes only gave 6; the bar sits between, so losing the blending or the stroke
    training fails it."""
    from studio.embedded.evaluation import evaluate_cutting_masks

    result = evaluate_cutting_masks(MODELS, 30)
    assert result["coherent"] >= 0.8, result


def test_the_sketch_check_passes_the_sketched_scene_and_fails_a_ghost():
    """The check behind the inpaint-sketch figure can fail: the sketched scene drawn clean passes, and the same
    with the old shape faintly over it, or with a faint bar of the sketched colour beside it, does not."""
    from studio.embedded.evaluation import SIDE, shape_region
    from studio.embedded.sketches import sketch_cases, sketch_verdict

    for case in sketch_cases(12):
        clean = np.asarray(scenes.render(case.after), dtype=np.float32)
        assert sketch_verdict(Image.fromarray(clean.astype(np.uint8)), case)["as sketched"], case
        old = np.asarray(scenes.render(case.before), dtype=np.float32)
        old_shape = shape_region(case.before)
        faded = clean.copy()
        faded[old_shape] = 0.5 * clean[old_shape] + 0.5 * old[old_shape]
        assert not sketch_verdict(Image.fromarray(faded.astype(np.uint8)), case)["clean"], case
        left, top, right, bottom = scenes.shape_box(case.sketched, SIDE, margin=3)
        row = top - 2 if top >= 2 else bottom
        barred = clean.copy()
        colour = np.asarray(scenes.PALETTE[case.sketched.colour], dtype=np.float32)
        barred[row:row + 2, left:right] = 0.5 * barred[row:row + 2, left:right] + 0.5 * colour
        assert not sketch_verdict(Image.fromarray(barred.astype(np.uint8)), case)["clean"], case


def test_a_shape_sketched_over_another_comes_back_clean():
    """A regression guard on the first 20 of the inpaint-sketch cases in docs/embedded-model.md: one clean shape of
    the sketched kind and colour and no ghost. The bar was set before the measured run, between the calibration
    cases' 33% with the strokes alone as the mask and 85% with them grown by one brush width (sketch_mask)."""
    from studio.embedded.sketches import evaluate_inpaint_sketch

    result = evaluate_inpaint_sketch(MODELS, 20)
    assert result["clean"] >= 0.7, result


def test_the_sketch_cases_draw_with_the_inpaint_tabs_brush():
    """The measured sketches use the tab's own brush colours and denoising strength."""
    from components.inpaint import SKETCH, brush, default_strength
    from studio.embedded.sketches import SKETCH_BRUSH, SKETCH_STRENGTH
    from studio.models.presets import load_presets

    assert set(SKETCH_BRUSH.values()) <= set(brush(SKETCH).colors) and len(SKETCH_BRUSH) == 9
    assert default_strength(SKETCH, load_presets().get("embedded")) == SKETCH_STRENGTH
    for colour, painted in SKETCH_BRUSH.items():  # each brush is read as the colour it stands for
        assert oracle.nearest_colour(np.asarray(ImageColor.getrgb(painted), dtype=np.float32),
                                     scenes.SHAPE_COLOURS) == colour
