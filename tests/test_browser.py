"""The page in headless Chromium (Debian's /usr/bin/chromium): type a prompt, Generate, see an image; Stop."""

import re
import shutil

import playwright.sync_api as playwright  # in requirements.txt: a missing one is an error, not a skip
import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]
pytestmark = pytest.mark.browser

# The Arena leaderboard's battles (its sixth column) summed over its rows (gradio's virtual list).
TOTAL_BATTLES = """() => [...document.querySelectorAll('#arena-leaderboard [role=row].virtual-row')]
    .map(row => parseInt(row.querySelectorAll('[role=gridcell]')[5]?.innerText) || 0).reduce((a, b) => a + b, 0)"""


def text_tab(page):
    return page.locator("#text-to-image-tab")


@pytest.fixture(scope="module")
def browser():  # the `browser` marker (tests/system_tools.py) skips or fails the tests when Chromium is missing
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield browser
        browser.close()


def fresh_page(browser, app_url, artifacts, request, size):
    """A fresh page (its own gradio session) in a window of `size`; a screenshot of it if the test fails."""
    context = browser.new_context(viewport={"width": size[0], "height": size[1]})
    page = context.new_page()
    page.goto(app_url)
    text_tab(page).get_by_label("Prompt", exact=True).wait_for()
    yield page
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        page.screenshot(path=str(artifacts / f"failed-{request.node.name}.png"), full_page=True)
    context.close()


@pytest.fixture
def page(browser, app_url, artifacts, request):
    """A fresh page (a new gradio session) per test, so no test sees another's form, toasts or running batch."""
    yield from fresh_page(browser, app_url, artifacts, request, (1280, 1100))


def prompt_value_is(page, tab_id: str, text: str) -> None:
    """Waits until the first textarea of the tab (its prompt) holds `text`."""
    page.wait_for_function(
        "([tab, text]) => document.querySelector(`#${tab} textarea`)?.value === text", arg=[tab_id, text]
    )


def test_type_a_prompt_generate_and_see_an_image(page, artifacts):
    text_tab(page).get_by_label("Prompt", exact=True).fill("a red circle on a blue background")
    text_tab(page).get_by_role("button", name="Generate", exact=True).click()
    image = page.locator("#text-to-image-gallery img[alt^='Seed ']").first
    image.wait_for(timeout=60_000)
    assert image.evaluate("img => img.naturalWidth") == 64
    info = page.locator("#generation-info textarea").input_value()
    assert info.startswith("a red circle on a blue background\nSteps: 20")
    page.screenshot(path=str(artifacts / "text_to_image.png"), full_page=True)


def test_bad_settings_show_an_error_toast(page):
    text_tab(page).get_by_label("Prompt", exact=True).fill("")
    text_tab(page).get_by_role("button", name="Generate", exact=True).click()
    toast = page.get_by_test_id("toast-text").first
    toast.wait_for(timeout=10_000)
    assert "Enter a prompt" in toast.inner_text()


def test_stop_interrupts_a_long_batch(page, artifacts):
    text_tab(page).get_by_label("Prompt", exact=True).fill("a small green triangle on a white background")
    for label, value in (("Steps", "100"), ("Batch size", "8")):
        box = text_tab(page).get_by_label(f"number input for {label}")
        box.fill(value)
        box.press("Enter")
    text_tab(page).get_by_role("button", name="Generate", exact=True).click()
    # wait until the job is denoising (its progress names the image and step), not merely queued: a Stop
    # before the job starts rightly returns no image at all
    page.locator("#text-to-image-gallery").get_by_text("Image 1/8, step").first.wait_for(timeout=30_000)
    text_tab(page).get_by_role("button", name="Stop", exact=True).click()
    page.get_by_test_id("toast-text").filter(has_text="Stopped:").first.wait_for(timeout=30_000)
    seeds = page.locator("#text-to-image-gallery img[alt^='Seed ']")
    seeds.first.wait_for(timeout=10_000)  # the toast comes with the result; the gallery renders just after
    assert 1 <= seeds.count() < 8  # the finished images are kept, the rest were never started
    assert "unfinished (stopped at step" in seeds.last.get_attribute("alt")  # the cut-short one says so
    page.screenshot(path=str(artifacts / "text_to_image_stopped.png"), full_page=True)


