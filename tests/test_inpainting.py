"""Inpainting and sketch to image on the embedded model, in process, through the shared memory manager."""

import dataclasses
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from studio.a1111.metadata import parse_parameters
from studio.a1111.schedulers import make_scheduler
from studio.core.errors import InvalidRequest
from studio.core.images import blur_mask, open_image, prepare_mask
from studio.embedded import oracle, scenes
from studio.models.families import family_named
from studio.models.presets import PresetCatalog, load_presets
from studio.tasks.generation import TextToImageRequest
from studio.tasks.inpainting import ONLY_MASKED, Inpainter, InpaintRequest, mask_tools_for
from studio.tasks.requests import RequestLimits
from studio.tasks.step_hooks import inpaint_step_hooks

MODELS = Path(__file__).resolve().parents[1] / "models"


def request(**overrides):
    values = dict(prompt="a large yellow star on a blue background", preset="embedded", scheduler="Euler", steps=8,
                  guidance_scale=3.0, seed=7)
    return InpaintRequest(**(values | overrides))


def picture(width=64, height=64, mode="RGB"):
    scene = scenes.Scene("blue", (scenes.Shape("circle", "red", "left", "small"),))
    return scenes.render(scene, 64).resize((width, height), Image.Resampling.BICUBIC).convert(mode)


def box_mask(width, height, box):
    mask = Image.new("L", (width, height), 0)
    mask.paste(255, box)
    return mask


def untouched(mask: Image.Image, blur: int) -> np.ndarray:
    """Where the blurred mask is zero: those pixels must come back exactly as they went in."""
    return np.asarray(blur_mask(prepare_mask(mask, mask.size), blur)) == 0


