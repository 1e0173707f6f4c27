"""The web page in headless Chromium, against real servers on loopback.

``deepaas-run`` serves a tiny trained run, ``speechclas-web`` serves the page
and forwards ``/v2`` to it, and Playwright drives Debian's /usr/bin/chromium
(installed by scripts/install_browser.sh; Playwright's own browser download
is never used). The microphone is Chromium's fake capture device playing a
demo clip. Screenshots land in test-artifacts/.
"""

from __future__ import annotations

import base64
import io
import os
import sys
import wave
from pathlib import Path

import numpy as np
import pytest
import requests
import soundfile
from aiohttp.test_utils import TestClient, TestServer

from speechclas import webserver
from tests.conftest import REPO, demo_clip, make_project_home
from tests.http_server import serve_directory
from tests.processes import deepaas_command, free_port, running, wait_until_serving
from tests.test_deepaas_process import PREDICT

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = REPO / "test-artifacts"
TIMEOUT_MS = 60_000
MICROPHONE_CLIP = demo_clip("yes")


# --- the forwarder alone (no browser, no model) ------------------------------------------


@pytest.mark.asyncio
async def test_the_page_and_its_assets_are_served():
    async with TestClient(TestServer(webserver.make_app("http://127.0.0.1:1"))) as client:
        page = await client.get("/")
        assert page.status == 200 and 'id="record-button"' in await page.text()
        for asset in ("/static/app.js", "/static/style.css"):
            assert (await client.get(asset)).status == 200
        assert (await client.get("/static/../webserver.py")).status in (403, 404)


@pytest.mark.asyncio
async def test_an_absent_deepaas_is_a_502_that_says_what_to_start():
    async with TestClient(TestServer(webserver.make_app("http://127.0.0.1:1"))) as client:
        response = await client.get("/v2/models/speechclas/")
        assert response.status == 502
        assert "deepaas-run" in (await response.json())["message"]


# --- real servers and a real browser ---------------------------------------------------------


@pytest.fixture(scope="module")
def site(tmp_path_factory, trained_run):
    """deepaas-run with the tiny run, and speechclas-web in front of it; yields both base URLs."""
    home = make_project_home(tmp_path_factory.mktemp("web-home"), [trained_run])
    env = {**os.environ, "SPEECHCLAS_HOME": str(home), "SPEECHCLAS_ALLOW_PRIVATE_URLS": "1",
           "TF_CPP_MIN_LOG_LEVEL": "2"}  # fmt: skip
    api_port, web_port = free_port(), free_port()
    api_url, web_url = f"http://127.0.0.1:{api_port}", f"http://127.0.0.1:{web_port}"
    deepaas_log, web_log = home / "deepaas.log", home / "web.log"
    web_command = [sys.executable, "-m", "speechclas.webserver", "--port", str(web_port), "--api-url", api_url]
    with running(deepaas_command(api_port, workers=1), env, home, deepaas_log) as deepaas, \
            running(web_command, env, home, web_log) as web:
        wait_until_serving(api_url, deepaas, deepaas_log)
        wait_until_serving(web_url, web, web_log)  # /v2/ through the forwarder
        yield api_url, web_url


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: run scripts/install_browser.sh (Debian's chromium) to run the browser tests")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is missing: pip install -e '.[test]' (test-requirements.txt)")
    args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-audio-capture={MICROPHONE_CLIP}"]  # fmt: skip
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=args)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, site, request):
    """A fresh page showing the site, the served model known; screenshotted when the test ends."""
    context = browser.new_context(viewport={"width": 1000, "height": 900})
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(site[1] + "/")
    page.wait_for_selector("#served:has-text('Serving run')")
    yield page
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"web-{request.node.name}.png"), full_page=True)
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def wait_for_answer(page) -> None:
    page.wait_for_selector("body[data-state]")
    assert page.get_attribute("body", "data-state") == "done", page.inner_text("#error")


def shown_bars(page) -> list[tuple[str, float]]:
    rows = page.locator(".bar-row")
    return [
        (rows.nth(i).get_attribute("data-label"), float(rows.nth(i).locator(".bar-value").inner_text().split()[0]))
        for i in range(rows.count())
    ]


