"""The Inpaint editor in headless Chromium: it never makes the page slow, each mode's strokes are its own, the Inpaint button is in view beside the results, and every palette colour can be seen."""

import io

import numpy as np
import pytest
from PIL import Image
from test_browser import browser, fresh_page, text_tab  # noqa: F401 - the module's browser fixture

pytestmark = pytest.mark.browser

# The window sizes the issue names: the layout tests run at both, the behaviour tests at the first (it is the same
# code at any size, and each costs a generation).
SIZES = [(1440, 1000), (1920, 1080)]


@pytest.fixture
def page(browser, app_url, artifacts, request):  # noqa: F811 - this module's page, at the size a test asks for
    yield from fresh_page(browser, app_url, artifacts, request, getattr(request, "param", SIZES[0]))


def generate_in_text_to_image(page):
    """A red circle on blue in Text to image, waited for."""
    tab = text_tab(page)
    tab.get_by_label("Prompt", exact=True).fill("a large red circle on a blue background")
    tab.get_by_role("button", name="Generate", exact=True).click()
    page.locator("#text-to-image-gallery img[alt^='Seed ']").first.wait_for(timeout=60_000)


def generate_and_send_to_inpaint(page):
    """The image sent and shown, and the form's settings with it: a test that types into the form before the last of them
    arrives (a busy machine answers late) would have its text overwritten by the sent prompt."""
    generate_in_text_to_image(page)
    sent_prompt = text_tab(page).get_by_label("Prompt", exact=True).input_value()
    text_tab(page).get_by_role("button", name="Send to Inpaint", exact=True).click()
    inpaint = page.locator("#inpaint-tab")
    inpaint.locator("#inpaint-editor canvas").first.wait_for(timeout=10_000)
    assert eventually(lambda: inpaint.get_by_label("Prompt", exact=True).input_value() == sent_prompt, page)
    # and the picture itself in the editor, as a user waits to see it before painting: strokes drawn on the canvas
    # while it still loads the image (seconds on a busy machine) are exported without it
    assert eventually(lambda: shows_the_sent_image(inpaint), page, seconds=30)
    return inpaint


def drag(page, inpaint, start, end):
    """A brush stroke from `start` to `end`, fractions of the editor's canvas."""
    inpaint.get_by_role("button", name="Brush").first.click()
    box = inpaint.locator("#inpaint-editor canvas").first.bounding_box()
    page.mouse.move(box["x"] + box["width"] * start[0], box["y"] + box["height"] * start[1])
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * end[0], box["y"] + box["height"] * end[1], steps=10)
    page.mouse.up()


def eventually(check, page, seconds: float = 15) -> bool:
    """Whether `check()` comes true within `seconds` (a busy machine renders late), polled every 250 ms."""
    for _ in range(int(seconds * 4)):
        if check():
            return True
        page.wait_for_timeout(250)
    return check()


def shows_the_sent_image(inpaint) -> bool:
    """The editor's canvas shows the image (the blue background of the generated scene), not a blank canvas."""
    shot = Image.open(io.BytesIO(inpaint.locator("#inpaint-editor canvas").first.screenshot())).convert("RGB")
    pixels = np.asarray(shot, dtype=np.int32)
    blue = (pixels[..., 2] > 150) & (pixels[..., 0] < 100)
    return blue.mean() > 0.05