@pytest.mark.parametrize("area", ["Whole picture", ONLY_MASKED])
@pytest.mark.parametrize("size", [(64, 64), (75, 53), (300, 200)])
def test_pixels_outside_the_mask_are_unchanged(inpainter, area, size):
    image, mask = picture(*size), box_mask(*size, (size[0] // 2, size[1] // 4, size[0] - 3, size[1] * 3 // 4))
    result = inpainter.inpaint(image, mask, request(inpaint_area=area, mask_blur=4))
    out = np.asarray(result.images[0].image)
    assert out.shape == (size[1], size[0], 3)
    keep = untouched(mask, 4)
    assert keep.sum() > 0.3 * keep.size
    assert np.array_equal(out[keep], np.asarray(image)[keep])
    assert not np.array_equal(out[~keep], np.asarray(image)[~keep])  # and the masked part was repainted


@pytest.fixture(scope="module")
def inpaint_pipeline():
    from diffusers import StableDiffusionInpaintPipeline

    pipe = StableDiffusionInpaintPipeline.from_pretrained(MODELS / "embedded-sd-inpainting", dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_recording(pipe, scheduler, guidance, strength, hooked: bool):
    """An inpaint (6 steps) that records, at every model evaluation, the latents it was given before the
    scheduler scaled them, and the scale (k-diffusion samplers divide by sqrt(sigma² + 1)); and every callback."""
    image, mask = picture(), box_mask(64, 64, (24, 8, 56, 40))
    pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config)
    evaluations, callbacks = [], []
    scale_model_input = pipe.scheduler.scale_model_input

    def recording(sample, timestep):
        scaled = scale_model_input(sample, timestep)
        if sample.dim() == 4:  # the pipeline's call, not the hook asking for the next level
            scale = (scaled[:1].flatten()[0] / sample[:1].flatten()[0]).item()
            evaluations.append((sample[:1].clone(), scale, int(timestep)))
        return scaled

    pipe.scheduler.scale_model_input = recording

    def count(pipe, step, timestep, callback_kwargs):
        callbacks.append(step)
        return callback_kwargs

    hooks = inpaint_step_hooks(pipe, family_named("embedded"), image, seed=3, then=count) if hooked else {"callback_on_step_end": count}
    latents = pipe("a large yellow star on a blue background", image=image, mask_image=mask, num_inference_steps=6,
                   guidance_scale=guidance, strength=strength, output_type="latent",
                   generator=torch.Generator("cpu").manual_seed(3), **hooks).images
    keep = torch.nn.functional.interpolate(torch.from_numpy(np.asarray(mask) < 128)[None, None].float(),
                                           size=latents.shape[-2:]).expand_as(latents) > 0.5
    return latents, keep, evaluations, callbacks


@pytest.mark.parametrize(("scheduler", "guidance", "strength"), [
    ("Euler", 3.0, 1.0), ("Euler", 1.0, 1.0), ("Euler a", 3.0, 0.6), ("Heun", 3.0, 1.0), ("DPM2", 3.0, 1.0),
    ("DPM2 a", 3.0, 1.0), ("DPM++ SDE", 3.0, 1.0), ("LMS", 3.0, 1.0), ("DDIM", 3.0, 0.6), ("DDIM", 3.0, 1.0),
])
def test_the_model_sees_the_original_outside_the_mask_at_its_own_noise_level(inpaint_pipeline, scheduler, guidance,
                                                                              strength):
    """A1111 and ComfyUI put the original back outside the mask at every model evaluation, inpainting models
    included (diffusers only for plain UNets). So at each evaluation after the first, the latents the model gets
    there are the original noised by one fixed noise to the level the sampler tells the model (read from its own
    input scaling, second-order midpoints included; DDIM's by its timestep), and the final latents there are the
    image's own. Without the hook they are not (with CFG or without, strength < 1, ancestral and second-order
    samplers). The old add_noise got DPM2's and DPM++ SDE's midpoints wrong, and this fails on it."""
    pipe = inpaint_pipeline
    latents, keep, evaluations, callbacks = run_recording(pipe, scheduler, guidance, strength, True)
    original = latents[keep]  # the last callback leaves the clean original there: the image's own latents
    encoded = pipe.vae.encode(pipe.image_processor.preprocess(picture())).latent_dist.mean * pipe.vae.config.scaling_factor
    assert (original - encoded.expand_as(latents)[keep]).abs().max() < 0.1 * encoded.abs().max()

    def noise_at(sample, scale, timestep):
        if scale < 1:  # a k-diffusion sampler: latents = x0 + sigma × noise, and it divides by sqrt(sigma² + 1)
            return (sample[keep] - original) / (1 / scale**2 - 1) ** 0.5
        alpha = pipe.scheduler.alphas_cumprod[timestep]  # DDIM: sqrt(ᾱ) × x0 + sqrt(1 - ᾱ) × noise
        return (sample[keep] - alpha.sqrt() * original) / (1 - alpha).sqrt()

    # the first evaluation starts from the pipeline's own noise
    noises = [noise_at(sample, scale, timestep) for sample, scale, timestep in evaluations[1:]]
    for noise in noises[1:]:
        assert torch.allclose(noise, noises[0], atol=1e-3), (noise - noises[0]).abs().max()
    assert noises[0].std() > 0.5  # a real noise, not zeros
    assert callbacks == list(range(inpaint_pipeline.num_timesteps))  # the next callback (progress, Stop) still runs

    drifted, _, drifted_evaluations, _ = run_recording(pipe, scheduler, guidance, strength, False)
    assert (drifted[keep] - original).abs().max() > 0.3  # without the hook the model drifts there
    assert not torch.allclose(noise_at(*drifted_evaluations[-1]), noises[0], atol=0.1)


def test_the_asked_shape_is_painted_inside_the_mask(inpainter):
    image = picture()
    mask = box_mask(64, 64, (34, 10, 62, 54))
    results = [inpainter.inpaint(image, mask, request(steps=20, seed=seed)).images[0].image for seed in range(3)]
    readings = [oracle.read(out, within=np.asarray(mask) > 0) for out in results]
    assert sum(r.shape == "star" and r.colour == "yellow" for r in readings) >= 2, readings


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "I;16"])
def test_any_image_mode_comes_back_at_its_size_with_its_pixels_outside_the_mask(inpainter, mode):
    image = picture(72, 56)
    if mode == "I;16":
        grey = (np.asarray(image.convert("L"), dtype=np.uint16) * 257)
        source, expected = Image.fromarray(grey, mode="I;16"), np.asarray(image.convert("L").convert("RGB"))
    elif mode == "RGBA":
        source = image.convert("RGBA")
        source.putalpha(Image.fromarray(np.where(np.arange(72)[None, :] < 20, 0, 255).astype(np.uint8).repeat(56, 0)))
        expected = None
    else:
        source = image.convert(mode)
        expected = np.asarray(source.convert("RGB"))
    mask = box_mask(72, 56, (40, 10, 70, 50))
    result = inpainter.inpaint(source, mask, request(mask_blur=2))
    out = result.images[0].image
    assert out.size == (72, 56)
    keep = untouched(mask, 2)
    if mode == "RGBA":
        assert out.mode == "RGBA" and any("transparent" in w for w in result.warnings)
        out_rgba, source_rgba = np.asarray(out), np.asarray(source)
        assert np.array_equal(out_rgba[keep][:, 3], source_rgba[keep][:, 3])  # transparency kept
        opaque = keep & (source_rgba[:, :, 3] == 255)
        assert np.array_equal(out_rgba[opaque], source_rgba[opaque])
        assert out_rgba[~keep][:, 3].min() > 0  # the repainted area is visible
    else:
        assert np.array_equal(np.asarray(out.convert("RGB"))[keep], expected[keep])