def canvas_is_drawn(page, canvas_id: str) -> bool:
    """Whether a canvas holds more than one colour (something was plotted on the background)."""
    return page.evaluate(
        """(id) => {
            const c = document.getElementById(id);
            const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
            const seen = new Set();
            for (let i = 0; i < d.length; i += 4 * 97) seen.add(d[i] * 65536 + d[i + 1] * 256 + d[i + 2]);
            return seen.size > 5;
        }""",
        canvas_id,
    )


def test_upload_shows_the_api_top5_as_bars_with_plots(page, site, trained_run):
    clip = demo_clip("yes")
    page.set_input_files("#file-input", str(clip))
    wait_for_answer(page)
    expected = requests.post(site[0] + PREDICT, files={"data": (clip.name, clip.read_bytes())}, timeout=60).json()
    bars = shown_bars(page)
    assert [label for label, _ in bars] == [p["label"] for p in expected["predictions"]]
    assert [value for _, value in bars] == [round(100 * p["probability"], 1) for p in expected["predictions"]]
    assert page.get_attribute("#result-run", "data-run") == trained_run.name
    assert canvas_is_drawn(page, "waveform") and canvas_is_drawn(page, "spectrogram")


def test_url_of_a_wav_on_loopback(page, trained_run):
    clip = demo_clip("no")
    with serve_directory(clip.parent) as base:
        page.fill("#url-input", f"{base}/{clip.name}")
        page.click("#url-button")
        wait_for_answer(page)
    bars = shown_bars(page)
    assert len(bars) == 5 and {label for label, _ in bars} <= set(trained_run.labels())
    assert page.get_attribute("#result-run", "data-run") == trained_run.name
    assert clip.name in page.inner_text("#result-source")


# Chromium does not show Playwright the body of a multipart request holding a Blob; this keeps a copy.
KEEP_SENT_AUDIO = """
    const originalFetch = window.fetch;
    window.fetch = async (url, options) => {
        const data = options && options.body instanceof FormData ? options.body.get("data") : null;
        if (data instanceof Blob) {
            const bytes = new Uint8Array(await data.arrayBuffer());
            window.sentAudio = btoa(Array.from(bytes, (b) => String.fromCharCode(b)).join(""));
        }
        return originalFetch(url, options);
    };
"""


def test_recording_from_the_fake_microphone_sends_pcm_wav(page, trained_run):
    page.add_init_script(KEEP_SENT_AUDIO)
    page.reload()
    page.wait_for_selector("#served:has-text('Serving run')")
    page.click("#record-button")
    wait_for_answer(page)
    sent = base64.b64decode(page.evaluate("window.sentAudio"))
    with wave.open(io.BytesIO(sent)) as wav:
        assert (wav.getsampwidth(), wav.getnchannels(), wav.getframerate()) == (2, 1, 16000)
        assert wav.getnframes() > 16000  # about 1.5 s
        samples = np.frombuffer(wav.readframes(wav.getnframes()), "<i2")
    # The clip as played, not as a voice call's gain control would have boosted it (clipped to a wall).
    played_peak = np.abs(soundfile.read(MICROPHONE_CLIP, dtype="int16")[0]).max()
    assert np.abs(samples).max() <= 1.5 * played_peak
    assert len(shown_bars(page)) == 5
    assert page.get_attribute("#result-run", "data-run") == trained_run.name
    assert "16000 Hz" in page.inner_text("#result-details")
    assert canvas_is_drawn(page, "waveform")


def test_a_bad_file_shows_the_api_message(page, tmp_path):
    not_audio = tmp_path / "notes.wav"
    not_audio.write_text("these are notes, not audio")
    page.set_input_files("#file-input", str(not_audio))
    page.wait_for_selector("body[data-state=error]")
    assert "not a readable audio file" in page.inner_text("#error")
    page.set_input_files("#file-input", str(demo_clip("go")))  # the page still works after an error
    page.wait_for_selector("body[data-state=done]")
    assert page.is_hidden("#error")
