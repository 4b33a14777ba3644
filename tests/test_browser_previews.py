"""Live previews in the page, in headless Chromium (a file of its own, so that pytest-xdist runs it beside the other
browser tests)."""

import hashlib

import pytest

from tests.test_browser import browser, page, text_tab  # noqa: F401 - the fixtures, and the tab's locator
from tests.test_browser_screen import set_number

pytestmark = pytest.mark.browser


def watch_previews(page, gallery_id: str, artifacts, shot: str, done=None, seconds: float = 40) -> dict[str, bytes]:
    """The distinct "Forming…" images the gallery `gallery_id` shows until its result is in (the locator `done`,
    by default a "Seed …" image in the gallery), by hash; the second checked to be on top (not under gradio's
    progress overlay), and screenshot."""
    gallery = page.locator(f"#{gallery_id}")
    done = done or gallery.locator("img[alt^='Seed ']")
    seen: dict[str, bytes] = {}
    for _ in range(int(seconds * 10)):
        image = gallery.locator("img").first
        if gallery.get_by_text("Forming…").count() and image.count():
            source = image.get_attribute("src") or ""
            if source:
                body = page.request.get(source).body()
                seen.setdefault(hashlib.sha1(body).hexdigest(), body)
                if len(seen) == 2:
                    page.screenshot(path=str(artifacts / shot), full_page=True)
                    # the preview is on top: what is at its middle is the image, not gradio's progress overlay
                    box = image.bounding_box()
                    on_top = page.evaluate("([x, y]) => document.elementFromPoint(x, y)?.tagName",
                                           [box["x"] + box["width"] / 2, box["y"] + box["height"] / 2])
                    assert on_top == "IMG", on_top
        if done.count():
            break
        page.wait_for_timeout(100)
    done.first.wait_for(timeout=60_000)
    assert gallery.get_by_text("Forming…").count() == 0
    return seen


def test_text_to_image_shows_the_image_forming_then_the_result(page, artifacts):
    """A 100-step image: at least 3 different previews ("Forming… Image 1/1, step n/100") show in the results,
    not hidden under the progress bar, before the image. Every 10 steps: how many Auto makes depends on what a
    preview costs on the machine at the time (tests/test_previews.py tests Auto on a clock of its own); a busy
    machine once made it two."""
    tab = text_tab(page)
    set_number(tab, "Steps", "100")
    set_number(tab, "Preview every N steps", "10")
    tab.get_by_label("Prompt", exact=True).fill("a red circle on a blue background")
    tab.get_by_role("button", name="Generate", exact=True).click()
    seen = watch_previews(page, "text-to-image-gallery", artifacts, "text_to_image_forming.png")
    assert len(seen) >= 3, f"{len(seen)} distinct previews"


def test_inpaint_shows_the_edit_forming_in_the_picture(page, artifacts, tmp_path):
    """A 100-step inpaint: at least 3 different previews, each the whole picture with the edit forming where the
    stroke is (its far side the picture's own pixels), then the result."""
    import io

    import numpy as np
    from PIL import Image

    from studio.embedded import scenes
    from tests.test_browser import upload_to_inpaint

    source = scenes.render(scenes.Scene("blue", (scenes.Shape("circle", "red", "left", "large"),)), 256)
    source.save(tmp_path / "photo.png")
    tab = upload_to_inpaint(page, tmp_path / "photo.png")
    canvas = tab.locator("canvas").first
    tab.get_by_role("button", name="Brush").first.click()
    box = canvas.bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.72, box["y"] + box["height"] * 0.3)
    page.mouse.down()
    for step in range(11):
        page.mouse.move(box["x"] + box["width"] * 0.72, box["y"] + box["height"] * (0.3 + 0.04 * step), steps=3)
    page.mouse.up()
    set_number(tab, "Steps", "100")
    # a preview every 10 steps, not Auto's (a few, when the machine is busy): each shows for as long as 10 steps take
    set_number(tab, "Preview every N steps", "10")
    tab.get_by_label("Prompt", exact=True).fill("a large yellow star on a blue background")
    tab.get_by_role("button", name="Inpaint", exact=True).click()
    seen = watch_previews(page, "inpaint-gallery", artifacts, "inpaint_forming.png")
    assert len(seen) >= 3, f"{len(seen)} distinct previews"
    left = np.s_[:, :128]  # far from the stroke
    for body in seen.values():
        shown = np.asarray(Image.open(io.BytesIO(body)).convert("RGB"))
        assert shown.shape == (256, 256, 3) and np.array_equal(shown[left], np.asarray(source)[left])


def test_compare_shows_the_grid_filling_in(page, artifacts):
    """Two 100-step cells: at least 3 different forming grids (the running cell's preview in its place, under the
    headers), then the grid."""
    from PIL import Image

    page.get_by_role("tab", name="Compare").click()
    tab = page.locator("#compare-tab")
    tab.get_by_label("Prompt", exact=True).fill("a large yellow star in the center on a blue background")
    tab.get_by_label("Y values").fill("100")
    page.locator("#compare-cell-count").get_by_text("2 cells (2 × 1)").wait_for()
    tab.get_by_role("button", name="Compare", exact=True).click()
    seen = watch_previews(page, "compare-grid", artifacts, "compare_forming.png",
                          done=page.locator("#compare-table").get_by_text("Sampler: DDIM, Steps: 100"), seconds=60)
    assert len(seen) >= 3, f"{len(seen)} distinct previews"
    import io

    for body in seen.values():
        with Image.open(io.BytesIO(body)) as grid:
            assert grid.width > grid.height  # two cells side by side under their headers
