"""The chat demo end to end in a real headless browser: Debian's chromium driven by Playwright, on the default model.

Skipped, saying why, when chromium or the playwright package is missing (``.ci/run`` installs chromium with apt;
playwright comes with the dev extras). Set ``ANYGPT_DEMO_SCREENSHOT=docs/demo.png`` to also write the screenshot there
(the page after an example was clicked and answered by ``toyworld``).
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
STATUS = "(document.querySelector('#status textarea, #status input') || {value: ''}).value"  # the status box's text
EXAMPLE = "draw a red circle and play a high beep and show a green square moving left"


@pytest.fixture(scope="module")
def url(toyworld, tmp_path_factory):
    with running_app(toyworld, tmp_path_factory.mktemp("demo-browser"), model="toyworld") as (address, _):
        yield address


@pytest.fixture(scope="module")
def page(url):
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1440})
            page.set_default_timeout(120_000)  # the default model renders at its own steps on a busy CPU
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


def wait_done(page) -> None:
    page.wait_for_function(f"{STATUS}.startsWith('done')")


def test_an_example_is_answered_with_media_shown_large_and_playable(page, tmp_path):
    assert page.locator("#knows", has_text="What this model knows").count() == 1
    record = "window.statuses = []; setInterval(() => { const s = STATUS; if (window.statuses.at(-1) !== s) "
    page.evaluate(record.replace("STATUS", STATUS) + "window.statuses.push(s); }, 20)")  # what the status box says
    page.locator("#examples button", has_text=EXAMPLE).click()  # one click: it fills the box and is sent
    page.wait_for_selector(f"#chat [data-testid=user] >> text={EXAMPLE}")
    wait_done(page)
    statuses = page.evaluate("window.statuses")
    # each decoder's first load is said as such, then its denoising steps are counted
    for index, modality in enumerate(("image", "video", "audio")):
        loading = statuses.index(f"loading the {modality} decoder")
        steps = [s for s in statuses if s.startswith(f"rendering {modality} ({index + 1}/3): step ")]
        assert steps and statuses.index(steps[0]) > loading, statuses
    assert page.locator(f"{BOT}", has_text="Here is a red circle.").count() == 1
    image = page.wait_for_selector(f"{BOT} img")
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=image)
    # the 64 px image is saved and shown at 256 px (nearest-neighbour)
    assert image.evaluate("img => [img.naturalWidth, img.naturalHeight]") == [256, 256]
    assert image.evaluate("img => img.getBoundingClientRect().width") >= 250
    video = page.wait_for_selector(f"{BOT} video", state="attached")
    audio = page.wait_for_selector(f"{BOT} audio", state="attached")
    # the browser decodes what it was given: the H.264 MP4's and the WAV's metadata load
    page.wait_for_function("media => media.readyState >= 1", arg=video)
    page.wait_for_function("media => media.readyState >= 1", arg=audio)
    assert video.evaluate("v => [v.videoWidth, v.videoHeight]") == [256, 256]
    assert video.evaluate("v => v.getBoundingClientRect().width") >= 250  # large: the controls do not cover it
    assert video.evaluate("v => v.duration") > 0.5 and audio.evaluate("a => a.duration") > 0.5
    # clicking the clip plays it: the browser starts playback and the time moves
    video.evaluate("v => { v.muted = true; window.playing = false; v.onplaying = () => { window.playing = true; }; }")
    assert video.evaluate("v => v.paused")
    video.click()
    page.wait_for_function("window.playing === true")
    page.wait_for_function("v => v.currentTime > 0.2 || v.ended", arg=video)

    video.evaluate("v => { v.pause(); v.currentTime = 0.5; }")  # a frame with the square inside it
    page.mouse.move(0, 0)  # no hover: the player's controls are hidden in the screenshot
    page.wait_for_timeout(500)
    shot = tmp_path / "demo.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    if os.environ.get("ANYGPT_DEMO_SCREENSHOT"):
        shutil.copyfile(shot, os.environ["ANYGPT_DEMO_SCREENSHOT"])


def test_an_uploaded_image_is_shown_and_answered(page, media_files):
    send(page, "what is in this image?", attach=media_files["image"])
    page.wait_for_selector("#chat [data-testid=user] >> text=what is in this image?")
    wait_done(page)
    assert page.locator("#chat [data-testid=user] img").count() == 1  # the upload is shown in the user's bubble


def test_a_bad_upload_shows_an_error_in_the_chat(page, tmp_path):
    bad = tmp_path / "broken.wav"
    bad.write_text("not audio")
    send(page, "listen", attach=bad)
    page.wait_for_selector(f"{BOT} :text('cannot read audio broken.wav')")
    page.click("#clear")
    page.wait_for_function("document.querySelectorAll('#chat [data-testid=bot]').length == 0")


def test_stop_ends_a_rendering_answer_and_shows_it(page, toyworld):
    page.get_by_label("auto").uncheck()
    for modality in ("image", "video", "audio"):
        page.get_by_label(modality, exact=True).set_checked(modality == "image")
    with held_decoder(toyworld, Modality.IMAGE):  # a long render, stopped between its steps
        send(page, "draw a yellow square")
        page.wait_for_function(f"{STATUS}.includes('rendering image')")
        page.click("#stop")
        page.wait_for_selector(f"{BOT} >> text=stopped: not part of the conversation")
        page.wait_for_function(f"{STATUS}.trim() == 'stopped'")
    page.get_by_label("image", exact=True).uncheck()  # text only: quick
    send(page, "and now?")  # the page keeps working after a stop
    wait_done(page)
    assert page.locator("#chat [data-testid=user]").count() == 2
