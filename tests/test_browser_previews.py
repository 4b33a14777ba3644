"""Live previews in the page, in headless Chromium (a file of its own, so that pytest-xdist runs it beside the other
browser tests)."""

import hashlib

import pytest

from tests.test_browser import browser, page, text_tab  # noqa: F401 - the fixtures, and the tab's locator
from tests.test_browser_screen import set_number

pytestmark = pytest.mark.browser


def test_text_to_image_shows_the_image_forming_then_the_result(page, artifacts):
    """A 100-step image: at least 3 different previews ("Forming… Image 1/1, step n/100") show in the results,
    not hidden under the progress bar, before the image."""
    tab = text_tab(page)
    set_number(tab, "Steps", "100")
    tab.get_by_label("Prompt", exact=True).fill("a red circle on a blue background")
    tab.get_by_role("button", name="Generate", exact=True).click()
    gallery = page.locator("#text-to-image-gallery")
    seen: set[str] = set()
    for _ in range(400):  # up to 40 s
        image = gallery.locator("img").first
        if gallery.get_by_text("Forming…").count() and image.count():
            source = image.get_attribute("src") or ""
            if source:
                seen.add(hashlib.sha1(page.request.get(source).body()).hexdigest())
                if len(seen) == 2:
                    page.screenshot(path=str(artifacts / "text_to_image_forming.png"), full_page=True)
                    # the preview is on top: what is at its middle is the image, not gradio's progress overlay
                    box = image.bounding_box()
                    on_top = page.evaluate("([x, y]) => document.elementFromPoint(x, y)?.tagName",
                                           [box["x"] + box["width"] / 2, box["y"] + box["height"] / 2])
                    assert on_top == "IMG", on_top
        if gallery.locator("img[alt^='Seed ']").count():
            break
        page.wait_for_timeout(100)
    assert len(seen) >= 3, f"{len(seen)} distinct previews"
    gallery.locator("img[alt^='Seed ']").first.wait_for(timeout=60_000)
    assert gallery.get_by_text("Forming…").count() == 0