def test_parameters_of_a_dropped_png_fill_the_form(page, tmp_path):
    from PIL import Image

    from studio.a1111.metadata import format_parameters, save_png

    text = format_parameters("a large yellow star", "blurry", steps=12, scheduler="DDIM", guidance_scale=5.5,
                             seed=777, width=96, height=64, model="embedded", model_hash=None, version="test")
    png = save_png(Image.new("RGB", (96, 64), "yellow"), tmp_path / "with-parameters.png", text)
    text_tab(page).get_by_text("Read parameters from a PNG").click()
    # The PNG input's own file input: the gallery of results has one too.
    page.locator("#png-parameters-input input[type=file]").set_input_files(str(png))
    text_tab(page).get_by_role("button", name="Send parameters to the form", exact=True).wait_for()
    page.wait_for_function(
        "() => [...document.querySelectorAll('#text-to-image-tab textarea')].some(t => t.value.includes('Seed: 777'))"
    )
    text_tab(page).get_by_role("button", name="Send parameters to the form", exact=True).click()
    prompt = text_tab(page).get_by_label("Prompt", exact=True)
    prompt_value_is(page, "text-to-image-tab", "a large yellow star")
    assert prompt.input_value() == "a large yellow star"
    assert text_tab(page).get_by_label("number input for Steps").input_value() == "12"
    assert text_tab(page).get_by_label("number input for Width").input_value() == "96"
    assert text_tab(page).get_by_label("Seed (-1 = random)").input_value() == "777"


def test_an_example_fills_the_form_and_the_image_shows_what_it_says(page, artifacts):
    import io

    from PIL import Image

    from studio.embedded import oracle

    steps = text_tab(page).get_by_label("number input for Steps")
    steps.fill("12")
    steps.press("Enter")
    text_tab(page).get_by_text("a red circle on a blue background", exact=True).first.click()
    prompt_value_is(page, "text-to-image-tab", "a red circle on a blue background")
    # The form is fitted to the example's preset: its default steps replace the 12 typed above.
    playwright.expect(text_tab(page).get_by_label("number input for Steps")).to_have_value("20", timeout=10_000)
    seed = text_tab(page).get_by_label("Seed (-1 = random)")
    seed.fill("3")
    seed.press("Enter")
    for label in ("Batch size",):
        box = text_tab(page).get_by_label(f"number input for {label}")
        box.fill("1")
        box.press("Enter")
    text_tab(page).get_by_role("button", name="Generate", exact=True).click()
    image = page.locator("#text-to-image-gallery img[alt='Seed 3']").first
    image.wait_for(timeout=60_000)
    png = page.request.get(image.get_attribute("src")).body()
    reading = oracle.read(Image.open(io.BytesIO(png)))
    page.screenshot(path=str(artifacts / "text_to_image_example.png"), full_page=True)
    assert (reading.colour, reading.shape, reading.background) == ("red", "circle", "blue"), reading


