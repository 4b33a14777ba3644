"""The real app in a subprocess, driven through gradio_client as an API user would."""

import re
import threading

import numpy as np
import pytest
from gradio_client import Client, handle_file
from PIL import Image

from bench.fairness import quick_image_wait_ratio
from studio.a1111.metadata import parse_parameters
from studio.core.images import blur_mask
from studio.embedded import scenes

DEFAULTS = dict(prompt="a red circle on a blue background", negative_prompt="", preset="embedded", scheduler="Euler",
                steps=10, guidance_scale=7.0, width=64, height=64, seed=7, batch_size=1, style="None", clip_skip=1)


UNIT = ("enabled", "image", "preprocessor", "model", "weight", "guidance_start", "guidance_end", "control_mode",
        "resize_mode", "pixel_perfect", "processor_res", "threshold_a", "threshold_b")


def units(count: int) -> list[str]:
    """The API's names of `count` ControlNet units' fields: control_1_enabled, ..."""
    return [f"control_{n}_{name}" for n in range(1, count + 1) for name in UNIT]


def text_to_image(client, **overrides):
    return client.predict(**(DEFAULTS | overrides), api_name="/text_to_image")


@pytest.fixture(scope="module")
def client(app_url):
    return Client(app_url, verbose=False)


def test_api_lists_the_named_endpoints_with_named_parameters(client):
    api = client.view_api(print_info=False, return_format="dict")
    def parameters(endpoint):
        return [p["parameter_name"] for p in api["named_endpoints"][endpoint]["parameters"]]

    flow = ["distilled_guidance", "shift"]  # SD 3.5 and FLUX.1's; empty: the model's own
    canvas = [*(f"outpaint_{side}" for side in ("left", "right", "top", "bottom")), "outpaint_fill",
              "outpaint_falloff", "outpaint_colour_variation", "soft_inpainting",
              *(f"soft_{name}" for name in ("schedule_bias", "preservation_strength", "transition_contrast_boost",
                                            "mask_influence", "difference_threshold", "difference_contrast"))]
    assert parameters("/text_to_image") == [*DEFAULTS, "hires_fix", "hires_upscaler", "hires_upscale", "hires_steps",
                                            "denoising_strength", "live_preview", "preview_every", *flow, *units(3)]
    # no timers, no UI glue
    assert set(api["named_endpoints"]) == {"/text_to_image", "/inpaint", "/sketch_to_image", "/upscale", "/compare",
                                           "/arena_battle", "/arena_vote", "/leaderboard"}
    for endpoint in api["named_endpoints"]:  # only the prompt (and the images) must be given
        required = [p["parameter_name"] for p in api["named_endpoints"][endpoint]["parameters"]
                    if not p["parameter_has_default"]]
        # an outpaint needs no mask, so /inpaint's is optional (left out without one: a clear message)
        assert required in (["prompt"], ["image", "prompt"], ["sketch", "prompt"], ["image"],
                            ["battle_id", "choice"], []), (endpoint, required)
    assert parameters("/arena_battle") == ["prompt", "seed"]
    assert parameters("/arena_vote") == ["battle_id", "choice"]
    assert parameters("/compare") == ["prompt", "negative_prompt", "seed", "x_type", "x_values", "y_type", "y_values",
                                      "z_type", "z_values", *units(1)]
    assert parameters("/upscale") == ["image", "upscaler", "scale", "tile", "denoise_strength", "face_restoration",
                                      "face_visibility"]
    assert parameters("/inpaint") == ["image", "mask", *INPAINT, "live_preview", "preview_every", *flow, *canvas,
                                      *units(3)]
    assert parameters("/sketch_to_image") == ["sketch", *(k for k in INPAINT if k not in ("mask_blur", "inpaint_area",
                                                                                        "padding")),
                                              "sketch_controlnet", "live_preview", "preview_every", *flow, *units(3)]

    def default(endpoint, name):
        return next(p["parameter_default"] for p in api["named_endpoints"][endpoint]["parameters"]
                    if p["parameter_name"] == name)

    # the embedded preset's CFG: 3 for text to image, 1.5 in the Inpaint tab (fewer tinted strokes)
    assert (default("/text_to_image", "guidance_scale"), default("/inpaint", "guidance_scale")) == (3.0, 1.5)