def test_a_large_photo_is_worked_small_and_returned_at_its_size(inpainter):
    image, mask = picture(1600, 1200), box_mask(1600, 1200, (900, 200, 1500, 1000))
    out = inpainter.inpaint(image, mask, request(steps=4)).images[0].image
    assert out.size == (1600, 1200)
    keep = untouched(mask, 4)
    assert np.array_equal(np.asarray(out)[keep], np.asarray(image)[keep])


def test_full_mask_repaints_everything_like_text_to_image(inpainter):
    image = picture()  # a small red circle on blue
    out = inpainter.inpaint(image, box_mask(64, 64, (0, 0, 64, 64)), request(
        prompt="a large green square on a yellow background", steps=20, mask_blur=0)).images[0].image
    assert out.size == (64, 64)
    reading = oracle.read(out)
    assert (reading.colour, reading.shape, reading.background) == ("green", "square", "yellow"), reading


def test_same_seed_same_pixels_and_the_batch_uses_seed_plus_i(inpainter):
    image, mask = picture(), box_mask(64, 64, (30, 10, 60, 50))
    one = inpainter.inpaint(image, mask, request(seed=11))
    batch = inpainter.inpaint(image, mask, request(seed=10, batch_size=2))
    assert batch.seeds == [10, 11]
    assert np.array_equal(np.asarray(one.images[0].image), np.asarray(batch.images[1].image))


def test_stop_keeps_the_finished_images_and_progress_counts_the_steps_strength_leaves(inpainter):
    cancel, seen = threading.Event(), []

    def on_progress(done, total, _):
        seen.append((done, total))
        if done == 12:  # the second image's second step: 10 steps per image at strength 0.5
            cancel.set()

    result = inpainter.inpaint(picture(), box_mask(64, 64, (30, 10, 60, 50)), request(steps=20, strength=0.5,
                               batch_size=3), on_progress=on_progress, cancel=cancel)
    assert result.interrupted and result.seeds == [7, 8]  # the second is the one cut short, the third never ran
    # step 0 says what comes before the first step (loading, encoding)
    assert seen[:2] == [(0, 30), (1, 30)] and max(done for done, _ in seen[:-1]) == 12


def test_parameters_say_how_it_was_inpainted(inpainter):
    result = inpainter.inpaint(picture(), box_mask(64, 64, (30, 10, 60, 50)),
                               request(strength=0.8, mask_blur=6, inpaint_area=ONLY_MASKED, padding=8))
    params = parse_parameters(result.images[0].parameters)
    # Size is the size the model worked at, as A1111 writes it: the crop around the mask (30x40 grown by the
    # padding, then to the crop's aspect at the preset's 64x64 pixel count), not the image's
    assert params.seed == 7 and (params.width, params.height) == (56, 72)
    assert result.images[0].image.size == (64, 64)
    assert params.extra == {"Denoising strength": "0.8", "Mask blur": "6", "Inpaint area": "Only masked",
                            "Masked area padding": "8"} | {k: v for k, v in params.extra.items() if k == "Version"}