def stroke_and_inpaint(page, tab, points, prompt, artifacts, shot):
    """Drag the brush through `points` (fractions of the editor's canvas), inpaint with `prompt`, and return the
    result image as the server sent it."""
    import io

    from PIL import Image

    canvas = tab.locator("canvas").first
    tab.get_by_role("button", name="Brush").first.click()
    box = canvas.bounding_box()
    page.mouse.move(box["x"] + box["width"] * points[0][0], box["y"] + box["height"] * points[0][1])
    page.mouse.down()
    for x, y in points[1:]:
        page.mouse.move(box["x"] + box["width"] * x, box["y"] + box["height"] * y, steps=3)
    page.mouse.up()
    tab.get_by_label("Prompt", exact=True).fill(prompt)
    tab.get_by_role("button", name="Inpaint", exact=True).click()
    result = page.locator("#inpaint-gallery img[alt^='Seed ']").first
    result.wait_for(timeout=60_000)
    page.screenshot(path=str(artifacts / shot), full_page=True)
    return Image.open(io.BytesIO(page.request.get(result.get_attribute("src")).body())).convert("RGB")


def upload_to_inpaint(page, path):
    page.get_by_role("tab", name="Inpaint").click()
    tab = page.locator("#inpaint-tab")
    tab.get_by_role("button", name="Brush").first.wait_for()  # the editor is mounted: an upload now sets its size
    page.wait_for_timeout(500)
    page.locator("#inpaint-editor input[type=file]").first.set_input_files(str(path))
    tab.locator("canvas").first.wait_for()
    # the brush, blur and padding are fitted to the image once it is in: wait for that (a brush update resets the
    # editor's tool, so a stroke begun before it lands would be lost)
    from PIL import Image

    from studio.tasks.inpainting import mask_tools_for

    with Image.open(path) as image:
        padding = str(mask_tools_for(image.size).padding)
    page.wait_for_function("(value) => [...document.querySelectorAll('#inpaint-tab input[type=number]')]"
                           ".some(input => input.closest('.block')?.textContent.includes('Padding around the mask')"
                           " && input.value === value)", arg=padding)
    page.wait_for_timeout(500)  # the editor draws the upload, then accepts strokes
    return tab


def test_upload_paint_a_stroke_inpaint_and_far_pixels_are_unchanged(page, artifacts, tmp_path):

    import numpy as np

    from studio.embedded import scenes

    scene = scenes.Scene("blue", (scenes.Shape("circle", "red", "left", "large"),))
    source = scenes.render(scene, 256)
    source.save(tmp_path / "photo.png")
    tab = upload_to_inpaint(page, tmp_path / "photo.png")
    # a vertical stroke on the right, away from the circle on the left
    out = stroke_and_inpaint(page, tab, [(0.72, 0.3 + 0.04 * step) for step in range(11)],
                             "a large yellow star on a blue background", artifacts, "inpaint.png")
    assert out.size == (256, 256)
    left = np.s_[:, : int(256 * 0.5)]  # far from the stroke
    assert np.array_equal(np.asarray(out)[left], np.asarray(source)[left])
    assert not np.array_equal(np.asarray(out), np.asarray(source))  # the stroke's area was repainted


@pytest.mark.parametrize("width", [1280, 1920])
def test_a_single_result_is_shown_whole_at_any_window_size(browser, app_url, artifacts, width):
    """A 64 px result used to be drawn 636-986 px square in a 520 px gallery: its bottom was cut off (a triangle at
    the bottom right was not seen at all). The image must fit inside the gallery."""
    context = browser.new_context(viewport={"width": width, "height": 1000})
    page = context.new_page()
    try:
        page.goto(app_url)
        text_tab(page).get_by_label("Prompt", exact=True).fill("a small yellow triangle at the bottom right on a "
                                                               "black background")
        text_tab(page).get_by_label("Seed (-1 = random)").fill("4038314524")
        text_tab(page).get_by_role("button", name="Generate", exact=True).click()
        image = page.locator("#text-to-image-gallery img[alt^='Seed ']").first
        image.wait_for(timeout=60_000)
        page.wait_for_timeout(500)  # let the gallery lay out
        gallery = page.locator("#text-to-image-gallery").bounding_box()
        box = image.bounding_box()
        assert box["y"] >= gallery["y"] and box["y"] + box["height"] <= gallery["y"] + gallery["height"]
        assert box["height"] >= 0.8 * gallery["height"]  # whole, and still large
        page.locator("#text-to-image-gallery").screenshot(path=str(artifacts / f"single_result_{width}.png"))
    finally:
        context.close()


