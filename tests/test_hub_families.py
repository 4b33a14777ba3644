"""The Hub families' code paths end to end: tiny random-weight SD 2.x (v-prediction) and SDXL folders, listed in
a presets file as any preset is, served by the real app and driven through its API, for text to image, inpaint
and sketch to image. Nothing is downloaded: the folders are built here."""

import numpy as np
import pytest
import torch
import yaml
from conftest import ROOT, start_app, stop_app
from diffusers import StableDiffusionPipeline
from gradio_client import Client, handle_file
from PIL import Image
from tiny_models import save_random_sdxl_lora, save_tiny_sd2, save_tiny_sdxl

from studio.a1111.metadata import parse_parameters
from studio.a1111.schedulers import make_scheduler

PRESET = dict(description="a tiny random-weight test model", default_steps=4, default_guidance=5.0,
              default_width=64, default_height=64, min_size=64, max_size=128, default_scheduler="Euler")


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    presets = {
        "default": "embedded",
        "presets": {
            "embedded": {"label": "Embedded", "local": str(ROOT / "models" / "embedded-sd"), "family": "sd15",
                         **PRESET},
            "tiny-sd2": {"label": "Tiny SD 2.x", "local": str(save_tiny_sd2(root / "tiny-sd2")), "family": "sd21",
                         **PRESET},
            "tiny-sdxl": {"label": "Tiny SDXL", "local": str(save_tiny_sdxl(root / "tiny-sdxl")), "family": "sdxl",
                          **PRESET},
        },
    }
    path = root / "models.yaml"
    path.write_text(yaml.safe_dump(presets))
    save_random_sdxl_lora(root / "tiny-sdxl", root / "loras" / "xl-style.safetensors")
    return root


@pytest.fixture(scope="module")
def client(families, tmp_path_factory):
    url, process = start_app(["--presets-file", str(families / "models.yaml"), "--loras-dir", str(families / "loras")],
                             tmp_path_factory.mktemp("app"))
    yield Client(url, verbose=False)
    stop_app(process)


def settings(preset, **overrides):
    return dict(prompt="a red circle", negative_prompt="", preset=preset, scheduler="Euler", steps=4,
                guidance_scale=5.0, seed=3, batch_size=1) | overrides


def opened(item):
    with Image.open(item["image"]) as image:
        image.load()
        return image


@pytest.mark.parametrize("preset", ["tiny-sd2", "tiny-sdxl"])
def test_text_to_image(client, preset):
    gallery, seeds, _ = client.predict(**settings(preset), width=64, height=64, style="None", clip_skip=1,
                                       api_name="/text_to_image")
    image = opened(gallery[0])
    params = parse_parameters(image.info["parameters"])
    assert image.size == (64, 64) and seeds == [3] and params.model == preset and params.model_hash


def test_sd2_v_prediction_gives_diffusers_pixels(client, families):
    """The app's v-prediction image is the one diffusers' own pipeline makes from the folder (the scheduler's
    prediction type survives the sampler mapping)."""
    gallery, _, _ = client.predict(**settings("tiny-sd2"), width=64, height=64, style="None", clip_skip=1,
                                   api_name="/text_to_image")
    pipe = StableDiffusionPipeline.from_pretrained(families / "tiny-sd2")
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = make_scheduler("Euler", pipe.scheduler.config, seed=3)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    theirs = pipe("a red circle", num_inference_steps=4, guidance_scale=5.0, width=64, height=64,
                  generator=torch.Generator("cpu").manual_seed(3)).images[0]
    difference = np.abs(np.asarray(opened(gallery[0]).convert("RGB"), dtype=int) - np.asarray(theirs, dtype=int))
    assert difference.max() <= 1


@pytest.mark.parametrize("preset", ["tiny-sd2", "tiny-sdxl"])
def test_inpaint_keeps_every_pixel_outside_the_mask(client, preset, tmp_path):
    rng = np.random.default_rng(0)
    source = Image.fromarray(rng.integers(0, 255, (80, 96, 3), dtype=np.uint8))
    mask = Image.new("L", (96, 80), 0)
    mask.paste(255, (40, 20, 80, 60))
    source.save(tmp_path / "image.png")
    mask.save(tmp_path / "mask.png")
    gallery, _, _ = client.predict(handle_file(str(tmp_path / "image.png")), handle_file(str(tmp_path / "mask.png")),
                                   **settings(preset), strength=1.0, mask_blur=0, inpaint_area="Whole picture",
                                   padding=8, clip_skip=1, api_name="/inpaint")
    image = opened(gallery[0])
    outside = np.asarray(mask) == 0
    assert image.size == (96, 80)
    assert np.array_equal(np.asarray(image.convert("RGB"))[outside], np.asarray(source)[outside])
    assert parse_parameters(image.info["parameters"]).model == preset


@pytest.mark.parametrize("preset", ["tiny-sd2", "tiny-sdxl"])
def test_sketch_to_image(client, preset, tmp_path):
    sketch = Image.new("RGB", (64, 64), "white")
    sketch.paste((220, 30, 30), (16, 16, 48, 48))
    sketch.save(tmp_path / "sketch.png")
    gallery, _, _ = client.predict(handle_file(str(tmp_path / "sketch.png")), **settings(preset), strength=0.75,
                                   clip_skip=1, api_name="/sketch_to_image")
    image = opened(gallery[0])
    params = parse_parameters(image.info["parameters"])
    assert image.size == (64, 64) and params.model == preset and params.extra["Denoising strength"] == "0.75"


def test_clip_skip_is_refused_for_sdxl_with_a_reason(client):
    with pytest.raises(Exception, match="Clip skip applies to SD 1.x models"):
        client.predict(**settings("tiny-sdxl"), width=64, height=64, style="None", clip_skip=2,
                       api_name="/text_to_image")


def test_an_sdxl_lora_applies_to_both_text_encoders_and_the_unet_and_leaves_nothing_behind(client):
    def pixels(prompt):
        gallery, _, _ = client.predict(**settings("tiny-sdxl", prompt=prompt), width=64, height=64, style="None",
                                       clip_skip=1, api_name="/text_to_image")
        image = opened(gallery[0])
        return np.asarray(image.convert("RGB"), dtype=int), parse_parameters(image.info["parameters"])

    plain, _ = pixels("a red circle")
    with_lora, params = pixels("a red circle <lora:xl-style:1>")
    assert np.abs(with_lora - plain).max() > 10 and params.extra["Lora hashes"].startswith("xl-style: ")
    assert np.array_equal(pixels("a red circle")[0], plain)  # the shared models came back as they were
    text_encoders_only, _ = pixels("a red circle <lora:xl-style:1:0>")
    assert np.abs(text_encoders_only - plain).max() > 0  # the text encoders' layers act on their own
    # and the embedded model refuses it with the reason (the tiny SDXL reads 80-wide text embeddings, SDXL 2048)
    with pytest.raises(Exception, match="made for a model with 80-wide text embeddings; Embedded is the embedded"):
        client.predict(**settings("embedded", prompt="a red circle <lora:xl-style:1>"), width=64, height=64,
                       style="None", clip_skip=1, api_name="/text_to_image")