def test_after_the_editor_is_used_other_jobs_do_not_make_it_upload_again(page, artifacts):
    """gradio re-read the editor at every progress tick of any job once it had been an event's input or output
    (or inside one: the Tabs), uploading its image each time; a 64 px image then took 5-10 s from Generate."""
    inpaint = generate_and_send_to_inpaint(page)
    drag(page, inpaint, (0.3, 0.5), (0.7, 0.5))
    inpaint.get_by_label("Inpaint sketch").check()
    page.wait_for_timeout(1000)
    inpaint.get_by_label("Inpaint", exact=True).check()
    page.wait_for_timeout(1000)
    drag(page, inpaint, (0.3, 0.5), (0.7, 0.5))
    inpaint.get_by_label("Prompt", exact=True).fill("a large yellow star on a blue background")
    inpaint.get_by_role("button", name="Inpaint", exact=True).click()
    page.locator("#inpaint-gallery img[alt^='Seed ']").first.wait_for(timeout=60_000)

    uploads = []
    page.on("request", lambda request: uploads.append(request.url) if "/gradio_api/upload" in request.url else None)
    page.get_by_role("tab", name="Text to image").click()
    tab = text_tab(page)
    tab.get_by_label("Prompt", exact=True).fill("a small green square on a white background")
    tab.get_by_label("number input for Steps").fill("40")
    tab.get_by_label("number input for Steps").press("Enter")
    tab.get_by_role("button", name="Generate", exact=True).click()
    page.wait_for_function("() => document.querySelector('#generation-info textarea')?.value"
                           ".startsWith('a small green square')", timeout=60_000)
    page.wait_for_timeout(500)
    assert uploads == [], f"{len(uploads)} uploads while another tab's job ran"


def test_picking_a_colour_while_the_sent_image_loads_keeps_it_and_starts_nothing(page, artifacts):
    """After Send to Inpaint the editor showed "processing" for seconds; a colour picked then left it blank for over
    a minute: an editor update made it report an upload, whose handler read the editor and set its brush, which
    updated it again, in a loop of requests. Now nothing on the server runs for the editor's own events."""
    page.get_by_role("tab", name="Inpaint").click()
    inpaint = page.locator("#inpaint-tab")
    inpaint.get_by_label("Inpaint sketch").check()  # a palette of colours to pick from
    page.wait_for_function("() => document.querySelector('#inpaint-prompt textarea')?.placeholder"
                           ".startsWith('what the strokes become')")
    page.get_by_role("tab", name="Text to image").click()
    generate_in_text_to_image(page)
    calls = []
    page.on("request", lambda request: calls.append(request.url.split("/gradio_api/")[-1].split("?")[0])
            if request.method == "POST" and "/gradio_api/" in request.url else None)
    text_tab(page).get_by_role("button", name="Send to Inpaint", exact=True).click()
    inpaint.get_by_role("button", name="Brush").first.click()  # at once, while the image is on its way
    swatches = page.locator("#inpaint-editor button.color")
    if not swatches.first.is_visible():
        page.locator("#inpaint-editor").get_by_label("Color").first.click()
    swatches.nth(3).click()
    page.wait_for_timeout(5000)
    page.screenshot(path=str(artifacts / "inpaint_colour_while_loading.png"))
    assert shows_the_sent_image(inpaint)
    assert page.locator("#inpaint-editor").get_by_text("processing").count() == 0  # no status left on it
    # the server hears Send to Inpaint and the prompt it fills in (its note), nothing for the editor; the editor
    # uploads its files a few times of its own (gradio's, on a new value and brush), then the page is quiet
    assert [call for call in calls if call != "upload"] == ["queue/join", "run/predict"], calls
    so_far = len(calls)
    page.wait_for_timeout(3000)
    assert len(calls) == so_far and calls.count("upload") <= 8, calls


def test_each_modes_strokes_are_its_own(page, artifacts):
    """A mask painted in Inpaint is not magenta paint in Inpaint sketch: switching clears the strokes (and says
    so), the image stays."""
    inpaint = generate_and_send_to_inpaint(page)
    drag(page, inpaint, (0.3, 0.5), (0.7, 0.5))
    inpaint.get_by_label("Inpaint sketch").check()
    page.wait_for_function("() => document.querySelector('#inpaint-mode-help')?.textContent"
                           ".includes('Switching mode clears the strokes')")
    assert eventually(lambda: shows_the_sent_image(inpaint), page)  # the editor loads the image again
    inpaint.get_by_label("Prompt", exact=True).fill("a large yellow star on a blue background")
    inpaint.get_by_role("button", name="Inpaint", exact=True).click()
    toast = page.get_by_test_id("toast-text").first
    toast.wait_for(timeout=20_000)
    assert "Paint some strokes on the image first" in toast.inner_text()
    page.screenshot(path=str(artifacts / f"inpaint_mode_switch_{page.viewport_size['width']}.png"))