def test_send_to_inpaint_says_what_to_do_first_then_carries_the_image_and_prompt(page, artifacts):
    text_tab(page).get_by_role("button", name="Send to Inpaint", exact=True).click()
    toast = page.get_by_test_id("toast-text").filter(has_text="Generate an image first").first
    toast.wait_for(timeout=10_000)  # it used to do nothing at all
    prompt = "a large purple ring in the center on a yellow background"
    text_tab(page).get_by_label("Prompt", exact=True).fill(prompt)
    text_tab(page).get_by_label("Negative prompt", exact=True).fill("blurry")
    text_tab(page).get_by_role("button", name="Generate", exact=True).click()
    page.locator("#text-to-image-gallery img[alt^='Seed ']").first.wait_for(timeout=60_000)
    text_tab(page).get_by_role("button", name="Send to Inpaint", exact=True).click()
    prompt_value_is(page, "inpaint-tab", prompt)
    inpaint = page.locator("#inpaint-tab")
    assert inpaint.get_by_label("Negative prompt", exact=True).input_value() == "blurry"
    page.locator("#inpaint-editor canvas").first.wait_for(timeout=10_000)
    page.screenshot(path=str(artifacts / "sent_to_inpaint.png"), full_page=True)


def test_on_a_small_image_one_stroke_masks_a_small_part_and_blur_and_padding_shrink(page, artifacts, tmp_path):
    """gradio's brush is 25 px whatever the image: one short stroke masked half of a 64 px image."""

    import numpy as np

    from studio.embedded import scenes

    source = scenes.render(scenes.Scene("blue", (scenes.Shape("circle", "red", "left", "large"),)), 64)
    source.save(tmp_path / "small.png")
    tab = upload_to_inpaint(page, tmp_path / "small.png")
    assert tab.get_by_label("Mask blur, pixels").first.input_value() == "1"  # A1111's 4 is for 512 px
    assert tab.get_by_label("Padding around the mask (Only masked), pixels").first.input_value() == "4"
    # a short horizontal stroke through the middle of the image (which sits centred in the canvas)
    out = np.asarray(stroke_and_inpaint(page, tab, [(0.45, 0.5), (0.55, 0.5)], "a small yellow star on a blue "
                                        "background", artifacts, "inpaint_small_image_brush.png"))
    changed = np.any(out != np.asarray(source), axis=-1).mean()
    assert 0 < changed < 0.25, changed  # it was about half the image


def test_the_embedded_model_names_the_words_it_does_not_know_as_you_type(page, artifacts):
    text_tab(page).get_by_label("Prompt", exact=True).fill("a photo of a dog on a grey background")
    note = page.locator("#text-to-image-tab .prompt-hint.prose")
    note.filter(has_text="“dog”").wait_for(timeout=10_000)
    text = note.inner_text()
    assert "“photo”" in text and "“grey”" not in text and "backgrounds: white, black, gray, grey" in text
    page.screenshot(path=str(artifacts / "unknown_words.png"))


def test_sketch_to_image_has_its_own_placeholder_and_readable_help(page, artifacts):
    page.get_by_role("tab", name="Inpaint").click()
    tab = page.locator("#inpaint-tab")
    tab.get_by_label("Sketch to image").check()
    page.wait_for_function("() => document.querySelector('#inpaint-prompt textarea')?.placeholder"
                           ".startsWith('what the drawing shows')")
    help_text = page.locator("#inpaint-mode-help")
    assert "blank canvas" in help_text.inner_text()
    size = float(help_text.evaluate("e => parseFloat(getComputedStyle(e.querySelector('p') || e).fontSize)"))
    prompt_size = float(tab.get_by_label("Prompt", exact=True).evaluate("e => parseFloat(getComputedStyle(e).fontSize)"))
    assert size >= prompt_size - 1, (size, prompt_size)  # not the tiny grey info line it was
    page.screenshot(path=str(artifacts / "sketch_to_image_mode.png"))


