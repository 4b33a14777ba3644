"""The page in headless Chromium (Debian's /usr/bin/chromium): type a prompt, Generate, see an image; Stop."""

import shutil

import pytest

playwright = pytest.importorskip("playwright.sync_api")

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]
pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def page(app_url):
    if not shutil.which("chromium"):
        pytest.fail("Debian chromium is not installed (apt-get install -y chromium); .ci/run installs it")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1100})
        page.goto(app_url)
        page.get_by_label("Prompt", exact=True).wait_for()
        yield page
        browser.close()


def test_type_a_prompt_generate_and_see_an_image(page, artifacts):
    page.get_by_label("Prompt", exact=True).fill("a red circle on a blue background")
    page.get_by_role("button", name="Generate", exact=True).click()
    image = page.locator("#text-to-image-gallery img[alt^='Seed ']").first
    image.wait_for(timeout=60_000)
    assert image.evaluate("img => img.naturalWidth") == 64
    info = page.locator("#generation-info textarea").input_value()
    assert info.startswith("a red circle on a blue background\nSteps: 20")
    page.screenshot(path=str(artifacts / "text_to_image.png"), full_page=True)


def test_bad_settings_show_an_error_toast(page):
    page.get_by_label("Prompt", exact=True).fill("")
    page.get_by_role("button", name="Generate", exact=True).click()
    toast = page.get_by_test_id("toast-text").first
    toast.wait_for(timeout=10_000)
    assert "Enter a prompt" in toast.inner_text()


def test_stop_interrupts_a_long_batch(page, artifacts):
    page.get_by_label("Prompt", exact=True).fill("a small green triangle on a white background")
    for label, value in (("Steps", "100"), ("Batch size", "8")):
        box = page.get_by_label(f"number input for {label}")
        box.fill(value)
        box.press("Enter")
    page.get_by_role("button", name="Generate", exact=True).click()
    page.locator(".progress-text, .eta-bar, .progress-level").first.wait_for(timeout=20_000)
    page.get_by_role("button", name="Stop", exact=True).click()
    page.get_by_text("Stopped:").first.wait_for(timeout=30_000)
    seeds = page.locator("#text-to-image-gallery img[alt^='Seed ']")
    assert 1 <= seeds.count() < 8  # the finished images are kept, the rest were never started
    page.screenshot(path=str(artifacts / "text_to_image_stopped.png"), full_page=True)
