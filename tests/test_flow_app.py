"""SD 3 and FLUX.1 through the real app's API, on tiny random-weight folders listed in a presets file: the flow
settings (shift, FLUX.1-dev's Distilled CFG Scale) as API parameters and PNG fields, FLUX.1 Fill's own guidance
when none is given, public mode and a non-commercial licence, the preset card's licence and prompt note."""

import pytest
import yaml
from conftest import start_app, stop_app
from gradio_client import Client, handle_file
from PIL import Image
from tiny_flow_models import save_tiny_flux, save_tiny_flux_fill, save_tiny_sd3

from studio.a1111.metadata import parse_parameters
from studio.models.presets import load_presets

PRESET = dict(description="a tiny random-weight test model", default_steps=3, default_guidance=1.0,
              default_width=64, default_height=64, min_size=32, max_size=128, size_step=16, default_scheduler="Euler")


@pytest.fixture(scope="module")
def presets_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("flow-app")
    presets = {"default": "tiny-flux", "presets": {
        "tiny-flux": {"label": "Tiny FLUX dev", "local": str(save_tiny_flux(root / "flux")),
                      "inpaint_local": str(save_tiny_flux_fill(root / "fill")), "family": "flux",
                      "distilled_guidance": 3.5, "inpaint_distilled_guidance": 30.0, "non_commercial": True,
                      "public": True, "licence": "FLUX.1 [dev] Non-Commercial License", **PRESET},
        "tiny-sd3": {"label": "Tiny SD 3", "local": str(save_tiny_sd3(root / "sd3")), "family": "sd3",
                     "public": True, **PRESET},
    }}
    path = root / "models.yaml"
    path.write_text(yaml.safe_dump(presets))
    return path


@pytest.fixture(scope="module")
def client(presets_file, tmp_path_factory):
    url, process = start_app(["--presets-file", str(presets_file)], tmp_path_factory.mktemp("app"))
    yield Client(url, verbose=False)
    stop_app(process)


def settings(preset, **overrides):
    return dict(prompt="a red circle", negative_prompt="", preset=preset, scheduler="Euler", steps=3,
                guidance_scale=1.0, seed=3, batch_size=1, live_preview="Off") | overrides


def parameters(item) -> str:
    with Image.open(item["image"]) as image:
        return image.info["parameters"]


def test_text_to_image_takes_the_flow_settings_and_writes_them_as_forge(client):
    gallery, _, info = client.predict(**settings("tiny-flux", scheduler="DPM++ 2M"), width=64, height=64,
                                      distilled_guidance=5.0, shift=2.0, api_name="/text_to_image")
    fields = parse_parameters(parameters(gallery[0]))
    assert fields.extra["Distilled CFG Scale"] == "5" and fields.extra["Shift"] == "2"
    assert "Sampler: DPM++ 2M, Schedule type: Simple" in parameters(gallery[0])
    own, _, _ = client.predict(**settings("tiny-flux"), width=64, height=64, api_name="/text_to_image")
    fields = parse_parameters(parameters(own[0]))
    assert fields.extra["Distilled CFG Scale"] == "3.5" and "Shift" not in fields.extra  # empty: the model's own


def test_flux_fill_inpaints_at_its_own_guidance_and_sd3_with_its_model(client, tmp_path):
    picture, mask = Image.new("RGB", (64, 64), (40, 90, 200)), Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    picture.save(tmp_path / "image.png")
    mask.save(tmp_path / "mask.png")
    for preset, expected in (("tiny-flux", "30"), ("tiny-sd3", None)):
        gallery, _, _ = client.predict(handle_file(str(tmp_path / "image.png")), handle_file(str(tmp_path / "mask.png")),
                                       **settings(preset), strength=1.0, mask_blur=0, inpaint_area="Whole picture",
                                       padding=8, clip_skip=1, api_name="/inpaint")
        assert parse_parameters(parameters(gallery[0])).extra.get("Distilled CFG Scale") == expected


def test_a_bad_shift_is_refused_by_name(client):
    with pytest.raises(Exception, match="Shift must be above 0 and at most 20"):
        client.predict(**settings("tiny-sd3"), width=64, height=64, shift=-1.0, api_name="/text_to_image")
    with pytest.raises(Exception, match="Distilled CFG Scale must be between 0 and 30"):
        client.predict(**settings("tiny-flux"), width=64, height=64, distilled_guidance=31, api_name="/text_to_image")


def test_public_mode_offers_a_non_commercial_preset_only_when_told(presets_file, tmp_path_factory):
    for extra, offered in (([], {"tiny-sd3"}), (["--allow-non-commercial"], {"tiny-sd3", "tiny-flux"})):
        url, process = start_app(["--presets-file", str(presets_file), "--public", *extra],
                                 tmp_path_factory.mktemp("public"))
        try:
            info = Client(url, verbose=False).view_api(return_format="dict", print_info=False)
            preset = next(parameter for parameter in info["named_endpoints"]["/text_to_image"]["parameters"]
                          if parameter["parameter_name"] == "preset")
            choices = {choice[1] if isinstance(choice, list) else choice for choice in preset["type"]["enum"]}
            assert choices == offered, preset
        finally:
            stop_app(process)


def test_the_card_says_the_licence_and_which_encoder_reads_what(presets_file):
    from components.preset_picker import preset_card

    card = preset_card(load_presets(presets_file).get("tiny-flux"))
    assert "Licence: FLUX.1 [dev] Non-Commercial License" in card and "T5-XXL reads its first 512 tokens" in card
    schnell = preset_card(load_presets().get("flux.1-schnell"))
    assert "T5-XXL reads its first 256 tokens" in schnell and "Licence: Apache-2.0" in schnell