def test_strokes_the_editor_streamed_to_the_server_keep_the_image_for_the_switch_and_the_job(page, artifacts):
    """Once strokes are drawn, gradio's editor may stream its images to the server and send only an id (here after
    an accordion opened below it); gradio's own reading takes the images out of its store on the first read, so
    the job's second read (its run, after its check) and a mode switch found no image: "Upload an image first",
    or a blank canvas after the switch (the CI failure of stop 39)."""
    inpaint = generate_and_send_to_inpaint(page)
    drag(page, inpaint, (0.3, 0.5), (0.7, 0.5))
    inpaint.locator("#inpaint-soft").get_by_text("Soft inpainting").first.click()  # the page re-renders: an id
    page.wait_for_timeout(1000)
    sent = []
    page.on("request", lambda request: sent.append(request.post_data or "") if "queue/join" in request.url else None)
    inpaint.get_by_label("Inpaint sketch").check()
    page.wait_for_function("() => document.querySelector('#inpaint-mode-help')?.textContent"
                           ".includes('Switching mode clears the strokes')")
    assert eventually(lambda: shows_the_sent_image(inpaint), page)
    assert any('{"id":' in body for body in sent), "the editor sent its files, not an id: this test tests nothing"
    inpaint.get_by_label("Inpaint", exact=True).check()
    assert eventually(lambda: shows_the_sent_image(inpaint), page)
    drag(page, inpaint, (0.3, 0.5), (0.7, 0.5))
    inpaint.locator("#inpaint-outpaint").get_by_text("Outpaint: extend the canvas").click()
    page.wait_for_timeout(1000)
    inpaint.get_by_role("button", name="Inpaint", exact=True).click()  # its check, then its run, read the id
    page.locator("#inpaint-gallery img[alt^='Seed ']").first.wait_for(timeout=60_000)


def in_view(page, locator) -> bool:
    box = locator.bounding_box()
    viewport = page.viewport_size
    return box is not None and box["y"] >= 0 and box["y"] + box["height"] <= viewport["height"]


@pytest.mark.parametrize("page", SIZES, ids=lambda size: f"{size[0]}x{size[1]}", indirect=True)
def test_the_inpaint_button_sits_on_top_of_the_results_and_stays_in_view(page, artifacts):
    page.get_by_role("tab", name="Inpaint").click()
    inpaint = page.locator("#inpaint-tab")
    button = inpaint.get_by_role("button", name="Inpaint", exact=True)
    gallery = page.locator("#inpaint-gallery")
    button.wait_for()
    assert in_view(page, button)
    assert button.bounding_box()["y"] < gallery.bounding_box()["y"]  # above the results
    assert abs(button.bounding_box()["x"] - gallery.bounding_box()["x"]) < 20  # in the results' column
    # the history too, under the results (gradio's wrapping column once put it in a clipped second column)
    history = page.locator("#inpaint-history-gallery")
    assert abs(history.bounding_box()["x"] - gallery.bounding_box()["x"]) < 40, history.bounding_box()
    # scrolled down to the last settings, the button and the results are still in view
    inpaint.get_by_label("number input for Clip skip").scroll_into_view_if_needed()
    page.wait_for_timeout(300)
    page.screenshot(path=str(artifacts / f"inpaint_scrolled_{page.viewport_size['width']}.png"))
    assert in_view(page, button)
    assert gallery.bounding_box()["y"] < page.viewport_size["height"]


