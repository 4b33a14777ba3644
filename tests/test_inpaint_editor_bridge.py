"""What the page sends from the Inpaint editor (its files) and what it is told (the size it measured): read only
from files uploaded to this server, parsed strictly."""

import os
import uuid
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
from gradio import utils
from PIL import Image

from components.editor_bridge import MAX_LAYERS, brush_props, editor_images, file_for_page, parse_measured_size
from components.inpaint import INPAINT, SKETCH, SKETCH_TO_IMAGE, brush, images_for
from studio.tasks.inpainting import sketch_mask


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


MAX_PIXELS = 4_000_000


def read(component, max_pixels, sent):
    return editor_images(component, sent, max_pixels)


def editor():
    return gr.ImageEditor(type="pil", image_mode="RGBA")


def test_the_editors_files_are_read_as_the_editor_would_hand_them_over(uploaded):
    value = read(editor(), MAX_PIXELS, {"background": file_data(uploaded), "layers": [],
                                     "composite": file_data(uploaded)})
    assert value["background"].size == (40, 30) and value["background"].mode == "RGBA"
    assert value["layers"] == []


def test_a_file_the_page_did_not_upload_is_refused(tmp_path, uploaded):
    elsewhere = tmp_path / "secret.png"
    Image.new("RGB", (4, 4)).save(elsewhere)
    with pytest.raises(gr.Error, match="uploaded through the page"):
        read(editor(), MAX_PIXELS, {"background": file_data(uploaded), "layers": [file_data(elsewhere)],
                                 "composite": file_data(uploaded)})
    with pytest.raises(gr.Error, match="uploaded through the page"):  # a path that climbs out of the folder
        climbing = Path(utils.get_upload_folder()) / os.path.relpath(elsewhere, utils.get_upload_folder())
        assert climbing.resolve() == elsewhere.resolve()
        read(editor(), MAX_PIXELS, {"background": file_data(climbing), "layers": [], "composite": None})


def test_a_malformed_value_gets_a_message_and_nothing_is_an_empty_editor():
    with pytest.raises(gr.Error, match="did not arrive whole"):
        read(editor(), MAX_PIXELS, {"background": {"no": "path"}, "layers": "x"})
    assert read(editor(), MAX_PIXELS, None) == {}


def test_an_image_too_large_or_not_an_image_is_refused_before_it_is_decoded(uploaded):
    with pytest.raises(gr.Error, match="40x30|1,200|pixels"):
        read(editor(), 1000, {"background": file_data(uploaded), "layers": [], "composite": file_data(uploaded)})
    not_an_image = uploaded.with_name("notes.png")
    not_an_image.write_text("not an image")
    try:
        with pytest.raises(gr.Error, match="could not be read as an image"):
            read(editor(), MAX_PIXELS, {"background": file_data(not_an_image), "layers": [], "composite": None})
    finally:
        not_an_image.unlink()


def test_the_measured_size_is_parsed_strictly():
    assert parse_measured_size("96x80#3") == (96, 80)
    for bad in ("", None, "96x#1", "axb#2", "96x80x2#1", "-5x-3#1", "0x0#1", " 9_6x80 #junk"):
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


def test_more_layers_than_the_editor_has_are_refused_before_any_is_read(uploaded):
    layers = [file_data(uploaded)] * (MAX_LAYERS + 1)
    with pytest.raises(gr.Error, match=f"at most {MAX_LAYERS} layers"):
        read(editor(), MAX_PIXELS, {"background": file_data(uploaded), "layers": layers,
                                 "composite": file_data(uploaded)})


def test_each_mode_gives_the_engine_its_image_and_mask(uploaded):
    """Inpaint: the background and the painted strokes as the mask; Inpaint sketch: the composite (strokes painted
    in) and the strokes grown by one brush width (sketch_mask: no ghost); Sketch to image: the composite alone."""
    stroke = Image.new("RGBA", (40, 30), (0, 0, 0, 0))
    stroke.paste((255, 0, 0, 255), (18, 12, 22, 18))
    layer = uploaded.with_name("layer.png")
    stroke.save(layer)
    try:
        sent = {"background": file_data(uploaded), "layers": [file_data(layer)], "composite": file_data(uploaded)}
        painted = np.asarray(stroke.getchannel("A")) > 0
        image, mask = images_for(editor(), INPAINT, sent, MAX_PIXELS)
        assert image.size == (40, 30) and np.array_equal(np.asarray(mask) > 0, painted)
        _image, sketched = images_for(editor(), SKETCH, sent, MAX_PIXELS)
        grown = np.asarray(sketched) > 0
        assert grown.sum() > painted.sum() and grown[painted].all()
        assert np.array_equal(grown, np.asarray(sketch_mask(mask)) > 0)
        composite, none = images_for(editor(), SKETCH_TO_IMAGE, sent, MAX_PIXELS)
        assert composite.size == (40, 30) and none is None
    finally:
        layer.unlink()



def png_bytes(size, colour) -> bytes:
    import io

    out = io.BytesIO()
    Image.new("RGBA", size, colour).save(out, format="PNG")
    return out.getvalue()


def test_a_value_the_editor_streamed_reads_the_same_every_time_and_only_by_its_id():
    """The editor streams its images (accept_blobs) and sends {"id"}; gradio's own reading takes them out of its
    store at the first read, so the job's check, its run and a mode switch each find them only because the first
    read wrote them to files: in a folder whose name the id alone does not give."""
    from gradio.components.image_editor import EditorDataBlobs

    editor = gr.ImageEditor(type="pil", image_mode="RGBA")
    blob_id = uuid.uuid4().hex[:11]
    editor.blob_storage[blob_id] = EditorDataBlobs(background=png_bytes((40, 30), (10, 20, 200, 255)),
                                                   layers=[png_bytes((40, 30), (0, 0, 0, 0))],
                                                   composite=png_bytes((40, 30), (10, 20, 200, 255)))
    first, second = (read(editor, MAX_PIXELS, {"id": blob_id}) for _ in range(2))
    assert blob_id not in editor.blob_storage
    for value in (first, second):
        assert value["background"].size == (40, 30) and len(value["layers"]) == 1
    assert not any(blob_id in path.name for path in Path(utils.get_upload_folder()).glob("editor-*"))
    assert read(editor, MAX_PIXELS, {"id": "another-visitors-id"}) == {"background": None, "layers": [],
                                                                      "composite": None}
    editor.blob_storage["big"] = EditorDataBlobs(background=png_bytes((3000, 2000), (0, 0, 0, 255)), layers=[],
                                                 composite=None)
    with pytest.raises(gr.Error, match="pixels"):
        read(editor, 4_000_000, {"id": "big"})
