"""What the page sends from the Inpaint editor (its files) and what it is told (the size it measured): read only
from files uploaded to this server, parsed strictly."""

import uuid
from pathlib import Path

import gradio as gr
import pytest
from gradio import utils
from PIL import Image

from components.inpaint import brush, brush_props, editor_images, file_for_page, parse_measured_size


def file_data(path: Path) -> dict:
    return {"path": str(path), "orig_name": path.name, "meta": {"_type": "gradio.FileData"}}


@pytest.fixture
def uploaded():
    """A 40×30 image in gradio's upload folder, where the page's uploads land."""
    folder = Path(utils.get_upload_folder()) / f"test-{uuid.uuid4().hex}"
    folder.mkdir(parents=True)
    path = folder / "background.png"
    Image.new("RGB", (40, 30), (10, 20, 200)).save(path)
    yield path
    path.unlink()
    folder.rmdir()


def editor():
    return gr.ImageEditor(type="pil", image_mode="RGBA")


def test_the_editors_files_are_read_as_the_editor_would_hand_them_over(uploaded):
    value = editor_images(editor(), {"background": file_data(uploaded), "layers": [],
                                     "composite": file_data(uploaded)})
    assert value["background"].size == (40, 30) and value["background"].mode == "RGBA"
    assert value["layers"] == []


def test_a_file_the_page_did_not_upload_is_refused(tmp_path, uploaded):
    elsewhere = tmp_path / "secret.png"
    Image.new("RGB", (4, 4)).save(elsewhere)
    with pytest.raises(gr.Error, match="uploaded through the page"):
        editor_images(editor(), {"background": file_data(uploaded), "layers": [file_data(elsewhere)],
                                 "composite": file_data(uploaded)})
    with pytest.raises(gr.Error, match="uploaded through the page"):  # a path that climbs out of the folder
        climbing = Path(utils.get_upload_folder()) / ".." / elsewhere.relative_to("/")
        editor_images(editor(), {"background": file_data(climbing), "layers": [], "composite": None})


def test_a_malformed_value_gets_a_message_and_nothing_is_an_empty_editor():
    with pytest.raises(gr.Error, match="did not arrive whole"):
        editor_images(editor(), {"background": {"no": "path"}, "layers": "x"})
    assert editor_images(editor(), None) == {}


def test_the_measured_size_is_parsed_strictly():
    assert parse_measured_size("96x80#3") == (96, 80)
    for bad in ("", None, "96x#1", "axb#2", "96x80x2#1"):
        assert parse_measured_size(bad) is None


def test_an_image_sent_to_the_editor_is_a_file_the_page_may_load(tmp_path):
    source = tmp_path / "result.png"
    Image.new("RGB", (8, 8)).save(source)
    component = editor()
    for image in (str(source), Image.open(source)):
        shown = file_for_page(component, image)
        assert utils.is_in_or_equal(shown["path"], component.GRADIO_CACHE)
        assert Image.open(shown["path"]).size == (8, 8)


def test_the_brush_reaches_the_page_as_gradio_configures_it():
    chosen = brush("Inpaint", 3)
    assert brush_props(chosen) == {key: value for key, value in
                                   gr.ImageEditor(brush=chosen).get_config()["brush"].items()}