def test_every_endpoint_names_its_parameters_and_results(client):
    """No `value_212` (gradio's name for an output without a label) nor `1st` (gr.api's)."""
    api = client.view_api(print_info=False, return_format="dict")
    placeholder = re.compile(r"value_\d+|\d+(st|nd|rd|th)")
    for endpoint, info in api["named_endpoints"].items():
        names = [p["parameter_name"] for p in info["parameters"]] + [p["label"] for p in info["parameters"]]
        names += [r["label"] for r in info["returns"]]
        assert all(name and not placeholder.fullmatch(name) for name in names), (endpoint, names)
    returns = {endpoint: [r["label"] for r in info["returns"]] for endpoint, info in api["named_endpoints"].items()}
    assert returns["/arena_battle"] == ["Battle id", "Left", "Right"]
    assert returns["/arena_vote"] == ["Revealed contestants"] and returns["/leaderboard"] == ["Leaderboard"]


# the settings that only whole numbers make sense for, by endpoint
WHOLE_NUMBERS = {
    "/text_to_image": {"steps", "width", "height", "seed", "batch_size", "clip_skip", "hires_steps", "preview_every",
                       *(f"control_{n}_processor_res" for n in (1, 2, 3))},
    "/inpaint": {"steps", "mask_blur", "padding", "seed", "batch_size", "clip_skip", "preview_every",
                 *(f"outpaint_{side}" for side in ("left", "right", "top", "bottom")),
                 *(f"control_{n}_processor_res" for n in (1, 2, 3))},
    "/sketch_to_image": {"steps", "seed", "batch_size", "clip_skip", "preview_every",
                         *(f"control_{n}_processor_res" for n in (1, 2, 3))},
    "/upscale": {"tile"},
    "/compare": {"seed", "control_1_processor_res"},
    "/arena_battle": {"seed"},
}


def test_the_schema_says_integer_for_whole_number_settings_and_number_for_the_rest(client):
    api = client.view_api(print_info=False, return_format="dict")
    for endpoint, info in api["named_endpoints"].items():
        types = {p["parameter_name"]: (p["type"].get("type"), p["python_type"]["type"]) for p in info["parameters"]}
        integers = {name for name, (json_type, _) in types.items() if json_type == "integer"}
        assert integers == WHOLE_NUMBERS.get(endpoint, set()), endpoint
        assert all(types[name][1] == "int" for name in integers), endpoint
    settings = {p["parameter_name"]: p["type"]["type"] for p in api["named_endpoints"]["/text_to_image"]["parameters"]}
    assert settings["guidance_scale"] == "number"  # fractions are fine there


@pytest.mark.parametrize("endpoint, arguments, message", [
    ("/text_to_image", DEFAULTS | {"seed": 7.5}, "Seed must be a whole number (got 7.5)"),  # gradio rounded it to 8
    ("/text_to_image", DEFAULTS | {"hires_fix": True, "hires_steps": 2.5}, "Hires steps must be a whole number"),
    ("/upscale", {"upscaler": "embedded-rrdbnet-x4", "tile": 100.5}, "Tile size must be a whole number of pixels"),
    ("/compare", {"prompt": "a red circle", "seed": 1.5, "x_type": "Sampler", "x_values": "Euler"},
     "Seed must be a whole number (got 1.5)"),
    ("/arena_battle", {"prompt": "a red circle", "seed": 2.5}, "Seed must be a whole number (got 2.5)"),
    ("/inpaint", {"prompt": "a star", "mask_blur": 4.5}, "Mask blur must be a whole number (got 4.5)"),
])
def test_a_fraction_for_a_whole_number_is_refused_not_rounded(client, tmp_path, endpoint, arguments, message):
    files = {}
    if endpoint in ("/upscale", "/inpaint"):
        picture_and_mask(tmp_path)
        files = {"image": handle_file(tmp_path / "image.png")}
        files |= {"mask": handle_file(tmp_path / "mask.png")} if endpoint == "/inpaint" else {}
    with pytest.raises(Exception, match=re.escape(message)):
        client.predict(**files, **arguments, api_name=endpoint)


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


