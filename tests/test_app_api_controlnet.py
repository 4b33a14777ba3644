"""ControlNet units through the real app's HTTP API (a file of its own, so that pytest-xdist runs it beside
test_app_api.py rather than after it)."""

import pytest
from gradio_client import Client, handle_file
from PIL import Image

from tests.test_app_api import text_to_image


@pytest.fixture(scope="module")
def client(app_url):
    return Client(app_url, verbose=False)


def control_drawing(path):
    """Black lines on white: a square at the bottom right."""
    image = Image.new("RGB", (128, 128), "white")
    image.paste((0, 0, 0), (70, 70, 120, 120))
    image.paste((255, 255, 255), (76, 76, 114, 114))
    image.save(path)
    return handle_file(path)


def test_text_to_image_with_a_controlnet_unit_through_the_api(client, tmp_path):
    unit = dict(control_1_enabled=True, control_1_image=control_drawing(tmp_path / "lines.png"),
                control_1_model="embedded-scribble", control_1_preprocessor="invert", control_1_weight=0.8,
                control_1_guidance_end=0.9)
    _, seeds, info = text_to_image(client, seed=4, **unit)
    assert seeds == [4]
    assert ('ControlNet 0: "Module: invert (from white bg & black line), Model: embedded-controlnet-scribble [' in info
            and "Weight: 0.8," in info and "Guidance End: 0.9," in info)
    # a unit left off is not used, whatever it holds
    _, _, plain = text_to_image(client, seed=4, **(unit | {"control_1_enabled": False}))
    assert "ControlNet" not in plain


@pytest.mark.parametrize("unit, message", [
    (dict(control_2_model="sd15-scribble"), "ControlNet unit 2: ControlNet 'ControlNet 1.1 scribble (SD 1.5)' is made for"),
    (dict(control_2_weight=2.5), "Value 2.5 is greater than maximum value 2"),  # gradio's own range check
    (dict(control_2_image=None), "ControlNet unit 2: give it a control image (upload one)."),
    (dict(control_2_preprocessor="depth_midas"), "ControlNet unit 2: unknown preprocessor 'depth_midas'"),
    (dict(control_2_processor_res=100.5), "the preprocessor resolution must be a whole number (got 100.5)"),
    ("not an image", "ControlNet unit 2's control image file 'notes.png' could not be read as an image"),
])
def test_a_bad_control_unit_is_refused_with_the_reason(client, tmp_path, unit, message):
    if unit == "not an image":
        (tmp_path / "notes.png").write_bytes(b"these are words, not pixels")
        unit = dict(control_2_image=handle_file(tmp_path / "notes.png"))
    base = dict(control_2_enabled=True, control_2_image=control_drawing(tmp_path / "lines.png"),
                control_2_model="embedded-scribble")
    with pytest.raises(Exception) as caught:
        text_to_image(client, **(base | unit))
    assert message in str(caught.value)


def test_compare_has_controlnet_axes(client, tmp_path):
    _, table, cells = client.predict(prompt="a red shape on a blue background", seed=2,
                                     x_type="[ControlNet] Weight", x_values="0, 1", y_type="Nothing", y_values="",
                                     z_type="Nothing", z_values="", control_1_enabled=True,
                                     control_1_image=control_drawing(tmp_path / "lines.png"),
                                     control_1_model="embedded-scribble", api_name="/compare")
    assert [row[0] for row in table["data"]] == ["[ControlNet] Weight: 0", "[ControlNet] Weight: 1"]
    with Image.open(cells[0]["image"]) as off, Image.open(cells[1]["image"]) as on:
        assert "Weight: 0," in off.info["parameters"] and off.tobytes() != on.tobytes()
