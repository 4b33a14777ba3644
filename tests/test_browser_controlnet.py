"""ControlNet in the page, in headless Chromium (a file of its own, so that pytest-xdist runs it beside
test_browser.py rather than after it)."""

import pytest

from tests.test_browser import browser, page, text_tab  # noqa: F401 - the fixtures, and the tab's locator

pytestmark = pytest.mark.browser


def test_draw_a_sketch_pick_the_scribble_preprocessor_see_its_map_and_generate(page, artifacts):
    """Sketch to image with a ControlNet unit: the map the ControlNet reads is shown before anything runs."""
    import io
    import re

    import numpy as np
    from PIL import Image

    page.get_by_role("tab", name="Inpaint").click()
    tab = page.locator("#inpaint-tab")
    tab.get_by_label("Sketch to image").check()
    page.locator("#sketch-controlnet").wait_for()  # the embedded family's sketch ControlNet, on by default
    canvas = tab.locator("canvas").first
    swatches = page.locator("#inpaint-editor button.color")
    if not swatches.first.is_visible():
        page.locator("#inpaint-editor").get_by_label("Color").first.click()
    # black: the scribble preprocessor finds dark lines (a red one is light in red)
    colours = swatches.evaluate_all("buttons => buttons.map(b => getComputedStyle(b).backgroundColor)")
    swatches.nth(colours.index("rgb(17, 17, 17)")).click()
    box = canvas.bounding_box()
    square = [(0.55, 0.55), (0.9, 0.55), (0.9, 0.9), (0.55, 0.9), (0.55, 0.55)]  # bottom right
    page.mouse.move(box["x"] + box["width"] * square[0][0], box["y"] + box["height"] * square[0][1])
    page.mouse.down()
    for x, y in square[1:]:
        page.mouse.move(box["x"] + box["width"] * x, box["y"] + box["height"] * y, steps=8)
    page.mouse.up()

    page.locator("#inpaint-control-units").get_by_text("ControlNet", exact=True).first.click()
    unit = page.locator("#inpaint-control-units")
    page.locator("#inpaint-control-unit-1-enabled input").check()
    page.locator("#inpaint-control-unit-1-preprocessor input").click()
    page.get_by_role("option", name=re.compile("^scribble")).click()
    unit.get_by_role("button", name="Show the map of the picture").first.click()
    shown = page.locator("#inpaint-control-unit-1-map img").first
    shown.wait_for(timeout=30_000)
    control_map = Image.open(io.BytesIO(page.request.get(shown.get_attribute("src")).body())).convert("L")
    lines = np.asarray(control_map) > 128
    height, width = lines.shape
    assert lines.any() and not lines[: height // 3, : width // 3].any(), "the lines are where the square was drawn"
    page.screenshot(path=str(artifacts / "sketch_controlnet_map.png"), full_page=True)

    # "shape" is a word the sketch ControlNet was trained with: not flagged as unknown to the model, "zebra" is
    tab.get_by_label("Prompt", exact=True).fill("a red shape zebra")
    hint = page.locator("#inpaint-tab .prompt-hint").first
    page.wait_for_function("e => e.innerText.includes('“zebra”')", arg=hint.element_handle())
    assert "“shape”" not in hint.inner_text()
    tab.get_by_label("Prompt", exact=True).fill("a red shape on a blue background")
    tab.get_by_role("button", name="Generate", exact=True).click()
    result = page.locator("#inpaint-gallery img[alt^='Seed ']").first
    result.wait_for(timeout=90_000)
    info = page.locator("#inpaint-generation-info textarea")
    page.wait_for_function("() => document.querySelector('#inpaint-generation-info textarea')?.value"
                           ".includes('ControlNet 0')")
    assert 'Module: scribble_xdog, Model: embedded-controlnet-scribble [' in info.input_value()
    assert "ControlNet 1" not in info.input_value()  # the sketch ControlNet's unit is this one, not another
    page.screenshot(path=str(artifacts / "sketch_controlnet_result.png"), full_page=True)


def test_a_control_image_upload_turns_its_unit_on_and_shows_the_map(page, artifacts, tmp_path):
    from PIL import Image

    drawing = Image.new("RGB", (96, 96), "white")
    drawing.paste((0, 0, 0), (10, 10, 40, 40))
    drawing.save(tmp_path / "lines.png")
    text_tab(page).locator("#text-control-units").get_by_text("ControlNet", exact=True).first.click()
    page.locator("#text-control-unit-1-image input[type=file]").set_input_files(str(tmp_path / "lines.png"))
    page.locator("#text-control-unit-1-map img").first.wait_for(timeout=30_000)
    assert page.locator("#text-control-unit-1-enabled input").is_checked()
    page.screenshot(path=str(artifacts / "text_to_image_control_unit.png"), full_page=True)


def test_the_editor_draws_at_the_first_drag_on_sketch_paper_and_after_an_upload(page, artifacts, tmp_path):
    """gradio's editor opens on its Image tool, where a drag draws nothing: the page picks the Brush where there is
    something to draw on (Sketch to image's blank paper, an uploaded picture)."""
    from PIL import Image

    page.get_by_role("tab", name="Inpaint").click()
    tab = page.locator("#inpaint-tab")
    editor = page.locator("#inpaint-editor")
    brush = editor.get_by_role("button", name="Brush", exact=True)

    def drag_changes_the_canvas() -> bool:
        canvas = tab.locator("canvas").first
        before = canvas.screenshot()
        box = canvas.bounding_box()
        page.mouse.move(box["x"] + box["width"] * 0.4, box["y"] + box["height"] * 0.4)
        page.mouse.down()
        page.mouse.move(box["x"] + box["width"] * 0.6, box["y"] + box["height"] * 0.6, steps=10)
        page.mouse.up()
        page.wait_for_timeout(300)
        return canvas.screenshot() != before

    assert "highlight" not in (brush.get_attribute("class") or "")  # Inpaint without a picture: nothing to draw on
    tab.get_by_label("Sketch to image").check()
    page.wait_for_function("() => document.querySelector('#inpaint-editor button[aria-label=\"Brush\"]')"
                           "?.className.includes('highlight')")
    assert drag_changes_the_canvas()
    page.screenshot(path=str(artifacts / "sketch_first_drag.png"), full_page=True)

    tab.get_by_label("Inpaint", exact=True).check()
    Image.new("RGB", (128, 128), "skyblue").save(tmp_path / "sky.png")
    editor.locator("input[type=file]").first.set_input_files(str(tmp_path / "sky.png"))
    page.wait_for_function("() => document.querySelector('#inpaint-editor button[aria-label=\"Brush\"]')"
                           "?.className.includes('highlight')")
    assert drag_changes_the_canvas()


def test_a_control_image_drawn_on_the_units_canvas_becomes_its_control_image(page, artifacts):
    """Text to image has no picture of its own: a unit's control image may be drawn on its canvas (the Brush picked
    when it opens), then used: the unit turns on and shows the map of the drawing."""
    import io

    import numpy as np
    from PIL import Image

    text_tab(page).locator("#text-control-units").get_by_text("ControlNet", exact=True).first.click()
    page.locator("#text-control-unit-1-draw").get_by_text("Draw the control image").click()
    canvas = page.locator("#text-control-unit-1-canvas canvas").first
    canvas.wait_for()
    canvas.scroll_into_view_if_needed()
    page.wait_for_function("() => document.querySelector('#text-control-unit-1-canvas button[aria-label=\"Brush\"]')"
                           "?.className.includes('highlight')")
    box = canvas.bounding_box()
    corners = [(0.3, 0.3), (0.7, 0.3), (0.7, 0.7), (0.3, 0.7), (0.3, 0.3)]
    page.mouse.move(box["x"] + box["width"] * corners[0][0], box["y"] + box["height"] * corners[0][1])
    page.mouse.down()
    for x, y in corners[1:]:
        page.mouse.move(box["x"] + box["width"] * x, box["y"] + box["height"] * y, steps=8)
    page.mouse.up()
    page.locator("#text-control-unit-1-use-drawing").click()
    shown = page.locator("#text-control-unit-1-map img").first
    shown.wait_for(timeout=30_000)
    assert page.locator("#text-control-unit-1-enabled input").is_checked()
    lines = np.asarray(Image.open(io.BytesIO(page.request.get(shown.get_attribute("src")).body())).convert("L")) > 128
    height, width = lines.shape
    assert lines.any() and not lines[height // 2 - 20: height // 2 + 20, width // 2 - 20: width // 2 + 20].any(), \
        "white lines (the invert preprocessor's) around the square's empty middle"
    page.screenshot(path=str(artifacts / "text_to_image_drawn_control.png"), full_page=True)