def test_a1111_prompts_with_a_lora_through_the_api_and_in_inpaint(client, tmp_path):
    """Weights, BREAK and <lora:...> work in every generating endpoint; the PNG keeps the prompt as typed and
    records the LoRA's hash as A1111 does."""
    typed = "a (red:1.2) circle BREAK on a [blue] background <lora:test-shapes:0.9>"
    gallery, _, info = text_to_image(client, prompt=typed, seed=5)
    with Image.open(gallery[0]["image"]) as image:
        params = parse_parameters(image.info["parameters"])
    assert params.prompt == typed and params.extra["Lora hashes"].startswith("test-shapes: ")
    assert info.startswith(typed + "\n")
    # the same prompt syntax in the Inpaint tab's endpoint
    picture_and_mask(tmp_path)
    gallery, _, _ = client.predict(image=handle_file(tmp_path / "image.png"), mask=handle_file(tmp_path / "mask.png"),
                                   **(INPAINT | {"prompt": typed}), api_name="/inpaint")
    with Image.open(gallery[0]["image"]) as image:
        assert image.info["parameters"].startswith(typed + "\n")
        assert 'Lora hashes: "test-shapes: ' in image.info["parameters"]
    with pytest.raises(Exception, match="Unknown LoRA 'nope'"):
        text_to_image(client, prompt="a red circle <lora:nope:1>")


def test_hires_fix_through_the_api_makes_the_larger_png_with_a1111s_fields(client):
    gallery, seeds, info = text_to_image(client, seed=3, hires_fix=True, hires_upscaler="embedded-rrdbnet-x4",
                                         hires_upscale=2, hires_steps=8, denoising_strength=0.4)
    with Image.open(gallery[0]["image"]) as image:
        assert image.format == "PNG" and image.size == (128, 128)
        params = parse_parameters(image.info["parameters"])
    assert (params.width, params.height) == (64, 64)
    assert {key: params.extra[key] for key in ("Denoising strength", "Hires upscale", "Hires steps", "Hires upscaler")} \
        == {"Denoising strength": "0.4", "Hires upscale": "2", "Hires steps": "8", "Hires upscaler": "embedded-rrdbnet-x4"}
    # the defaults: off; on, Latent ×2 at 0.5
    gallery, _, _ = text_to_image(client, seed=3)
    with Image.open(gallery[0]["image"]) as image:
        assert image.size == (64, 64)
    gallery, _, info = text_to_image(client, seed=3, hires_fix=True)
    assert "Denoising strength: 0.5, Hires upscale: 2, Hires upscaler: Latent" in info


def test_compare_endpoint_returns_the_grid_the_cells_and_the_table(client):
    grids, table, cells = client.predict(prompt="a red circle on a blue background", seed=9, x_type="Sampler",
                                         x_values="Euler, DDIM", y_type="Steps", y_values="6, 10", z_type="Nothing",
                                         z_values="", api_name="/compare")
    assert len(grids) == 1 and len(cells) == 4
    assert table["headers"] == ["cell", "seconds", "CLIP score (embedded CLIP, offline)"]
    assert [row[0] for row in table["data"]] == ["Sampler: Euler, Steps: 6", "Sampler: DDIM, Steps: 6",
                                                 "Sampler: Euler, Steps: 10", "Sampler: DDIM, Steps: 10"]
    assert all(0 <= row[2] <= 100 for row in table["data"])
    with Image.open(cells[3]["image"]) as cell:
        params = parse_parameters(cell.info["parameters"])
    assert (params.scheduler, params.steps, params.seed) == ("DDIM", 10, 9)
    with Image.open(grids[0]["image"]) as grid:
        assert grid.format == "PNG" and grid.width > 256
    with pytest.raises(Exception, match="Steps: '2.5' is not a whole number"):
        client.predict(prompt="a red circle", x_type="Steps", x_values="2.5", api_name="/compare")


def test_compare_submit_sees_the_grid_forming_then_the_grid_of_predict(client):
    settings = dict(prompt="a red circle on a blue background", seed=9, x_type="Sampler", x_values="Euler, DDIM",
                    y_type="Steps", y_values="60", z_type="Nothing", z_values="")
    job = client.submit(**settings, api_name="/compare")
    outputs = list(job)
    forming = [grids[0] for grids, _, _ in outputs[:-1] if grids and grids[0].get("caption", "").startswith("Forming…")]
    assert len(forming) >= 2, [output[0] for output in outputs]
    assert any("Cell 2/2: Image 1/1, step " in grid["caption"] for grid in forming)  # the second cell forming
    final = job.result()
    predicted = client.predict(**settings, api_name="/compare")
    for streamed, direct in zip(final[2], predicted[2]):  # the cells, as predict makes them
        assert np.array_equal(np.asarray(Image.open(streamed["image"])), np.asarray(Image.open(direct["image"])))