def test_one_progress_bar_empty_galleries_are_not_uploads_and_the_preset_sits_under_the_prompt(page, artifacts):
    assert page.get_by_text("Drop Media Here").count() == 0
    # the preset picker follows the prompt in both tabs
    for tab_id in ("text-to-image-tab", "inpaint-tab"):
        if tab_id == "inpaint-tab":
            page.get_by_role("tab", name="Inpaint").click()
        tab = page.locator(f"#{tab_id}")
        prompt = tab.get_by_label("Prompt", exact=True).bounding_box()
        preset = tab.get_by_label("Model preset").bounding_box()
        assert preset["y"] > prompt["y"] and abs(preset["x"] - prompt["x"]) < 40, (tab_id, prompt, preset)
    page.get_by_role("tab", name="Text to image").click()
    text_tab(page).get_by_label("Prompt", exact=True).fill("a red circle on a blue background")
    text_tab(page).get_by_label("Batch size").first.fill("8")
    text_tab(page).get_by_label("Steps").first.fill("100")
    text_tab(page).get_by_role("button", name="Generate", exact=True).click()
    page.locator("#text-to-image-tab .progress-text, #text-to-image-tab .eta-bar").first.wait_for(timeout=30_000)
    # the bar shows until the first live preview, whose caption then says the step: at most one bar at any time
    most = 0
    for _ in range(100):
        most = max(most, page.locator("#text-to-image-tab .progress-text:visible").count())
        if most == 1 and not (artifacts / "one_progress_bar.png").exists():
            page.screenshot(path=str(artifacts / "one_progress_bar.png"))
        if page.locator("#text-to-image-gallery").get_by_text("Forming…").count():
            break
        page.wait_for_timeout(50)
    page.locator("#text-to-image-gallery").get_by_text("Forming… Image 1/8, step").first.wait_for(timeout=30_000)
    text_tab(page).get_by_role("button", name="Stop", exact=True).click()
    assert most <= 1, most  # (one showed: waited for above)


def test_history_shows_the_sessions_images_and_a_click_loads_the_settings(page, artifacts):
    prompts = ["a red circle on a blue background", "a large yellow star at the top left on a black background"]
    for index, prompt in enumerate(prompts):
        text_tab(page).get_by_label("Prompt", exact=True).fill(prompt)
        text_tab(page).get_by_role("button", name="Generate", exact=True).click()
        page.locator("#history-gallery img").nth(index).wait_for(timeout=60_000)
    thumbnails = page.locator("#history-gallery button.thumbnail-item")
    assert thumbnails.count() == 2
    for index in range(2):  # small, equal thumbnails
        box = thumbnails.nth(index).bounding_box()
        assert 60 <= box["width"] <= 160 and 60 <= box["height"] <= 160, box
    page.locator("#history-gallery").screenshot(path=str(artifacts / "history.png"))
    thumbnails.nth(1).click()  # the older one
    prompt_value_is(page, "text-to-image-tab", prompts[0])


