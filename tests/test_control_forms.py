"""ControlNet units as the forms and the API give them: the fields made into units (an image that cannot be used
named), the preprocessed map shown before anything runs, Sketch to image's own ControlNet, units read back from a
PNG, and the Compare tab's ControlNet axes."""

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw
from tiny_models import EMBEDDED, save_random_controlnet

from components.control_units import control_units, optional_control_images, split_control_fields
from studio.core.errors import InvalidRequest
from studio.evaluation.compare import CompareRequest, Comparison
from studio.models.controlnets import ControlNetCatalog, ControlNetPreset, load_controlnets
from studio.models.presets import PresetCatalog, load_presets
from studio.tasks.control import ControlUnit, preview_map, sketch_unit
from studio.tasks.engines import local_engines
from studio.tasks.generation import TextToImageRequest
from studio.tasks.inpainting import InpaintRequest
from studio.tasks.parameters import request_from_parameters

PROMPT = "a red circle on a blue background"


def drawing(colour="black", size: int = 64, transparent: bool = False) -> Image.Image:
    """A square outline at the bottom right, on white paper (or on nothing)."""
    image = Image.new("RGBA" if transparent else "RGB", (size, size), (0, 0, 0, 0) if transparent else "white")
    ImageDraw.Draw(image).rectangle((size // 2, size // 2, size - 8, size - 8), outline=colour, width=3)
    return image


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    folder = save_random_controlnet(EMBEDDED, tmp_path_factory.mktemp("controlnets") / "sketch", seed=5)
    return ControlNetCatalog([ControlNetPreset("sketchy", "Sketchy", "embedded", local=folder, preprocessor="invert",
                                               for_sketches=True, words=("shape",))])


@pytest.fixture(scope="module")
def engines(catalog):
    return local_engines(PresetCatalog([load_presets().get("embedded")], "embedded"), controlnets=catalog)


def unit_fields(index: int, **values) -> dict:
    defaults = dict(enabled=True, image=None, preprocessor="invert", model="sketchy", weight=1.0, guidance_start=0.0,
                    guidance_end=1.0, control_mode="Balanced", resize_mode="Crop and Resize", pixel_perfect=False,
                    processor_res=512, threshold_a=-1, threshold_b=-1)
    return {f"control_{index}_{name}": value for name, value in (defaults | values).items()}


def test_the_form_makes_units_of_the_enabled_ones_and_opens_their_images(tmp_path):
    drawing().save(tmp_path / "sketch.png")
    fields = {"prompt": PROMPT, **unit_fields(1, image=str(tmp_path / "sketch.png"), weight=0.5),
              **unit_fields(2, enabled=False, weight=2.0), **unit_fields(3, image=None, threshold_a=None)}
    rest, units = control_units(fields, max_upload_pixels=1_000_000)
    assert rest == {"prompt": PROMPT}
    assert [unit.weight for unit in units] == [0.5, 1.0]  # unit 2 is off
    assert units[0].image.size == (64, 64) and units[1].image is None  # None: the request's own picture
    assert units[1].threshold_a is None  # an API caller's null is the preprocessor's default
    assert len(split_control_fields(fields)[1]) == 3


def test_a_control_file_that_is_not_an_image_or_too_large_is_named(tmp_path):
    (tmp_path / "notes.png").write_bytes(b"words, not pixels")
    with pytest.raises(InvalidRequest, match="ControlNet unit 2's control image file 'notes.png' could not be read"):
        control_units({**unit_fields(1, enabled=False), **unit_fields(2, image=str(tmp_path / "notes.png"))}, 10**6)
    drawing(size=200).save(tmp_path / "big.png")
    with pytest.raises(InvalidRequest, match="ControlNet unit 1's control image is 200×200: more than 10,000 pixels"):
        control_units(unit_fields(1, image=str(tmp_path / "big.png")), 10_000)


def test_a_fractional_preprocessor_resolution_is_refused_not_rounded(engines):
    _, units = control_units(unit_fields(1, image=None, processor_res=512.5), 10**6)
    problems = engines.inpainter.problems(InpaintRequest(prompt=PROMPT, controls=units), "img2img")
    assert "the preprocessor resolution must be a whole number (got 512.5)" in problems["controls"]


def test_the_api_may_leave_every_control_image_out():
    """And every unit's model: empty where the default preset's family has no ControlNet (FLUX.1)."""
    def handler(request, progress=None, **fields):
        return fields

    optional_control_images(handler, 2)
    import inspect

    parameters = inspect.signature(handler).parameters
    assert [name for name in parameters][-5:] == ["control_1_image", "control_1_model", "control_2_image",
                                                  "control_2_model", "fields"]
    assert parameters["control_1_image"].default is None and parameters["control_2_model"].default is None
    assert handler(None, control_1_image="x", prompt="p") == {"control_1_image": "x", "prompt": "p"}


def test_the_map_shown_before_anything_runs_is_what_the_model_reads():
    unit = ControlUnit("sketchy", preprocessor="invert", processor_res=64)
    black = np.asarray(preview_map(unit, drawing("black"), 10**6))
    assert black.max() == 255 and black[4, 4].tolist() == [0, 0, 0]  # white lines on black
    # each channel inverted, as A1111 does: a yellow line is a blue one on black
    yellow = np.asarray(preview_map(unit, drawing("#ffd700"), 10**6))
    assert yellow[-9, -20].tolist() == [0, 40, 255] and yellow[4, 4].tolist() == [0, 0, 0]
    # a drawing on a transparent canvas: the canvas is paper, not a black slab
    assert (np.asarray(preview_map(unit, drawing("black", transparent=True), 10**6)) == black).all()
    with pytest.raises(InvalidRequest, match="Canny low threshold must be between 1 and 255"):
        preview_map(replace(unit, preprocessor="canny", threshold_a=0), drawing(), 10**6)
    with pytest.raises(InvalidRequest, match="more than 100 pixels"):
        preview_map(unit, drawing(), 100)


def test_sketch_to_image_guides_with_the_familys_sketch_controlnet_once(engines, catalog):
    inpainter = engines.inpainter
    assert sketch_unit(catalog, "embedded") == ControlUnit("sketchy", preprocessor="invert")
    assert sketch_unit(catalog, "sdxl") is None
    base = InpaintRequest(prompt=PROMPT, seed=4, steps=4, strength=1.0, sketch_controlnet=True)
    assert inpainter.with_sketch_controlnet(base).controls == (ControlUnit("sketchy", preprocessor="invert"),)
    given = replace(base, controls=(ControlUnit("sketchy", preprocessor="invert", weight=0.5),))
    assert inpainter.with_sketch_controlnet(given) == given  # a PNG's unit is not added twice
    assert inpainter.with_sketch_controlnet(replace(base, sketch_controlnet=False)).controls == ()

    # "a red shape": the model's captions never said "shape", the sketch ControlNet's prompts did
    assert inpainter.unknown_words("embedded", "a red shape") == ["shape"]
    assert inpainter.unknown_words("embedded", "a red shape", (ControlUnit("sketchy"),)) == []
    assert not any("shape" in warning for warning in inpainter.plan_sketch(drawing(), base).warnings)
    guided = inpainter.sketch_to_image(drawing(), base).images[0]
    plain = inpainter.sketch_to_image(drawing(), replace(base, sketch_controlnet=False)).images[0]
    assert 'ControlNet 0: "Module: invert (from white bg & black line), Model: sketch' in guided.parameters
    assert "ControlNet 0" not in plain.parameters
    assert not np.array_equal(np.asarray(guided.image), np.asarray(plain.image))


def test_a_png_fills_the_units_without_their_images_and_says_so(engines, catalog):
    engine = engines.text_to_image
    made = engine.generate(TextToImageRequest(prompt=PROMPT, seed=2, steps=3, controls=(
        ControlUnit("sketchy", drawing(), "invert", weight=0.7, guidance_end=0.8),))).images[0]
    filled, notes = request_from_parameters(made.parameters, engine.presets, TextToImageRequest(prompt=""),
                                            controlnets=catalog)
    assert filled.controls == (ControlUnit("sketchy", None, "invert", weight=0.7, guidance_end=0.8,
                                           processor_res=512),)
    assert "The control image is not stored in a PNG: give it again." in notes
    # a PNG without units turns the form's off
    without = made.parameters.split(", ControlNet 0")[0]
    assert request_from_parameters(without, engine.presets, TextToImageRequest(prompt=""),
                                   controlnets=catalog)[0].controls == ()


def test_compare_varies_the_first_units_weight_and_preprocessor(engines):
    comparison = Comparison(engines.text_to_image)
    unit = ControlUnit("sketchy", drawing(), "invert")
    request = CompareRequest(prompt=PROMPT, seed=5, x_type="[ControlNet] Weight", x_values="0, 1",
                             y_type="[ControlNet] Preprocessor", y_values="invert, scribble", controls=(unit,))
    plan = comparison.plan(request)
    settings = [(cell_plan.controls[0].settings.weight, cell_plan.controls[0].fields.module)
                for cell_plan in plan.plans]
    assert sorted(settings) == [(0.0, "invert (from white bg & black line)"), (0.0, "scribble_xdog"),
                                (1.0, "invert (from white bg & black line)"), (1.0, "scribble_xdog")]
    with comparison.model_files(plan) as resolved:
        result = comparison.run(resolved)
    assert all('ControlNet 0: "Module' in cell.image.parameters for cell in result.cells)
    by_weight = {dict(cell.cell.settings)["control_weight"]: np.asarray(cell.image.image) for cell in result.cells
                 if dict(cell.cell.settings)["control_preprocessor"] == "invert"}
    assert not np.array_equal(by_weight[0.0], by_weight[1.0])
    with pytest.raises(InvalidRequest, match="A ControlNet axis varies the first ControlNet unit: enable one"):
        comparison.plan(replace(request, controls=()))
    with pytest.raises(InvalidRequest, match="weight must be between 0 and 2"):
        comparison.plan(replace(request, x_values="1, 3"))


def test_one_sketch_controlnet_per_family(tmp_path):
    entry = "  {name}:\n    label: {name}\n    family: embedded\n    local: x\n    for_sketches: true\n"
    (tmp_path / "controlnets.yaml").write_text("controlnets:\n" + entry.format(name="a") + entry.format(name="b"))
    with pytest.raises(ValueError, match="more than one ControlNet with for_sketches for family embedded"):
        load_controlnets(tmp_path / "controlnets.yaml")
    shipped = load_controlnets()
    assert shipped.for_sketches("embedded").name == "embedded-scribble"
    assert shipped.get("embedded-scribble").words == ("shape",)
    assert Path(shipped.get("embedded-scribble").local).name == "embedded-controlnet-scribble"


def test_only_masked_cuts_a_units_own_image_to_the_same_region(engines):
    """A1111: the control image is fitted to the picture and cut to the crop being inpainted, so its map lines up."""
    from studio.tasks.inpainting import ONLY_MASKED

    picture = Image.new("RGB", (128, 128), (40, 90, 200))
    mask = Image.new("L", (128, 128))
    mask.paste(255, (96, 96, 120, 120))  # bottom right
    control = Image.new("RGB", (64, 64))  # at half the picture's size: fitted to it first
    control.paste((255, 255, 255), (0, 0, 32, 64))  # white on the left half only
    request = InpaintRequest(prompt=PROMPT, steps=4, inpaint_area=ONLY_MASKED, padding=4,
                             controls=(ControlUnit("sketchy", control, "none"),))
    plan, _ = engines.inpainter.plan_inpaint(picture, mask, request)
    assert np.asarray(plan.controls[0].image).max() == 0  # the crop is in the black right half
    whole, _ = engines.inpainter.plan_inpaint(picture, mask, replace(request, inpaint_area="Whole picture"))
    assert np.asarray(whole.controls[0].image).max() == 255


def test_the_sketch_controlnet_is_not_one_of_the_forms_units(engines):
    limit = engines.inpainter.limits.max_control_units
    units = tuple(ControlUnit("sketchy", drawing(), "invert", label=f"ControlNet unit {n + 1}") for n in range(limit))
    request = InpaintRequest(prompt=PROMPT, steps=4, sketch_controlnet=True, controls=units)
    assert engines.inpainter.problems(request, "img2img") == {}  # the form's full count, and the sketch ControlNet
    over = replace(request, controls=(*units, units[0]))
    assert f"At most {limit} ControlNet unit(s) here (got {limit + 1})" in engines.inpainter.problems(
        over, "img2img")["controls"]
    assert sketch_unit(engines.inpainter.controlnets, "embedded").label == "The sketch ControlNet"


def test_hires_fix_soft_injects_every_unit_as_a1111():
    from studio.models.controlnets import BALANCED, CONTROLNET_MORE_IMPORTANT, PROMPT_MORE_IMPORTANT, UnitSettings
    from studio.tasks.control import PlannedControl, pass_controls

    preset = ControlNetPreset("sketchy", "Sketchy", "embedded", local=Path("x"))
    planned = tuple(PlannedControl(preset, drawing(), UnitSettings(control_mode=mode), None)
                    for mode in (BALANCED, CONTROLNET_MORE_IMPORTANT))
    assert [s.control_mode for s in pass_controls(planned, (64, 64)).settings] == [BALANCED, CONTROLNET_MORE_IMPORTANT]
    assert [s.control_mode for s in pass_controls(planned, (128, 128), hires=True).settings] == [
        PROMPT_MORE_IMPORTANT, CONTROLNET_MORE_IMPORTANT]


def test_a_preprocessor_axis_gives_each_cell_its_preprocessors_own_thresholds(engines):
    comparison = Comparison(engines.text_to_image)
    unit = ControlUnit("sketchy", drawing(), "canny", threshold_a=100, threshold_b=200)
    plan = comparison.plan(CompareRequest(prompt=PROMPT, seed=1, x_type="[ControlNet] Preprocessor",
                                          x_values="canny, scribble", controls=(unit,)))
    assert sorted((p.controls[0].fields.module, p.controls[0].fields.threshold_a) for p in plan.plans) == [
        ("canny", 100), ("scribble_xdog", 32)]


def test_a_model_of_another_family_is_refused_as_such_not_as_missing():
    engines = local_engines(PresetCatalog([load_presets().get("embedded")], "embedded"),
                            controlnets=load_controlnets())
    problems = engines.text_to_image.problems(TextToImageRequest(
        prompt=PROMPT, controls=(ControlUnit("sd15-scribble", drawing(), "scribble", label="ControlNet unit 2"),)))
    assert problems["controls"].startswith("ControlNet unit 2: ControlNet 'ControlNet 1.1 scribble (SD 1.5)' is "
                                           "made for Stable Diffusion 1.x models")
    assert "not downloaded" not in problems["controls"] and "Hub" not in problems["controls"]


def test_a_drawing_is_put_on_white_paper_and_an_empty_one_is_refused():
    import gradio as gr

    from components.control_units import drawing_on_paper

    strokes = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    strokes.paste((0, 0, 0, 255), (10, 10, 30, 12))
    paper = np.asarray(drawing_on_paper(strokes))
    assert paper.shape == (64, 64, 3) and (paper[11, 20] == 0).all() and (paper[40, 40] == 255).all()
    for empty in (Image.new("RGBA", (64, 64), (0, 0, 0, 0)), None):
        with pytest.raises(gr.Error, match="Nothing is drawn on the white paper"):
            drawing_on_paper(empty)