def test_same_seed_same_png_pixels_through_the_api(client):
    first, _, _ = text_to_image(client, seed=5)
    second, _, _ = text_to_image(client, seed=5)
    with Image.open(first[0]["image"]) as a, Image.open(second[0]["image"]) as b:
        assert a.tobytes() == b.tobytes()


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"width": 1000}, "Width must be a multiple of 8 between 32 and 128"),
        ({"height": 4000}, "Value 4000 is greater than maximum value 2048"),  # gradio's own range check
        ({"steps": 101}, "Steps must be between 1 and 100 for Embedded shapes model"),
        ({"steps": 0}, "Value 0 is less than minimum value 1"),  # gradio's own range check
        ({"guidance_scale": 31}, "Value 31 is greater than maximum value 30"),  # gradio's own range check
        ({"preset": "no-such-model"}, "Unknown preset 'no-such-model'. Available presets: embedded"),
        ({"hires_fix": True, "hires_upscaler": "Nearest"}, "Unknown hires upscaler 'Nearest'. Choose one of: Latent"),
        ({"hires_fix": True, "width": 128, "hires_upscale": 3}, "Hires. fix would make 384×192;"),
        ({"scheduler": "LCM"}, "Scheduler 'LCM' does not work with Embedded shapes model (offline)"),
        ({"scheduler": "Heun++"}, "Unknown scheduler 'Heun++'"),
        ({"prompt": ""}, "Enter a prompt"),
        ({"prompt": "word " * 1000}, "Prompt is too long (5000 characters; the limit is 2000)"),
        ({"batch_size": 9}, "Value 9 is greater than maximum value 8"),
        ({"steps": 2.5}, "Steps must be a whole number (got 2.5)"),  # not silently 2
        ({"width": 64.5}, "Width must be a whole number (got 64.5)"),
        ({"batch_size": 1.5}, "Batch size must be a whole number (got 1.5)"),
        ({"clip_skip": 1.5}, "Clip skip must be a whole number (got 1.5)"),
        # A1111 users' mistakes in a prompt, named, with what is allowed
        ({"prompt": "a (red:1e308) circle"},
         "In the prompt, (red:1e308): '1e308' is not a weight; write a number from -10 to 10, as in (red:1.3)."),
        ({"negative_prompt": "(blue:25)"}, "In the negative prompt, (blue:25): the weight 25 is out of range"),
        ({"prompt": "a red circle <lora:>"}, "<lora:>: name the LoRA, as in <lora:name:0.8>."),
        ({"prompt": "a red circle <lora:test-shapes:lots>"}, "<lora:test-shapes:lots>: 'lots' is not a weight"),
        ({"preset": "sdxl-base-1.0", "width": 1024, "height": 1024}, "Preset 'SDXL base 1.0' is not downloaded yet"),
    ],
)
def test_bad_input_gets_a_clear_error_and_the_server_keeps_answering(client, overrides, message):
    with pytest.raises(Exception) as caught:
        text_to_image(client, **overrides)
    assert message in str(caught.value)
    _, seeds, _ = text_to_image(client, seed=3, steps=2)
    assert seeds == [3]


def test_an_offline_hub_preset_is_named_before_any_size_complaint(client):
    """At the embedded model's 64 px (the form's default), SDXL was refused for "Width must be ... 512" before it
    was said that its model is not here: the model is checked first, and the download command comes with it."""
    with pytest.raises(Exception) as caught:
        text_to_image(client, preset="sdxl-base-1.0")
    message = str(caught.value)
    assert message.startswith("Preset 'SDXL base 1.0' is not downloaded yet, and the Hugging Face Hub cannot be "
                              "reached"), message
    assert "Width" not in message and "Height" not in message and "Scheduler" not in message
    assert "To download its files:\nhf download stabilityai/stable-diffusion-xl-base-1.0 \\\n" in message


def test_a_user_error_is_one_line_in_the_log_not_a_traceback(client, app_url):
    from conftest import APP_LOGS

    with pytest.raises(Exception, match="Unknown scheduler 'Sampler of dreams'"):
        text_to_image(client, scheduler="Sampler of dreams")
    log = APP_LOGS[app_url].read_text()
    lines = [line for line in log.splitlines() if "Sampler of dreams" in line]
    # one line; a traceback would repeat the message on its last line
    assert len(lines) == 1 and "studio.requests" in lines[0] and "Cannot generate" in lines[0]


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


