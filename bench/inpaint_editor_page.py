"""What using the Inpaint editor costs the page afterwards: per image generated in Text to image, the browser's
main-thread busy time and the number of uploads, on a fresh page and again once the editor has been used (Send to
Inpaint, a brush stroke, Inpaint sketch and back, an Inpaint run). Prints both and the ratio after / fresh.

gradio 6.31 re-read an ImageEditor at every progress tick of any job once the editor had been an input or output
of a server event, uploading its image about 175 times per image and making the page's main thread 2.7x busier;
the app now avoids that, and this is how it is shown. Busy time is Chromium's own TaskDuration (CDP
Performance.getMetrics: the main thread's time in tasks) from Generate until the image's generation info has
arrived; uploads are POST /gradio_api/upload requests. The app runs offline on a free port, the page in headless
Chromium (/usr/bin/chromium) at 1440x1000; images are the embedded preset's defaults (64 px, 20 steps).

    python bench/inpaint_editor_page.py [--images 3]
    python bench/inpaint_editor_page.py --smoke  # 1 image on each page: the same code (the tests run it)
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from playwright.sync_api import sync_playwright

sys.path.insert(0, str(Path(__file__).resolve().parent))
from api_overhead import free_port, start_app  # noqa: E402

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"  # Debian's build, as the tests use
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]
VIEWPORT = {"width": 1440, "height": 1000}
# Consecutive images get different prompts, so each one's generation info is new text to wait for.
PROMPTS = ("a red circle on a blue background", "a yellow star on a white background",
           "a green square on a black background")
INPAINT_PROMPT = "a large yellow star on a blue background"
JOB_TIMEOUT_MS = 120_000
SETTLE_MS = 300  # after an image's info arrives: the job's last progress messages and their requests
GENERATION_DONE = """(prompt) => document.querySelector('#generation-info textarea')?.value.startsWith(prompt)
    && !document.querySelector('#text-to-image-gallery .progress-text, #text-to-image-gallery .eta-bar')"""


@dataclass(frozen=True)
class ImageCost:
    busy_s: float  # the browser's main thread, busy in tasks
    uploads: int  # POST /gradio_api/upload
    wall_s: float  # from Generate until the generation info arrived


class PageMeter:
    """The page's main-thread busy seconds so far (Chromium's TaskDuration, over CDP) and its uploads so far."""

    def __init__(self, page):
        self.cdp = page.context.new_cdp_session(page)
        self.cdp.send("Performance.enable")
        self.uploads = 0
        page.on("request", self._count_upload)

    def _count_upload(self, request) -> None:
        if request.method == "POST" and "/gradio_api/upload" in request.url:
            self.uploads += 1

    def busy_seconds(self) -> float:
        metrics = self.cdp.send("Performance.getMetrics")["metrics"]
        return next(metric["value"] for metric in metrics if metric["name"] == "TaskDuration")


def text_tab(page):
    return page.locator("#text-to-image-tab")


def generate_images(page, meter: PageMeter, prompts: list[str]) -> list[ImageCost]:
    """One Text to image generation per prompt (the form's defaults otherwise), each measured on its own."""
    tab, costs = text_tab(page), []
    for prompt in prompts:
        tab.get_by_label("Prompt", exact=True).fill(prompt)
        busy, uploads, began = meter.busy_seconds(), meter.uploads, time.monotonic()
        tab.get_by_role("button", name="Generate", exact=True).click()
        page.wait_for_function(GENERATION_DONE, arg=prompt, timeout=JOB_TIMEOUT_MS)
        wall = time.monotonic() - began
        page.wait_for_timeout(SETTLE_MS)
        costs.append(ImageCost(meter.busy_seconds() - busy, meter.uploads - uploads, wall))
    return costs


def brush_stroke(page, inpaint) -> None:
    """A horizontal stroke across the middle of the image (it sits centred in the editor's canvas), in few pointer
    moves: each move that paints kept headless Chromium's main thread busy for about a second on a busy 2-core
    machine."""
    inpaint.get_by_role("button", name="Brush").first.click()
    box = inpaint.locator("#inpaint-editor canvas").first.bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(x - 40, y)
    page.mouse.down()
    page.mouse.move(x + 40, y, steps=3)
    page.mouse.up()


def use_the_inpaint_editor(page) -> None:
    """Send the last image to Inpaint, paint a mask, switch to Inpaint sketch and back (a switch clears the strokes:
    paint the mask again), run Inpaint, then go back to Text to image."""
    text_tab(page).get_by_role("button", name="Send to Inpaint", exact=True).click()
    inpaint = page.locator("#inpaint-tab")
    inpaint.locator("#inpaint-editor canvas").first.wait_for(timeout=10_000)
    page.wait_for_timeout(1000)  # the image arrives in the editor
    brush_stroke(page, inpaint)
    inpaint.get_by_label("Inpaint sketch").check()
    page.wait_for_timeout(1000)
    inpaint.get_by_label("Inpaint", exact=True).check()
    page.wait_for_timeout(1000)
    brush_stroke(page, inpaint)
    inpaint.get_by_label("Prompt", exact=True).fill(INPAINT_PROMPT)
    inpaint.get_by_role("button", name="Inpaint", exact=True).click()
    result = page.locator("#inpaint-gallery img[alt^='Seed '], [data-testid='toast-text']").first
    result.wait_for(timeout=JOB_TIMEOUT_MS)
    if result.get_attribute("data-testid") == "toast-text":
        raise SystemExit(f"Inpaint did not run: {result.inner_text()}")
    page.get_by_role("tab", name="Text to image").click()
    text_tab(page).get_by_label("Prompt", exact=True).wait_for()


def describe(label: str, costs: list[ImageCost]) -> str:
    busy = ", ".join(f"{cost.busy_s:.2f}" for cost in costs)
    uploads = ", ".join(str(cost.uploads) for cost in costs)
    wall = ", ".join(f"{cost.wall_s:.1f}" for cost in costs)
    return (f"  {label:<25} main-thread busy per image {statistics.mean(c.busy_s for c in costs):.2f} s ({busy}); "
            f"uploads per image {statistics.mean(c.uploads for c in costs):.1f} ({uploads}); "
            f"seconds from Generate {wall}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=3, help="images generated on each page")
    parser.add_argument("--smoke", action="store_true", help="1 image on each page, to check that the script runs")
    args = parser.parse_args()
    if args.smoke:
        args.images = 1
    prompts = [PROMPTS[index % len(PROMPTS)] for index in range(2 * args.images)]

    port = free_port()
    app = start_app(port)
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport=VIEWPORT)
            meter = PageMeter(page)
            page.goto(f"http://127.0.0.1:{port}")
            text_tab(page).get_by_label("Prompt", exact=True).wait_for()
            fresh = generate_images(page, meter, prompts[:args.images])
            use_the_inpaint_editor(page)
            after = generate_images(page, meter, prompts[args.images:])
            browser.close()
    finally:
        app.terminate()
        app.wait(timeout=20)

    print(f"Text to image, {args.images} image(s) on each page (embedded preset's defaults), headless Chromium at "
          f"{VIEWPORT['width']}x{VIEWPORT['height']}:")
    print(describe("fresh page:", fresh))
    print(describe("after the Inpaint editor:", after))
    ratio = statistics.mean(c.busy_s for c in after) / statistics.mean(c.busy_s for c in fresh)
    print(f"ratio after / fresh, main-thread busy per image: {ratio:.2f}; uploads per image: fresh "
          f"{statistics.mean(c.uploads for c in fresh):.1f}, after {statistics.mean(c.uploads for c in after):.1f}")


if __name__ == "__main__":
    main()