@pytest.mark.parametrize("mask, message", [
    (Image.new("L", (64, 64), 0), "The mask is empty"),
    (Image.new("L", (32, 64), 255), "must be the same size"),
])
def test_bad_masks_are_refused_clearly(inpainter, mask, message):
    with pytest.raises(InvalidRequest, match=message):
        inpainter.inpaint(picture(), mask, request())


@pytest.mark.parametrize("overrides, message", [
    (dict(strength=0), "Denoising strength"),
    (dict(steps=2, strength=0.3), "Steps × denoising strength"),
    (dict(mask_blur=100), "Mask blur"),
    (dict(inpaint_area="Everything"), "Inpaint area"),
    (dict(prompt=" "), "Enter a prompt"),
])
def test_bad_settings_are_refused_clearly(inpainter, overrides, message):
    with pytest.raises(InvalidRequest, match=message):
        inpainter.inpaint(picture(), box_mask(64, 64, (0, 0, 9, 9)), request(**overrides))


def test_a_corrupt_upload_is_refused_clearly(tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(InvalidRequest, match="could not be read as an image"):
        open_image(broken)


def test_sketch_to_image_follows_the_strokes_colours(inpainter):
    sketch = Image.new("RGBA", (256, 256), (0, 0, 0, 0))
    sketch.paste((255, 220, 0, 255), (0, 0, 256, 256))  # a yellow page ...
    sketch.paste((230, 30, 30, 255), (90, 90, 170, 170))  # ... with a red square drawn on it
    result = inpainter.sketch_to_image(sketch, request(prompt="a large red square on a yellow background",
                                                       strength=0.6, steps=20))
    out = result.images[0].image
    assert out.size == (64, 64)
    reading = oracle.read(out)
    assert (reading.colour, reading.background) == ("red", "yellow"), reading


def test_an_empty_sketch_is_refused(inpainter):
    with pytest.raises(InvalidRequest, match="The sketch is empty"):
        inpainter.sketch_to_image(Image.new("RGBA", (128, 128), (0, 0, 0, 0)), request(strength=0.7))


def test_inpainting_shares_the_text_encoder_and_vae_with_text_to_image(engine, inpainter, manager, models):
    engine.generate(TextToImageRequest(prompt="a red circle", preset="embedded", steps=2, seed=1))
    inpainter.inpaint(picture(), box_mask(64, 64, (30, 10, 60, 50)), request(steps=2))
    preset = load_presets().get("embedded")
    records = [(r.source, r.component) for r in manager.status().models]
    assert records.count((preset.source, "text_encoder")) == 1 and records.count((preset.source, "vae")) == 1
    assert (preset.inpaint_source, "unet") in records  # the dedicated 9-channel UNet
    with manager.use(models.keys(preset, "text2img")) as t2i:
        text_encoder, vae = t2i["text_encoder"], t2i["vae"]
    with manager.use(models.keys(preset, "inpaint")) as inpaint:
        assert inpaint["text_encoder"] is text_encoder and inpaint["vae"] is vae
        assert inpaint["unet"].config.in_channels == 9


def test_a_base_model_without_an_inpainting_checkpoint_inpaints_with_its_own_unet(manager, models, stages):
    embedded = load_presets().get("embedded")
    base_only = dataclasses.replace(embedded, name="embedded-base", inpaint_local=None)
    inpainter = Inpainter(stages, PresetCatalog([base_only], "embedded-base"), RequestLimits(), version="test")
    image, mask = picture(), box_mask(64, 64, (30, 10, 60, 50))
    out = np.asarray(inpainter.inpaint(image, mask, request(preset="embedded-base", steps=8)).images[0].image)
    keep = untouched(mask, 4)
    assert np.array_equal(out[keep], np.asarray(image)[keep]) and not np.array_equal(out[~keep], np.asarray(image)[~keep])
    with manager.use(models.keys(base_only, "inpaint")) as parts:
        assert parts["unet"].config.in_channels == 4


def test_public_limits_refuse_a_large_upload_before_any_work(stages):
    public = Inpainter(stages, load_presets(), RequestLimits.public(), version="test")
    big = Image.new("RGB", (2500, 2000), "white")  # 5 MP: fine on your own machine, too much for a public demo
    mask = Image.new("L", big.size, 0)
    mask.paste(255, (100, 100, 300, 300))
    with pytest.raises(InvalidRequest, match="2500×2000: more than 4,000,000 pixels, the limit here"):
        public.plan_inpaint(big, mask, request())
    private = Inpainter(stages, load_presets(), RequestLimits(), version="test")
    plan, _ = private.plan_inpaint(big, mask, request())
    assert plan.size[0] <= 128  # the embedded model's working size


@pytest.mark.parametrize("size", [(32, 32), (128, 96)])
def test_whole_picture_works_at_the_presets_resolution_and_returns_the_inputs_size(inpainter, size):
    # A1111 resizes the whole picture to the processing size, up or down, and writes that size as Size
    image, mask = picture(*size), box_mask(*size, (size[0] // 2, 0, size[0], size[1] // 2))
    plan, _ = inpainter.plan_inpaint(image, mask, request())
    native = 64 * 64
    assert abs(plan.size[0] * plan.size[1] - native) <= native * 0.2, plan.size
    result = inpainter.inpaint(image, mask, request(steps=2))
    params = parse_parameters(result.images[0].parameters)
    assert (params.width, params.height) == plan.size and result.images[0].image.size == size


def test_whole_picture_pastes_back_through_a1111s_sharpened_mask(inpainter):
    mask = box_mask(64, 64, (20, 20, 44, 44))
    blurred = np.asarray(blur_mask(prepare_mask(mask, (64, 64)), 4), dtype=np.float32)
    _, whole = inpainter.plan_inpaint(picture(), mask, request(mask_blur=4))
    _, cropped = inpainter.plan_inpaint(picture(), mask, request(mask_blur=4, inpaint_area=ONLY_MASKED))
    assert np.array_equal(np.asarray(whole.overlay), np.clip(blurred * 2, 0, 255).astype(np.uint8))
    assert np.array_equal(np.asarray(cropped.overlay), blurred.astype(np.uint8))  # "Only masked": as blurred
    # the repainted area is fully the model's from half the blur's falloff inwards: no faded copy of the old
    half = (blurred >= 127.5)
    assert (np.asarray(whole.overlay)[half] == 255).all() and (np.asarray(cropped.overlay)[half] < 255).any()


@pytest.mark.parametrize(("size", "expected"), [
    ((64, 64), (3, 1, 4)), ((512, 512), (26, 4, 32)), ((1024, 768), (38, 6, 48)), ((8, 8), (1, 1, 2)),
])
def test_brush_blur_and_padding_scale_with_the_image(size, expected):
    tools = mask_tools_for(size)
    assert (tools.brush_radius, tools.mask_blur, tools.padding) == expected


@pytest.mark.parametrize(("size", "cell"), [((64, 64), 4), ((512, 384), 8)])
def test_a_sketch_mask_is_the_strokes_grown_by_one_brush_width(size, cell):
    """Inpaint sketch repaints the strokes and one brush width around them, so every latent cell that holds paint
    is read as masked: the pipeline reads the mask once per cell, at its top-left pixel (4 px cells on the
    embedded model's 64 px images, 8 px on Stable Diffusion's 512 px), and the cells it reads as unmasked are put
    back as they were."""
    from scipy import ndimage

    from studio.tasks.inpainting import sketch_mask

    width, height = size
    strokes = Image.new("L", size, 0)
    strokes.paste(255, (width // 3 + 1, height // 3 + 2, width // 2 + 3, height // 2 + 1))  # off the cell grid
    mask = np.asarray(sketch_mask(strokes)) > 0
    painted = np.asarray(strokes) > 0
    distance = ndimage.distance_transform_edt(~painted)
    margin = 2 * mask_tools_for(size).brush_radius
    assert mask[distance <= margin].all() and not mask[distance > margin].any()
    read_as_masked = np.repeat(np.repeat(mask[::cell, ::cell], cell, axis=0), cell, axis=1)[:height, :width]
    assert read_as_masked[painted].all()
    assert not np.asarray(sketch_mask(Image.new("L", size, 0))).any()  # no strokes: still empty, refused as such


def test_a_square_sketched_over_a_circle_leaves_nothing_of_the_circle(inpainter):
    """The issue's picture: a green square sketched over a red circle (its caps outside the square) came back as
    a green square with red caps, pasted back unchanged, and a bar and outline where the stroke's edge was."""
    import random

    from studio.embedded.sketches import SKETCH_BRUSH, SKETCH_STRENGTH, SketchCase, brush_strokes
    from studio.tasks.inpainting import sketch_mask

    before = scenes.Scene("blue", (scenes.Shape("circle", "red", "center", "large"),))
    square = scenes.Shape("square", "green", "center", "large")
    preset, tools = load_presets().get("embedded"), mask_tools_for((64, 64))
    case = SketchCase(before, square, SKETCH_BRUSH["green"],
                      brush_strokes(square, random.Random(1), tools.brush_radius), covering=False)
    red = np.asarray(scenes.PALETTE["red"], dtype=np.float32)
    assert (np.linalg.norm(np.asarray(case.composite(), dtype=np.float32) - red, axis=-1) < 60).sum() > 20
    for seed in range(3):
        out = inpainter.inpaint(case.composite(), sketch_mask(case.strokes()), request(
            prompt="a green square on a blue background", scheduler=preset.default_scheduler,
            steps=preset.default_steps, guidance_scale=preset.inpaint_default_guidance, strength=SKETCH_STRENGTH,
            mask_blur=tools.mask_blur, seed=seed)).images[0].image
        reading = oracle.read(out)
        reddish = np.linalg.norm(np.asarray(out, dtype=np.float32) - red, axis=-1) < 60
        assert (reading.shape, reading.colour, int(reddish.sum())) == ("square", "green", 0), (seed, reading)


def test_sdxls_inpainting_checkpoint_defaults_to_its_model_cards_strength():
    presets = load_presets()
    assert presets.get("sdxl-base-1.0").inpaint_strength == 0.99
    assert presets.get("stable-diffusion-1.5").inpaint_strength == 1.0


def test_an_inpainted_pngs_parameters_fill_the_inpaint_form():
    from studio.tasks.inpainting import inpaint_request_from_parameters

    text = ("a large yellow star\nNegative prompt: blurry\nSteps: 12, Sampler: DPM++ 2M, Schedule type: Karras, "
            "CFG scale: 4, Seed: 9, Size: 64x64, Model: embedded, Clip skip: 2, Denoising strength: 0.6, "
            "Mask blur: 2, Inpaint area: Only masked, Masked area padding: 6, Version: Diffusion Studio 0.1.0")
    filled, notes = inpaint_request_from_parameters(text, load_presets(), request(batch_size=3))
    assert notes == []
    assert (filled.prompt, filled.negative_prompt, filled.scheduler, filled.steps, filled.guidance_scale, filled.seed,
            filled.clip_skip, filled.batch_size) == ("a large yellow star", "blurry", "DPM++ 2M Karras", 12, 4.0, 9, 2, 1)
    assert (filled.strength, filled.mask_blur, filled.inpaint_area, filled.padding) == (0.6, 2, ONLY_MASKED, 6)
    text2img_png = "a circle\nSteps: 5, Sampler: Euler, CFG scale: 3, Seed: 1, Size: 64x64, Model: embedded"
    filled, _ = inpaint_request_from_parameters(text2img_png, load_presets(), request(strength=0.8, mask_blur=3))
    assert (filled.strength, filled.mask_blur) == (0.8, 3)  # what the text lacks stays as it was