# ----- inpainting: plain image and mask files, no editor layers -----

INPAINT = dict(prompt="a large yellow star on a blue background", negative_prompt="", preset="embedded",
               scheduler="Euler", steps=10, guidance_scale=3.0, strength=1.0, mask_blur=4,
               inpaint_area="Whole picture", padding=32, seed=7, batch_size=1, clip_skip=1)


def picture_and_mask(tmp_path, size=(100, 72)):
    scene = scenes.Scene("blue", (scenes.Shape("circle", "red", "left", "small"),))
    image = scenes.render(scene, 64).resize(size, Image.Resampling.BICUBIC)
    mask = Image.new("L", size, 0)
    mask.paste(255, (size[0] // 2, 8, size[0] - 4, size[1] - 8))
    image.save(tmp_path / "image.png")
    mask.save(tmp_path / "mask.png")
    return image, mask


def test_inpaint_endpoint_repaints_the_mask_and_returns_the_rest_unchanged(client, tmp_path):
    image, mask = picture_and_mask(tmp_path)
    gallery, seeds, info = client.predict(image=handle_file(tmp_path / "image.png"),
                                          mask=handle_file(tmp_path / "mask.png"), **INPAINT, api_name="/inpaint")
    assert seeds == [7] and "Mask blur: 4" in info and "Denoising strength: 1" in info
    with Image.open(gallery[0]["image"]) as out:
        assert out.format == "PNG" and out.size == image.size
        assert parse_parameters(out.info["parameters"]).extra["Inpaint area"] == "Whole picture"
        keep = np.asarray(blur_mask(np.asarray(mask) > 0, 4)) == 0
        assert np.array_equal(np.asarray(out.convert("RGB"))[keep], np.asarray(image)[keep])


@pytest.mark.parametrize("problem, message", [
    ("corrupt", "could not be read as an image"),
    ("empty mask", "The mask is empty"),
    ("small mask", "must be the same size"),
])
def test_inpaint_endpoint_refuses_bad_uploads_clearly(client, tmp_path, problem, message):
    picture_and_mask(tmp_path)
    if problem == "corrupt":
        (tmp_path / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    elif problem == "empty mask":
        Image.new("L", (100, 72), 0).save(tmp_path / "mask.png")
    else:
        Image.new("L", (50, 36), 255).save(tmp_path / "mask.png")
    with pytest.raises(Exception) as caught:
        client.predict(image=handle_file(tmp_path / "image.png"), mask=handle_file(tmp_path / "mask.png"),
                       **INPAINT, api_name="/inpaint")
    assert message in str(caught.value)
    _, seeds, _ = text_to_image(client, seed=3, steps=2)
    assert seeds == [3]


def test_sketch_to_image_endpoint_draws_from_the_sketch(client, tmp_path):
    sketch = Image.new("RGBA", (256, 256), (0, 0, 0, 0))
    sketch.paste((230, 30, 30, 255), (80, 80, 176, 176))
    sketch.save(tmp_path / "sketch.png")
    settings = {k: v for k, v in INPAINT.items() if k not in ("mask_blur", "inpaint_area", "padding")}
    gallery, seeds, info = client.predict(sketch=handle_file(tmp_path / "sketch.png"),
                                          **settings | {"strength": 0.75}, api_name="/sketch_to_image")
    # the embedded family's sketch ControlNet guides it by default
    assert seeds == [7] and "Denoising strength: 0.75" in info
    assert 'ControlNet 0: "Module: invert (from white bg & black line), Model: embedded-controlnet-scribble [' in info
    with Image.open(gallery[0]["image"]) as out:
        assert out.format == "PNG" and out.size == (64, 64)
    _, _, plain = client.predict(sketch=handle_file(tmp_path / "sketch.png"), **settings, sketch_controlnet=False,
                                 api_name="/sketch_to_image")
    assert "ControlNet" not in plain


# ----- fairness: jobs take turns on the device between images -----

def test_a_quick_image_is_not_stuck_behind_another_visitors_batch(app_url):
    ratio, figures = quick_image_wait_ratio(app_url)
    assert figures["batch_was_still_running"], f"the quick image did not come back before the batch: {figures}"
    assert ratio <= 1.5, f"the quick image waited behind the batch: {figures}"


def test_upscale_endpoint_returns_the_slider_pair_and_a_png_that_keeps_the_parameters(client, tmp_path):
    source = scenes.render(scenes.Scene("blue", (scenes.Shape("star", "yellow", "center", "large"),)), 64)
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a large yellow star\nSteps: 20, Seed: 5")
    source.save(tmp_path / "star.png", pnginfo=info)
    (before, after), png = client.predict(handle_file(str(tmp_path / "star.png")), upscaler="embedded-rrdbnet-x4",
                                          scale=2.5, api_name="/upscale")  # tile left to the memory budget
    with Image.open(png) as result:
        result.load()
        assert result.size == (160, 160) and result.format == "PNG"
        assert result.info["parameters"] == "a large yellow star\nSteps: 20, Seed: 5"
        assert result.info["postprocessing"] == "Postprocess upscale by: 2.5, Postprocess upscaler: embedded-rrdbnet-x4"
    with Image.open(after) as shown:
        assert shown.size == (160, 160)


@pytest.mark.parametrize("endpoint, content", [
    ("/upscale", b"these are words, not pixels"),
    ("/upscale", b"\x89PNG\r\n\x1a\n a PNG's signature, then no image"),
    ("/inpaint", b"these are words, not pixels"),
    ("/sketch_to_image", b"these are words, not pixels"),
])
def test_a_file_that_is_not_an_image_is_refused_with_the_reason(client, tmp_path, endpoint, content):
    """Decoded by the studio, not by gradio (whose answer was "The upstream Gradio app has raised an exception")."""
    picture_and_mask(tmp_path)
    (tmp_path / "notes.txt").write_bytes(content)
    notes = handle_file(tmp_path / "notes.txt")
    arguments = {"/upscale": dict(image=notes, upscaler="embedded-rrdbnet-x4"),
                 "/inpaint": dict(image=notes, mask=handle_file(tmp_path / "mask.png"), prompt="a star"),
                 "/sketch_to_image": dict(sketch=notes, prompt="a star")}[endpoint]
    with pytest.raises(Exception) as caught:
        client.predict(**arguments, api_name=endpoint)
    what = "sketch" if endpoint == "/sketch_to_image" else "image"
    assert (f"The {what} file 'notes.txt' could not be read as an image: its content is not in an image format. "
            "Upload a PNG, JPEG or WebP file.") in str(caught.value)
    _, seeds, _ = text_to_image(client, seed=3, steps=2)  # the server keeps answering
    assert seeds == [3]


def test_upscale_submit_sees_the_tiles_filling_in_then_the_result_of_predict(client, tmp_path):
    scenes.render(scenes.Scene("blue", (scenes.Shape("star", "yellow", "center", "large"),)), 64).resize(
        (150, 150), Image.Resampling.BICUBIC).save(tmp_path / "star.png")
    settings = dict(upscaler="embedded-rrdbnet-x4", scale=4, tile=64)
    job = client.submit(handle_file(str(tmp_path / "star.png")), **settings, api_name="/upscale")
    outputs = list(job)
    filling = [pair for pair, _ in outputs[:-1] if isinstance(pair, (list, tuple))]
    assert len(filling) >= 2, outputs
    assert len({Image.open(after).tobytes() for _, after in filling}) >= 2  # more tiles in each
    (_, streamed), png = job.result()
    (_, direct), _ = client.predict(handle_file(str(tmp_path / "star.png")), **settings, api_name="/upscale")
    assert np.array_equal(np.asarray(Image.open(streamed)), np.asarray(Image.open(direct)))
    with Image.open(png) as result:
        assert result.size == (600, 600)


@pytest.mark.parametrize(("overrides", "message"), [
    (dict(upscaler="RealESRGAN_x4plus"), "RealESRGAN_x4plus.pth"),  # offline here: which file, and where
    (dict(scale=12), "Value 12 is greater than maximum value 8"),  # gradio's own range check
    (dict(tile=10), "A tile must be at least 64 pixels"),
    # no face restorer's files here: the option is hidden in the page, and the API says why
    (dict(face_restoration="GFPGANv1.4"), "Face restoration is not available here \\(no face restorer's weights are in"),
])
def test_upscale_endpoint_refuses_clearly(client, tmp_path, overrides, message):
    scenes.render(scenes.Scene("blue", ()), 32).save(tmp_path / "plain.png")
    with pytest.raises(Exception, match=message):
        client.predict(handle_file(str(tmp_path / "plain.png")), **({"upscaler": "embedded-rrdbnet-x4"} | overrides),
                       api_name="/upscale")


def test_submit_sees_live_previews_before_the_result_and_predict_the_same_result(client):
    """Text to image streams: Client.submit has each live preview as an intermediate output (a "Forming…" image),
    then the result, which is predict's, bit for bit."""
    off = client.submit(**(DEFAULTS | dict(steps=30, seed=21, live_preview="Off")), api_name="/text_to_image")
    assert len(list(off)) == 1  # the result only
    job = client.submit(**(DEFAULTS | dict(steps=100, seed=21)), api_name="/text_to_image")
    outputs = list(job)  # every output, as it came
    final = job.result()
    previews = [gallery for gallery, _, _ in outputs[:-1] if gallery and gallery[0].get("caption", "").startswith(
        "Forming… Image 1/1, step ")]
    assert len(previews) >= 2, [output[0] for output in outputs]
    distinct = {Image.open(preview[0]["image"]).tobytes() for preview in previews}
    assert len(distinct) >= 2  # the image changes as it forms
    predicted = text_to_image(client, steps=100, seed=21)
    streamed, direct = (Image.open(gallery[0]["image"]) for gallery in (final[0], predicted[0]))
    assert np.array_equal(np.asarray(streamed), np.asarray(direct))
    assert not final[0][0].get("caption", "").startswith("Forming") and "Seed: 21," in final[2]


def test_inpaint_submit_sees_previews_in_place_and_predict_the_same_result(client, tmp_path):
    """Inpaint streams too: each preview is the whole picture with the edit forming inside the mask (the rest is
    the picture's own pixels), and the result is predict's, bit for bit."""
    image, mask = picture_and_mask(tmp_path)
    files = dict(image=handle_file(tmp_path / "image.png"), mask=handle_file(tmp_path / "mask.png"))
    job = client.submit(**files, **(INPAINT | dict(steps=100)), api_name="/inpaint")
    outputs = list(job)
    previews = [gallery[0] for gallery, _, _ in outputs[:-1]
                if gallery and gallery[0].get("caption", "").startswith("Forming…")]
    assert len(previews) >= 2, [output[0] for output in outputs]
    keep = np.asarray(blur_mask(np.asarray(mask) > 0, 4)) == 0
    for preview in previews:
        with Image.open(preview["image"]) as shown:
            assert shown.size == image.size
            assert np.array_equal(np.asarray(shown.convert("RGB"))[keep], np.asarray(image)[keep])
    assert len({Image.open(preview["image"]).tobytes() for preview in previews}) >= 2
    predicted = client.predict(**files, **(INPAINT | dict(steps=100)), api_name="/inpaint")
    streamed, direct = (np.asarray(Image.open(gallery[0]["image"])) for gallery in (job.result()[0], predicted[0]))
    assert np.array_equal(streamed, direct)


def test_inpaint_outpaints_without_a_mask_and_refuses_a_canvas_past_the_limit(client, tmp_path):
    """Outpainting through /inpaint: no mask, the canvas 24 px wider, the original's left part unchanged; soft
    inpainting's fields in the PNG; a canvas past the preset's 128 × 128 refused with the largest that fits."""
    image, _ = picture_and_mask(tmp_path, size=(64, 64))
    gallery, _, info = client.predict(image=handle_file(tmp_path / "image.png"), prompt="a small red circle",
                                      outpaint_right=24, outpaint_fill="Edge", soft_inpainting=True, seed=4,
                                      api_name="/inpaint")
    result = Image.open(gallery[0]["image"]).convert("RGB")
    assert result.size == (88, 64)
    assert np.array_equal(np.asarray(result)[:, :32], np.asarray(image.convert("RGB"))[:, :32])
    assert "Outpaint: right 24, Outpaint fill: Edge" in info and "Soft inpainting enabled: True" in info
    with pytest.raises(Exception, match=r"at most right 192 px"):
        client.predict(image=handle_file(tmp_path / "image.png"), prompt="a small red circle", outpaint_right=300,
                       api_name="/inpaint")
    with pytest.raises(Exception, match=r"Give both an image and a mask .*or an outpaint"):
        client.predict(image=handle_file(tmp_path / "image.png"), prompt="a small red circle", api_name="/inpaint")