def test_upload_upscale_and_see_the_before_after_slider(page, artifacts, tmp_path):
    from PIL import Image, ImageDraw

    source = Image.new("RGB", (48, 40), (40, 90, 200))
    ImageDraw.Draw(source).ellipse((8, 6, 36, 34), fill=(240, 200, 30))
    source.save(tmp_path / "small.png")
    page.get_by_role("tab", name="Upscale").click()
    tab = page.locator("#upscale-tab")
    tab.get_by_label("Upscaler").wait_for()
    # no face restorer's files on this machine: the option is not shown at all
    assert not tab.get_by_label("Face restoration").is_visible() and not page.locator("#face-restoration").is_visible()
    page.locator("#upscale-input input[type=file]").first.set_input_files(str(tmp_path / "small.png"))
    page.locator("#upscale-input img").first.wait_for(timeout=10_000)
    tab.get_by_role("button", name="Upscale", exact=True).click()
    after = page.locator("#upscale-slider img").nth(1)
    after.wait_for(timeout=60_000)
    sizes = page.locator("#upscale-slider img").evaluate_all("imgs => imgs.map(img => [img.naturalWidth, img.naturalHeight])")
    assert sizes == [[192, 160], [192, 160]]  # before (drawn at the result's size) and after, ×4
    box = page.locator("#upscale-slider").bounding_box()
    assert box["width"] > 300 and box["height"] > 200  # shown large, not a thumbnail
    page.locator("#upscale-file a").first.wait_for(timeout=10_000)
    assert "upscaled\n.png" in page.locator("#upscale-file").inner_text()  # the PNG to download (name, extension)
    page.screenshot(path=str(artifacts / "upscale_slider.png"), full_page=True)


def test_send_to_upscale_carries_the_generated_image(page, artifacts):
    text_tab(page).get_by_role("button", name="Send to Upscale", exact=True).click()
    page.get_by_test_id("toast-text").filter(has_text="There is no result to send yet").first.wait_for(timeout=10_000)
    text_tab(page).get_by_label("Prompt", exact=True).fill("a large yellow star in the center on a blue background")
    text_tab(page).get_by_role("button", name="Generate", exact=True).click()
    page.locator("#text-to-image-gallery img[alt^='Seed ']").first.wait_for(timeout=60_000)
    text_tab(page).get_by_role("button", name="Send to Upscale", exact=True).click()
    sent = page.locator("#upscale-input img").first
    sent.wait_for(timeout=10_000)
    assert sent.evaluate("img => img.naturalWidth") == 64
    page.locator("#upscale-tab").get_by_role("button", name="Upscale", exact=True).click()
    page.locator("#upscale-slider img").nth(1).wait_for(timeout=60_000)
    page.screenshot(path=str(artifacts / "sent_to_upscale.png"), full_page=True)


def test_hires_fix_shows_its_settings_and_makes_the_larger_image(page, artifacts):
    settings = page.locator("#hires-settings").first
    assert not settings.is_visible()  # off by default, its settings out of the way
    text_tab(page).get_by_label("Hires. fix").check()
    settings.wait_for()
    note = page.locator("#hires-size-note")
    assert "Generates 64×64, then upscales to 128×128" in note.inner_text()
    # hires steps go as far as the preset's steps do (the embedded model's 100, not the server's 150)
    assert text_tab(page).get_by_label("number input for Hires steps").get_attribute("max") == "100"
    box = text_tab(page).get_by_label("number input for Upscale by")
    box.fill("1.5")
    box.press("Enter")
    page.locator("#hires-size-note").get_by_text("upscales to 96×96").wait_for()
    box.fill("2")
    box.press("Enter")
    text_tab(page).get_by_label("Prompt", exact=True).fill("a large red circle in the center on a blue background")
    text_tab(page).get_by_role("button", name="Generate", exact=True).click()
    image = page.locator("#text-to-image-gallery img[alt^='Seed ']").first
    image.wait_for(timeout=60_000)
    image.evaluate("img => img.decode()")  # loaded, not only in the page (a busy machine is slower)
    assert image.evaluate("img => img.naturalWidth") == 128
    info = page.locator("#generation-info textarea").input_value()
    assert "Size: 64x64" in info and "Hires upscale: 2, Hires upscaler: Latent" in info
    page.screenshot(path=str(artifacts / "hires_fix.png"), full_page=True)