@pytest.mark.parametrize("page", [(390, 844)], ids=["390x844"], indirect=True)  # a phone held upright
def test_in_a_narrow_window_the_editor_comes_first_and_the_button_stays_on_screen(page, artifacts):
    page.get_by_role("tab", name="Inpaint").click()
    inpaint = page.locator("#inpaint-tab")
    button = inpaint.get_by_role("button", name="Inpaint", exact=True)
    button.wait_for()
    editor, gallery = page.locator("#inpaint-editor"), page.locator("#inpaint-gallery")
    assert editor.bounding_box()["y"] < gallery.bounding_box()["y"]  # stacked: the editor first, results after
    page.screenshot(path=str(artifacts / "inpaint_narrow_top.png"))
    assert in_view(page, button)
    inpaint.get_by_label("number input for Clip skip").scroll_into_view_if_needed()
    assert in_view(page, button)
    # at the very bottom, the bar covers nothing of the tab
    page.mouse.wheel(0, 20_000)
    page.wait_for_timeout(300)
    page.screenshot(path=str(artifacts / "inpaint_narrow_bottom.png"))
    last = inpaint.locator("#inpaint-history-gallery")
    bar = page.locator("#inpaint-actions").bounding_box()
    assert last.bounding_box()["y"] + last.bounding_box()["height"] <= bar["y"]
    assert in_view(page, button)
    # a request that starts scrolls to the results, where its progress and image show
    page.mouse.wheel(0, -20_000)
    inpaint.get_by_label("Sketch to image").check()
    generate = inpaint.get_by_role("button", name="Generate", exact=True)
    generate.wait_for()
    drag(page, inpaint, (0.4, 0.35), (0.6, 0.5))  # on the paper (centred in the canvas), clear of the bar
    inpaint.get_by_label("Prompt", exact=True).fill("a red square on a white background")
    generate.click()
    page.locator("#inpaint-gallery img").first.wait_for(timeout=60_000)
    page.wait_for_timeout(500)
    page.screenshot(path=str(artifacts / "inpaint_narrow_result.png"))
    assert gallery.bounding_box()["y"] < page.viewport_size["height"] / 2
    page.get_by_role("tab", name="Text to image").click()
    assert not generate.is_visible()  # the bar belongs to the Inpaint tab
    # Text to image scrolls to its results too
    text_tab(page).get_by_label("Prompt", exact=True).fill("a large blue square on a yellow background")
    text_tab(page).get_by_role("button", name="Generate", exact=True).click()
    page.locator("#text-to-image-gallery img").first.wait_for(timeout=60_000)
    page.wait_for_timeout(500)
    results = page.locator("#text-to-image-gallery").bounding_box()
    assert -1 <= results["y"] < page.viewport_size["height"] / 2, results  # (a smooth scroll may end a subpixel past)


@pytest.mark.parametrize("page", SIZES, ids=lambda size: f"{size[0]}x{size[1]}", indirect=True)
def test_every_palette_colour_shows_on_the_palette(page, artifacts):
    """The white swatch was invisible on the white palette: each swatch must differ from what is around it."""
    page.get_by_role("tab", name="Inpaint").click()
    inpaint = page.locator("#inpaint-tab")
    inpaint.get_by_label("Sketch to image").check()
    page.wait_for_timeout(1500)
    inpaint.get_by_role("button", name="Brush").first.click()
    colour = page.locator("#inpaint-editor").get_by_label("Color")
    swatches = page.locator("#inpaint-editor button.color")
    if not swatches.first.is_visible():
        colour.first.click()
    swatches.first.wait_for()
    page.screenshot(path=str(artifacts / f"inpaint_palette_{page.viewport_size['width']}.png"))
    for index in range(swatches.count()):
        shot = np.asarray(Image.open(io.BytesIO(swatches.nth(index).screenshot())).convert("L"), dtype=np.int32)
        assert shot.max() - shot.min() > 20, f"swatch {index} cannot be told from the palette"
