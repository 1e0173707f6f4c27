"""The web page in headless Chromium, against real servers on loopback.

``deepaas-run`` serves a tiny trained run, ``speechclas-web`` serves the page
and forwards ``/v2`` to it, and Playwright drives Debian's /usr/bin/chromium
(installed by scripts/install_browser.sh; Playwright's own browser download
is never used). The microphone is Chromium's fake capture device playing a
demo clip. Screenshots land in test-artifacts/.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import io
import os
import sys
import wave
from pathlib import Path

import numpy as np
import pytest
import requests
import soundfile
from aiohttp import web
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
        text = await page.text()
        assert page.status == 200
        for button in ('id="record-button"', 'id="listen-button"', 'id="detect-file-input"'):
            assert button in text
        for asset in ("/static/app.js", "/static/style.css"):
            assert (await client.get(asset)).status == 200
        assert (await client.get("/static/../webserver.py")).status in (403, 404)


@pytest.mark.asyncio
async def test_an_absent_deepaas_is_a_502_that_says_what_to_start():
    async with TestClient(TestServer(webserver.make_app("http://127.0.0.1:1"))) as client:
        response = await client.get("/v2/models/speechclas/")
        assert response.status == 502
        assert "deepaas-run" in (await response.json())["message"]


# --- what the forwarder lets through: a fake DEEPaaS behind it, raw HTTP in front ----------------


@dataclasses.dataclass
class Seen:
    method: str
    raw_path: str
    body: bytes
    headers: dict


@dataclasses.dataclass
class Answer:
    status: int
    body: bytes

    def json(self):
        import json

        return json.loads(self.body)


@contextlib.asynccontextmanager
async def forwarder(**options):
    """speechclas-web in front of a fake DEEPaaS that records what reaches it; yields (port, seen)."""
    seen: list[Seen] = []

    async def record(request: web.Request) -> web.Response:
        body = await request.read()
        seen.append(Seen(request.method, request.raw_path, body, dict(request.headers)))
        return web.json_response({"status": "ok", "bytes": len(body)})

    upstream_app = web.Application(client_max_size=2**30)
    upstream_app.router.add_route("*", "/{tail:.*}", record)
    async with TestServer(upstream_app) as upstream, \
            TestServer(webserver.make_app(str(upstream.make_url("")), **options)) as front:  # fmt: skip
        yield front.port, seen


async def send(port: int, method: str, target: str, headers: dict | None = None, body: bytes = b"",
               chunked: bool = False) -> Answer:  # fmt: skip
    """One HTTP/1.1 request written byte for byte (no client library to normalise its path)."""
    headers = {"Host": f"127.0.0.1:{port}", "Connection": "close", **(headers or {})}
    if chunked:
        headers["Transfer-Encoding"] = "chunked"
        payload = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 4096]), body[i:i + 4096])
                           for i in range(0, len(body), 4096)) + b"0\r\n\r\n"  # fmt: skip
    else:
        headers["Content-Length"] = str(len(body))
        payload = body
    head = f"{method} {target} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items() if v is not None)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head.encode("latin-1") + b"\r\n")
        with contextlib.suppress(ConnectionError):  # the server may answer (413) before reading it all
            writer.write(payload)
            await writer.drain()
        response = await asyncio.wait_for(reader.read(), timeout=30)
    finally:
        writer.close()
    status_line, _, rest = response.partition(b"\r\n")
    body = rest.partition(b"\r\n\r\n")[2]
    return Answer(int(status_line.split()[1]), body)


def own_origin(port: int) -> dict:
    return {"Origin": f"http://127.0.0.1:{port}"}


PREDICT_PATH = "/v2/models/speechclas/predict/"


@pytest.mark.asyncio
async def test_a_post_from_the_page_is_forwarded_with_its_body():
    async with forwarder() as (port, seen):
        answer = await send(port, "POST", PREDICT_PATH, own_origin(port), body=b"form bytes")
        assert answer.status == 200 and answer.json()["bytes"] == len(b"form bytes")
        assert [(s.method, s.raw_path, s.body) for s in seen] == [("POST", PREDICT_PATH, b"form bytes")]
        # No Origin, but a Referer of the page (what some browsers send): forwarded too.
        answer = await send(port, "DELETE", "/v2/models/speechclas/train/abc",
                            {"Referer": f"http://127.0.0.1:{port}/"})  # fmt: skip
        assert answer.status == 200 and seen[-1].method == "DELETE"


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("headers", "says"),
    [
        ({"Origin": "http://evil.example"}, "Origin 'http://evil.example'"),
        ({"Origin": "http://127.0.0.1:1"}, "Origin 'http://127.0.0.1:1'"),  # another local site
        ({"Origin": "null"}, "Origin 'null'"),  # a sandboxed frame or a file: page
        ({}, "no Origin or Referer"),
        ({"Referer": "http://evil.example/page.html"}, "Referer"),
    ],
    ids=["other-site", "other-port", "null", "none", "foreign-referer"],
)
async def test_a_state_changing_request_from_elsewhere_is_refused(headers, says):
    async with forwarder() as (port, seen):
        for method in ("POST", "PUT", "DELETE", "PATCH"):
            answer = await send(port, method, "/v2/models/speechclas/train/?data_dir=/etc", headers, body=b"x")
            assert answer.status == 403, answer.body
            assert "only from this server's own page" in answer.json()["message"]
            assert says in answer.json()["message"]
        assert seen == []  # nothing reached DEEPaaS


@pytest.mark.asyncio
async def test_a_host_that_is_not_this_server_is_refused_unless_allowed():
    # DNS rebinding: evil.example made to resolve to 127.0.0.1 is same-origin for the browser.
    rebound = {"Host": "evil.example:8000", "Origin": "http://evil.example:8000"}
    async with forwarder() as (port, seen):
        for method in ("GET", "POST"):
            answer = await send(port, method, PREDICT_PATH, rebound)
            assert answer.status == 403 and "--allow-host" in answer.json()["message"]
        assert (await send(port, "GET", "/", rebound)).status == 403  # the page too
        for host in ("localhost", f"localhost:{port}", f"[::1]:{port}"):
            assert (await send(port, "GET", "/v2/", {"Host": host})).status == 200, host
        assert (await send(port, "GET", "/v2/", {"Host": "bad host"})).status == 403
        assert (await send(port, "GET", "/v2/", {"Host": None})).status in (400, 403)  # aiohttp: 400
        assert len(seen) == 3
    async with forwarder(allow_hosts=["Evil.Example"]) as (port, seen):
        answer = await send(port, "POST", PREDICT_PATH, rebound)
        assert answer.status == 200 and seen[0].headers["Origin"] == "http://evil.example:8000"
    async with forwarder(listen_host="10.1.2.3") as (port, seen):
        assert (await send(port, "GET", "/v2/", {"Host": "10.1.2.3:8000"})).status == 200


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "target",
    ["/v2/%2E%2E/ui", "/v2/%2e%2e/swagger.json", "/v2/../ui", "/v2/models/%2E/x", "/v2/x%2F..%2F..%2Fui",
     "/v2/x%5C..%5C..%5Cui", "/v%32/models/", "/ui", "/swagger.json", "http://127.0.0.1:1/v2/"],
)
async def test_only_v2_paths_without_dot_segments_are_forwarded(target):
    async with forwarder() as (port, seen):
        for method in ("GET", "POST"):
            answer = await send(port, method, target, own_origin(port))
            assert answer.status in (403, 404), (method, answer.body)
        assert seen == []


@pytest.mark.asyncio
async def test_a_get_is_forwarded_with_its_raw_path_and_query():
    target = "/v2/models/speechclas/train/%41b%2Fc?urls=http%3A%2F%2Fx%2Fa%20b.wav&top_k=+3&flag&e=%2E%2E"
    async with forwarder() as (port, seen):
        answer = await send(port, "GET", target)
        assert answer.status == 200
        assert seen[0].raw_path == target


@pytest.mark.asyncio
@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_a_body_above_the_limit_is_a_413_and_is_not_forwarded(chunked):
    async with forwarder(client_max_size=10_000) as (port, seen):
        answer = await send(port, "POST", PREDICT_PATH, own_origin(port), body=b"x" * 50_000, chunked=chunked)
        assert answer.status == 413 and "10000 bytes" in answer.json()["message"]
        assert "SPEECHCLAS_MAX_AUDIO_BYTES" in answer.json()["message"]
        answer = await send(port, "POST", PREDICT_PATH, own_origin(port), body=b"x" * 9_000, chunked=chunked)
        assert answer.status == 200 and [len(s.body) for s in seen] == [9_000]


def test_the_default_body_limit_is_the_apis(monkeypatch):
    monkeypatch.setenv("SPEECHCLAS_MAX_AUDIO_BYTES", "5000")
    monkeypatch.setenv("SPEECHCLAS_DETECT_MAX_AUDIO_BYTES", "3000")
    assert webserver.make_app()._client_max_size == 5000 + 2**20


@pytest.mark.parametrize(
    ("source", "host", "scheme", "same"),
    [
        ("http://127.0.0.1:8000", "127.0.0.1:8000", "http", True),
        ("http://LOCALHOST:8000/page?x", "localhost:8000", "http", True),
        ("http://example.org", "example.org:80", "http", True),
        ("https://example.org", "example.org", "http", True),  # behind a TLS proxy
        ("https://example.org:8443", "example.org:8443", "http", True),
        ("http://127.0.0.1:8001", "127.0.0.1:8000", "http", False),
        ("http://127.0.0.1", "127.0.0.1:8000", "http", False),
        ("http://evil.example:8000", "127.0.0.1:8000", "http", False),
        ("http://127.0.0.1:8000.evil.example", "127.0.0.1:8000", "http", False),
        ("ftp://127.0.0.1:8000", "127.0.0.1:8000", "http", False),
        ("null", "127.0.0.1:8000", "http", False),
        ("http://127.0.0.1:99999", "127.0.0.1:8000", "http", False),
        ("http://127.0.0.1:8000", "127.0.0.1:8000/x", "http", False),
    ],
)
def test_same_origin(source, host, scheme, same):
    assert webserver.same_origin(source, host, scheme) is same


# --- real servers and a real browser ---------------------------------------------------------


@contextlib.contextmanager
def serving(home: Path):
    """deepaas-run serving the project folder `home`, and speechclas-web in front of it; yields both base URLs."""
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
def site(tmp_path_factory, trained_run):
    """deepaas-run with the tiny run, and speechclas-web in front of it; yields both base URLs."""
    with serving(make_project_home(tmp_path_factory.mktemp("web-home"), [trained_run])) as urls:
        yield urls


@contextlib.contextmanager
def chromium(microphone: Path):
    """Debian's headless Chromium, its fake microphone playing the wav `microphone` (looped)."""
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: run scripts/install_browser.sh (Debian's chromium) to run the browser tests")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is missing: pip install -e '.[test]' (test-requirements.txt)")
    args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-audio-capture={microphone}"]  # fmt: skip
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=args)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="module")
def browser():
    with chromium(MICROPHONE_CLIP) as browser:
        yield browser


@contextlib.contextmanager
def open_page(browser, web_url: str, screenshot_name: str):
    """A fresh page showing the site, the served model known; screenshotted when done.
    Fails on any JavaScript error the page raised."""
    context = browser.new_context(viewport={"width": 1000, "height": 900})
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(web_url + "/")
    page.wait_for_selector("#served:has-text('Serving run')")
    try:
        yield page
    finally:
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / f"web-{screenshot_name}.png"), full_page=True)
        context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


@pytest.fixture
def page(browser, site, request):
    with open_page(browser, site[1], request.node.name) as page:
        yield page


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
