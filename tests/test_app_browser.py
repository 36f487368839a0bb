"""The chat demo end to end in a real headless browser: Debian's chromium driven by Playwright.

Skipped, saying why, when chromium or the playwright package is missing (``.ci/run`` installs chromium with apt;
playwright comes with the dev extras). Set ``ANYGPT_DEMO_SCREENSHOT=docs/demo.png`` to also write the screenshot there.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from test_app import held_decoder, running_app

from anygpt.base.modality import Modality

CHROMIUM = next((p for p in ("/usr/bin/chromium", shutil.which("chromium") or "") if p and os.path.exists(p)), None)
if CHROMIUM is None:
    pytest.skip("chromium is not installed (apt-get install chromium chromium-driver)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")

pytestmark = [
    pytest.mark.filterwarnings("ignore:'future.no_silent_downcasting' is deprecated"),
    pytest.mark.filterwarnings("ignore:The copy keyword is deprecated"),
]

BOT = "#chat [data-testid=bot]"  # the assistant's bubbles (the user's upload is an <img> too)


@pytest.fixture(scope="module")
def url(tiny_pipe, tmp_path_factory):
    with running_app(tiny_pipe, tmp_path_factory.mktemp("demo-browser")) as (address, _):
        yield address


@pytest.fixture(scope="module")
def page(url):
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1280})
            page.set_default_timeout(30_000)
            page.goto(url)
            page.wait_for_selector("#msg textarea")
            yield page
        finally:
            browser.close()


def send(page, text: str, attach: Path | None = None) -> None:
    page.fill("#msg textarea", text)
    if attach is not None:  # uploads are asynchronous: wait until the server has the file and shows its thumbnail
        with page.expect_response(lambda response: "/upload" in response.url and response.ok):
            page.set_input_files("#msg input[type=file]", str(attach))
        page.wait_for_selector("#msg [aria-label='File thumbnail']")
    page.click("#send")


def test_chat_with_an_uploaded_image_shows_generated_media(page, media_files, tmp_path):
    send(page, "what is in this picture?", attach=media_files["image"])
    page.wait_for_selector(f"{BOT} >> nth=0")
    page.wait_for_function("document.querySelector('#status').innerText.includes('done')")
    assert page.locator("#chat [data-testid=user] img").count() == 1  # the upload is shown in the user's bubble

    page.get_by_label("auto").uncheck()
    for modality in ("image", "video", "audio"):
        page.get_by_label(modality, exact=True).check()
    send(page, "draw it, film it and make it sing")
    page.wait_for_selector(f"{BOT} img")
    video = page.wait_for_selector(f"{BOT} video", state="attached")
    audio = page.wait_for_selector(f"{BOT} audio", state="attached")
    # the browser can decode what it was given: the H.264 MP4's and the WAV's metadata load
    page.wait_for_function("media => media.readyState >= 1", arg=video)
    page.wait_for_function("media => media.readyState >= 1", arg=audio)
    assert video.evaluate("v => v.duration") > 0.5 and audio.evaluate("a => a.duration") > 0.5
    assert page.locator("#chat [data-testid=user]", has_text="draw it, film it").count() == 1

    shot = tmp_path / "demo.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    if os.environ.get("ANYGPT_DEMO_SCREENSHOT"):
        shutil.copyfile(shot, os.environ["ANYGPT_DEMO_SCREENSHOT"])


def test_a_bad_upload_shows_an_error_in_the_chat(page, tmp_path):
    bad = tmp_path / "broken.wav"
    bad.write_text("not audio")
    send(page, "listen", attach=bad)
    page.wait_for_selector(f"{BOT} :text('cannot read audio broken.wav')")
    page.click("#clear")
    page.wait_for_function("document.querySelectorAll('#chat [data-testid=bot]').length == 0")


def test_stop_ends_a_rendering_answer_and_shows_it(page, tiny_pipe):
    page.get_by_label("auto").uncheck()
    for modality in ("image", "video", "audio"):
        page.get_by_label(modality, exact=True).set_checked(modality == "image")
    with held_decoder(tiny_pipe, Modality.IMAGE):  # a long render, stopped between its steps
        send(page, "draw something slow")
        page.wait_for_function("document.querySelector('#status').innerText.includes('rendering image')")
        page.click("#stop")
        page.wait_for_selector(f"{BOT} >> text=stopped: not part of the conversation")
        page.wait_for_function("document.querySelector('#status').innerText.trim() == 'stopped'")
    send(page, "and now?")  # the page keeps working after a stop
    page.wait_for_function("document.querySelector('#status').innerText.includes('done')")
    assert page.locator("#chat [data-testid=user]").count() == 2