def test_a_png_with_hires_fields_switches_hires_fix_on(page, tmp_path):
    from PIL import Image

    from studio.a1111.metadata import save_png

    text = ("a large yellow star\nSteps: 12, Sampler: Euler, CFG scale: 5, Seed: 9, Size: 64x64, Model: embedded, "
            "Denoising strength: 0.4, Hires upscale: 1.5, Hires steps: 10, Hires upscaler: Lanczos, Version: test")
    png = save_png(Image.new("RGB", (96, 96), "yellow"), tmp_path / "hires.png", text)
    text_tab(page).get_by_text("Read parameters from a PNG").click()
    page.locator("#png-parameters-input input[type=file]").set_input_files(str(png))
    page.wait_for_function(
        "() => [...document.querySelectorAll('#text-to-image-tab textarea')].some(t => t.value.includes('Seed: 9'))"
    )
    text_tab(page).get_by_role("button", name="Send parameters to the form", exact=True).click()
    page.locator("#hires-settings").first.wait_for()
    assert text_tab(page).get_by_label("Hires. fix").is_checked()
    assert text_tab(page).get_by_label("number input for Upscale by").input_value() == "1.5"
    assert text_tab(page).get_by_label("number input for Hires steps").input_value() == "10"
    assert text_tab(page).get_by_label("number input for Denoising strength").input_value() == "0.4"
    assert "Lanczos" in page.locator("#hires-settings input").first.input_value()


def test_compare_a_2x2_grid_then_two_cells_on_the_slider(page, artifacts):
    page.get_by_role("tab", name="Compare").click()
    tab = page.locator("#compare-tab")
    tab.get_by_label("Prompt", exact=True).fill("a large yellow star in the center on a blue background")
    tab.get_by_label("Y values").fill("6, 12")
    page.locator("#compare-cell-count").get_by_text("4 cells (2 × 2)").wait_for()
    # said as you type, for the last keystroke (the count's answers, queued, always end with the last value's)
    tab.get_by_label("X values").fill("Euler, No")
    tab.get_by_label("X values").press_sequentially("pe", delay=20)
    page.locator("#compare-cell-count").get_by_text("Sampler: unknown value 'Nope'").wait_for(timeout=15_000)
    tab.get_by_label("X values").fill("Euler, DDIM")
    tab.get_by_role("button", name="Compare", exact=True).click()
    # the table comes with the result (the grid shows the cells forming before it)
    page.locator("#compare-table").get_by_text("Sampler: DDIM, Steps: 12").wait_for(timeout=90_000)
    grid = page.locator("#compare-grid img").first
    grid.wait_for(timeout=10_000)
    # shown before its file has loaded (naturalWidth 0 for a moment on a busy machine): its size once it has
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=grid.element_handle(), timeout=30_000)
    assert grid.evaluate("img => img.naturalWidth") > 256
    box = grid.bounding_box()
    assert box["width"] > 300 and box["height"] > 250  # shown large enough to read its labels
    assert "CLIP score (embedded CLIP, offline)" in page.locator("#compare-table").inner_text()
    # the whole grid is seen, caption included: not cropped by the gallery's square thumbnail
    fit, image_box, gallery_box = grid.evaluate(
        "img => [getComputedStyle(img).objectFit, img.getBoundingClientRect().toJSON(),"
        " document.querySelector('#compare-grid').getBoundingClientRect().toJSON()]")
    assert fit == "contain" and image_box["bottom"] <= gallery_box["bottom"] + 1, (fit, image_box, gallery_box)
    thumbnails = page.locator("#compare-cells .thumbnail-item")
    thumbnails.nth(3).wait_for()
    thumbnails.nth(0).click()
    thumbnails.nth(3).click()
    page.locator("#compare-slider img").nth(1).wait_for(timeout=10_000)
    label = page.locator("#compare-slider").get_by_text("Left: Sampler: Euler, Steps: 6 · right: Sampler: DDIM, Steps: 12")
    label.wait_for()
    thumbnails.nth(3).click()  # the cell just clicked, again: it is not paired with itself
    page.wait_for_timeout(1000)
    assert label.is_visible()
    assert "Left: Sampler: DDIM, Steps: 12 · right: Sampler: DDIM, Steps: 12" not in page.locator("#compare-slider").inner_text()
    page.screenshot(path=str(artifacts / "compare.png"), full_page=True)


