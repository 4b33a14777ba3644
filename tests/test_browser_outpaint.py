"""Outpainting and soft inpainting in headless Chromium: extend an image to the right and see the larger result;
soft inpainting on, and its settings in the result's info."""

import pytest
from test_browser import browser, fresh_page  # noqa: F401 - the module's browser fixture
from test_browser_inpaint_editor import drag, generate_and_send_to_inpaint

pytestmark = pytest.mark.browser


@pytest.fixture
def page(browser, app_url, artifacts, request):  # noqa: F811
    yield from fresh_page(browser, app_url, artifacts, request, (1440, 1000))


def open_outpaint(inpaint):
    inpaint.locator("#inpaint-outpaint").get_by_text("Outpaint: extend the canvas").click()
    inpaint.locator("#outpaint-right input").wait_for()


def type_number(page, box, value: str) -> None:
    """A number typed into `box` and kept: on a busy machine the accordion's content can still be settling when
    the first keys arrive, so it is typed again until the box holds it."""
    for _ in range(5):
        box.fill(value)
        box.press("Tab")
        page.wait_for_timeout(300)
        if box.input_value() == value:
            return
    raise AssertionError(f"the box did not keep {value!r}: {box.input_value()!r}")


def result_size(page) -> tuple[int, int]:
    """The first result's own size (its pixels, not as shown)."""
    image = page.locator("#inpaint-gallery img[alt^='Seed ']").first
    image.wait_for(timeout=60_000)
    page.wait_for_function("() => document.querySelector(\"#inpaint-gallery img[alt^='Seed ']\")?.naturalWidth > 0")
    return tuple(image.evaluate("(img) => [img.naturalWidth, img.naturalHeight]"))


def test_extend_right_by_32_pixels_gives_the_larger_image_without_painting_a_mask(page, artifacts):
    inpaint = generate_and_send_to_inpaint(page)  # the text-to-image result, 64×64
    open_outpaint(inpaint)
    type_number(page, inpaint.locator("#outpaint-right input"), "32")
    inpaint.get_by_role("button", name="Inpaint", exact=True).click()  # no stroke painted: the new area is the mask
    assert result_size(page) == (96, 64)
    info = page.locator("#inpaint-generation-info textarea")
    page.wait_for_function("() => document.querySelector('#inpaint-generation-info textarea')?.value"
                           ".includes('Outpaint: right 32')")
    assert "Outpaint fill: Blur" in info.input_value()
    page.screenshot(path=str(artifacts / "outpaint_right_32.png"))


def test_soft_inpainting_on_is_run_and_recorded(page, artifacts):
    inpaint = generate_and_send_to_inpaint(page)
    drag(page, inpaint, (0.3, 0.5), (0.7, 0.5))
    inpaint.locator("#inpaint-soft").get_by_text("Soft inpainting").first.click()
    inpaint.locator("#soft-inpainting").get_by_label("Soft inpainting").check()
    inpaint.get_by_label("Prompt", exact=True).fill("a large yellow star on a blue background")
    inpaint.get_by_role("button", name="Inpaint", exact=True).click()
    assert result_size(page) == (64, 64)
    page.wait_for_function("() => document.querySelector('#inpaint-generation-info textarea')?.value"
                           ".includes('Soft inpainting enabled: True')", timeout=60_000)
    page.screenshot(path=str(artifacts / "soft_inpainting.png"))


@pytest.mark.parametrize("size", [(1440, 1000), (1920, 1080)], ids=["1440x1000", "1920x1080"])
def test_a_mockup_places_the_image_on_a_canvas_and_the_result_becomes_the_image(browser, app_url, artifacts, request,  # noqa: F811
                                                                                 size):
    page = next(fresh_page(browser, app_url, artifacts, request, size))
    inpaint = generate_and_send_to_inpaint(page)
    open_outpaint(inpaint)
    for name, value in (("canvas-width", "128"), ("canvas-height", "96"), ("x", "40"), ("y", "8")):
        type_number(page, inpaint.locator(f"#outpaint-{name} input"), value)
    inpaint.locator("#outpaint-place").click()
    sides = {side: inpaint.locator(f"#outpaint-{side} input") for side in ("left", "right", "top", "bottom")}
    page.wait_for_function("() => document.querySelector('#outpaint-left input')?.value === '40'")
    assert {side: box.input_value() for side, box in sides.items()} == {"left": "40", "right": "24", "top": "8",
                                                                       "bottom": "24"}
    inpaint.get_by_role("button", name="Inpaint", exact=True).click()
    assert result_size(page) == (128, 96)
    page.screenshot(path=str(artifacts / f"outpaint_mockup_{size[0]}.png"))
    inpaint.locator("#inpaint-use-result").click()  # outpaint again from the result: it is the image now
    page.wait_for_function("() => document.querySelector('#outpaint-left input')?.value === '0'")
    assert all(box.input_value() == "0" for box in sides.values())
    type_number(page, inpaint.locator("#outpaint-x input"), "1")
    inpaint.locator("#outpaint-place").click()  # the image, now 128 wide (64 before), does not fit at x 1 on 128 px
    toast = page.get_by_test_id("toast-text").first
    toast.wait_for(timeout=10_000)
    assert "does not fit on a 128×96 canvas" in toast.inner_text()
