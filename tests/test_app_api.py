"""The real app in a subprocess, driven through gradio_client as an API user would."""

import threading

import pytest
from gradio_client import Client
from PIL import Image

from studio.metadata import parse_parameters

DEFAULTS = dict(prompt="a red circle on a blue background", negative_prompt="", preset="embedded", scheduler="Euler",
                steps=10, guidance_scale=7.0, width=64, height=64, seed=7, batch_size=1, style="None")


def text_to_image(client, **overrides):
    return client.predict(**(DEFAULTS | overrides), api_name="/text_to_image")


@pytest.fixture(scope="module")
def client(app_url):
    return Client(app_url, verbose=False)


def test_api_lists_the_named_endpoint_with_named_parameters(client):
    api = client.view_api(print_info=False, return_format="dict")
    parameters = [p["parameter_name"] for p in api["named_endpoints"]["/text_to_image"]["parameters"]]
    assert parameters == list(DEFAULTS)


def test_text_to_image_returns_pngs_with_parameters_and_seeds(client):
    gallery, seeds, info = text_to_image(client, seed=1000, batch_size=2, width=96, height=64)
    assert seeds == [1000, 1001]
    assert [item["caption"] for item in gallery] == ["Seed 1000", "Seed 1001"]
    for item, seed in zip(gallery, seeds):
        with Image.open(item["image"]) as image:
            assert image.format == "PNG" and image.size == (96, 64)
            params = parse_parameters(image.info["parameters"])
        assert params.seed == seed and (params.width, params.height) == (96, 64) and params.steps == 10
    assert info.startswith("a red circle on a blue background\nSteps: 10")


def test_same_seed_same_png_pixels_through_the_api(client):
    first, _, _ = text_to_image(client, seed=5)
    second, _, _ = text_to_image(client, seed=5)
    with Image.open(first[0]["image"]) as a, Image.open(second[0]["image"]) as b:
        assert a.tobytes() == b.tobytes()


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"width": 1000}, "Width must be a multiple of 8 between 32 and 128"),
        ({"height": 4000}, "Value 4000 is greater than maximum value 1536"),  # gradio's own range check
        ({"steps": 101}, "Steps must be between 1 and 100 for Embedded shapes model"),
        ({"steps": 0}, "Value 0 is less than minimum value 1"),  # gradio's own range check
        ({"guidance_scale": 31}, "Value 31 is greater than maximum value 30"),  # gradio's own range check
        ({"preset": "no-such-model"}, "Unknown preset 'no-such-model'. Available presets: embedded"),
        ({"scheduler": "LCM"}, "Scheduler 'LCM' does not work with preset 'embedded'"),
        ({"scheduler": "Heun++"}, "Unknown scheduler 'Heun++'"),
        ({"prompt": ""}, "Enter a prompt"),
        ({"prompt": "word " * 1000}, "Prompt is too long (5000 characters; the limit is 2000)"),
        ({"batch_size": 9}, "Value 9 is greater than maximum value 8"),
        ({"preset": "sdxl-base-1.0", "width": 1024, "height": 1024}, "Preset 'SDXL base 1.0' is unavailable"),
    ],
)
def test_bad_input_gets_a_clear_error_and_the_server_keeps_answering(client, overrides, message):
    with pytest.raises(Exception) as caught:
        text_to_image(client, **overrides)
    assert message in str(caught.value)
    _, seeds, _ = text_to_image(client, seed=3, steps=2)
    assert seeds == [3]


def test_two_users_at_once_each_get_their_own_settings(app_url):
    results = {}

    def user(name, **settings):
        own_client = Client(app_url, verbose=False)
        results[name] = text_to_image(own_client, **settings)

    threads = [
        threading.Thread(target=user, args=("alice",), kwargs=dict(prompt="a green square", seed=11, width=64,
                                                                   scheduler="DDIM", batch_size=2)),
        threading.Thread(target=user, args=("bob",), kwargs=dict(prompt="a yellow star", seed=22, width=128,
                                                                 scheduler="Euler a", style="Anime")),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    alice = [parse_parameters(Image.open(item["image"]).info["parameters"]) for item in results["alice"][0]]
    bob = [parse_parameters(Image.open(item["image"]).info["parameters"]) for item in results["bob"][0]]
    assert [(p.prompt, p.seed, p.width, p.scheduler) for p in alice] == [
        ("a green square", 11, 64, "DDIM"), ("a green square", 12, 64, "DDIM")]
    assert [(p.prompt.startswith("anime artwork of a yellow star"), p.seed, p.width, p.scheduler) for p in bob] == [
        (True, 22, 128, "Euler a")]