def test_arena_battle_vote_reveal_and_the_leaderboard_updates(page, artifacts):
    page.get_by_role("tab", name="Arena").click()
    tab = page.locator("#arena-tab")
    tab.get_by_role("button", name="Random prompt").click()
    playwright.expect(tab.get_by_label("Prompt", exact=True)).not_to_have_value("", timeout=10_000)  # an example
    left_better = tab.get_by_role("button", name="Left is better")
    assert left_better.is_disabled()  # nothing to vote on yet
    tab.get_by_role("button", name="New battle").click()
    page.locator("#arena-left img").wait_for(timeout=90_000)
    page.locator("#arena-right img").wait_for()
    page.locator("#arena-reveal").get_by_text("Which is better?").wait_for()
    assert "embedded-" not in page.locator("#arena-reveal").inner_text()  # the names stay hidden
    # A worker's app serves its other browser tests too, which may have voted already: this vote is two more battles
    # on the board and one more decided battle in the CLIP note
    battles_before = page.evaluate(TOTAL_BATTLES)
    decided = re.search(r"in \d+ of (\d+) battles people decided", page.locator("#arena-tab").inner_text())
    decided_before = int(decided.group(1)) if decided else 0
    left_better.click()
    page.locator("#arena-reveal").get_by_text("Vote recorded (left)").wait_for(timeout=30_000)
    revealed = page.locator("#arena-reveal").inner_text()
    assert "Left: embedded-" in revealed and "Right: embedded-" in revealed
    page.wait_for_function(f"() => ({TOTAL_BATTLES})() >= {battles_before + 2}", timeout=30_000)
    page.get_by_text(re.compile(rf"in \d+ of {decided_before + 1} battles people decided")).wait_for()
    assert left_better.is_disabled()  # one vote per battle
    image_box = page.locator("#arena-left img").bounding_box()
    assert image_box["width"] >= 250, image_box  # the 64 px image shown large, not as a thumbnail
    page.screenshot(path=str(artifacts / "arena.png"), full_page=True)


def test_the_lora_picker_writes_the_tag_and_the_image_records_its_hash(page, artifacts):
    tab = text_tab(page)
    tab.get_by_label("Prompt", exact=True).fill("a red hexagon on a blue background")
    note = page.locator("#text-to-image-tab .prompt-hint.prose")
    note.filter(has_text="“hexagon”").wait_for(timeout=10_000)  # unknown to the embedded model alone
    tab.get_by_text("LoRA add-ons").click()
    # the LoRA made for SD 2 ("another-family", first by name) and the Hub ones for SD 1.5 and SDXL are not offered
    # for the embedded preset (the tag below would name the first LoRA offered)
    tab.get_by_text("4 more for other model families.").wait_for(timeout=10_000)
    tab.get_by_role("button", name="Add to prompt").click()
    prompt_value_is(page, "text-to-image-tab", "a red hexagon on a blue background <lora:test-shapes:1>")
    # the test LoRA says it teaches "hexagon": the embedded model's note does not call it unknown while the tag is there
    note.filter(has_text="This model knows").filter(has_not_text="“hexagon”").wait_for(timeout=10_000)
    tab.get_by_role("button", name="Generate", exact=True).click()
    page.locator("#text-to-image-gallery img[alt^='Seed ']").first.wait_for(timeout=60_000)
    info = page.locator("#generation-info textarea").input_value()
    assert info.startswith("a red hexagon on a blue background <lora:test-shapes:1>\n")
    assert 'Lora hashes: "test-shapes: ' in info
    page.screenshot(path=str(artifacts / "lora_picker.png"), full_page=True)
