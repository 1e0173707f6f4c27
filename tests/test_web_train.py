"""The web page's "Train words" panel in headless Chromium, against a real deepaas-run and speechclas-web.

The panel starts a training from text alone (``text_only``: the installed espeak-ng, flite and
festival say the words), follows it by its uuid until it ends, with its phase and step from the
metadata's "trainings" meanwhile, shows the new run's labels (from the training's result), and
"Listen with this model" makes every prediction of the page name that run. The server pins the
session's tiny run (SPEECHCLAS_RUN), so the new run is not served by default: what answers after
the switch is the panel's doing. See tests/test_web.py for the servers and the browser.
"""

from __future__ import annotations

import re
import shutil

import pytest
import requests

from tests.conftest import demo_clip, make_project_home
from tests.test_web import chromium, open_page, serving

TRAIN = "/v2/models/speechclas/train/"
TRAINING_TIMEOUT_MS = 600_000
STEPS = 200  # the end-to-end training's: a few seconds of steps, so that polls see it at a step
ENGINES = ("espeak-ng", "flite", "festival")
WORDS = ("lights", "music")
MICROPHONE_CLIP = demo_clip("yes")

pytestmark = pytest.mark.skipif(
    any(shutil.which(program) is None for program in ("espeak-ng", "flite", "text2wave")),
    reason="needs espeak-ng, flite and festival (bash scripts/install_voices.sh)",
)

# What the page did, kept for the test: each text of the training's status line and of its step, each
# value and max of its progress bar, and the `run` and `mode` of every predict it sent.
WATCH_THE_PAGE = """
    window.trainStatusTexts = [];
    window.trainStepTexts = [];
    window.trainBar = [];
    window.sentPredictions = [];
    document.addEventListener("DOMContentLoaded", () => {
        const status = document.getElementById("train-status");
        new MutationObserver(() => window.trainStatusTexts.push(status.textContent))
            .observe(status, { childList: true, characterData: true, subtree: true });
        const step = document.getElementById("train-step");
        new MutationObserver(() => window.trainStepTexts.push(step.textContent))
            .observe(step, { childList: true, characterData: true, subtree: true });
        const bar = document.getElementById("train-bar");
        new MutationObserver(() => window.trainBar.push({ value: bar.getAttribute("value"), max: bar.max }))
            .observe(bar, { attributes: true, attributeFilter: ["value", "max"] });
    });
    const originalFetch = window.fetch;
    window.fetch = (url, options) => {
        if (options && options.body instanceof FormData && String(url).includes("/predict/")) {
            window.sentPredictions.push({ run: options.body.get("run"), mode: options.body.get("mode") });
        }
        return originalFetch(url, options);
    };
"""


@pytest.fixture(scope="module")
def pinned_site(tmp_path_factory, trained_run):
    """deepaas-run (one worker) serving the tiny run, pinned, and speechclas-web in front; yields both URLs."""
    home = make_project_home(tmp_path_factory.mktemp("web-train-home"), [trained_run])
    with pytest.MonkeyPatch.context() as environment:
        environment.setenv("SPEECHCLAS_RUN", trained_run.name)
        with serving(home) as urls:
            yield urls


@pytest.fixture(scope="module")
def browser():
    with chromium(MICROPHONE_CLIP) as browser:
        yield browser


@pytest.fixture
def page(browser, pinned_site, request):
    with open_page(browser, pinned_site[1], request.node.name) as page:
        page.add_init_script(WATCH_THE_PAGE)
        page.reload()
        page.wait_for_selector("#served:has-text('Serving run')")
        yield page


def trainings(api_url: str) -> list[dict]:
    return requests.get(api_url + TRAIN, timeout=10).json()


def fill_tiny_training(page, words: str, steps: str = "20", extra: str = "unknown_word_clips=20 streaming_minutes=0"):
    """The panel with a training of a few seconds: few steps, 2 speakers per engine, few unknown words."""
    page.fill("#train-words", words)
    page.fill("#train-steps", steps)
    if not page.locator(".train-more").evaluate("details => details.open"):
        page.click(".train-more summary")
    page.fill("#train-speakers", "2")
    page.fill("#train-extra", extra)


def test_an_argument_the_api_refuses_shows_its_message_and_starts_nothing(page, pinned_site):
    fill_tiny_training(page, "lights, _music")  # a label may not start with '_'
    page.click("#train-button")
    page.wait_for_selector("body[data-training=error]")
    assert "wanted_words" in page.inner_text("#train-error")
    assert "_music" in page.inner_text("#train-error")
    fill_tiny_training(page, "lights", extra="unknown_word_clips=20 batch_size=0")
    page.click("#train-button")
    page.wait_for_selector("#train-error:has-text('batch_size')")
    assert "between 1 and 4096" in page.inner_text("#train-error")
    assert page.is_enabled("#train-button")
    assert trainings(pinned_site[0]) == []


def test_train_words_from_text_then_listen_with_the_new_run(page, pinned_site, trained_run):
    api_url = pinned_site[0]
    # Commas or spaces, each word once, lower case; steps enough to be seen running at one poll a second.
    fill_tiny_training(page, " Lights, music  lights ", steps=str(STEPS))
    page.click("#train-button")

    # The training the API started is the one the panel asked for.
    page.wait_for_selector("body[data-training]")
    started = trainings(api_url)
    assert len(started) == 1, started
    args = started[0]["args"]
    assert args["text_only"] is True and args["wanted_words"] == list(WORDS)
    assert args["synthetic_voices"] == list(ENGINES) and args["synthetic_speakers"] == 2
    assert args["how_many_training_steps"] == [STEPS] and args["learning_rate"] == [0.003]
    assert (args["model_architecture"], args["preprocess"]) == ("tc_resnet8", "logmel")
    assert (args["unknown_word_clips"], args["streaming_minutes"]) == (20, 0.0)

    # Its progress while it runs (phase and step, from the metadata), then its end.
    page.wait_for_selector("#train-elapsed:has-text('elapsed')")
    page.wait_for_selector("body[data-training=done], body[data-training=error]", timeout=TRAINING_TIMEOUT_MS)
    assert page.get_attribute("body", "data-training") == "done", page.inner_text("#train-error")
    texts = page.evaluate("window.trainStatusTexts")
    for phase in ("saying the words…", "evaluating and exporting…"):  # each lasts seconds
        assert f"Training lights, music: {phase}" in texts, texts
    steps = [match.groups() for text in page.evaluate("window.trainStepTexts")
             if (match := re.fullmatch(r"step (\d+) of (\d+)", text))]  # fmt: skip
    assert steps and {total for _, total in steps} == {str(STEPS)}, page.evaluate("window.trainStepTexts")
    assert any(0 < int(done) <= STEPS for done, _ in steps), steps
    bars = [bar for bar in page.evaluate("window.trainBar") if bar["value"] is not None]
    assert any(bar["max"] == STEPS and 0 < float(bar["value"]) < STEPS for bar in bars), bars
    assert page.inner_text("#train-status").startswith("Done")
    assert page.is_hidden("#train-bar") and page.inner_text("#train-step") == ""

    # The new run and its labels.
    run = page.get_attribute("#train-summary", "data-run")
    assert run and run != trained_run.name
    assert run in page.inner_text("#train-summary")
    output = trainings(api_url)[0]["result"]["output"]
    assert output["run"] == run and output["labels"] == ["_silence_", "_unknown_", *WORDS]
    assert page.locator(".train-label").all_inner_texts() == output["labels"]
    assert page.is_hidden("#train-cancel") and page.is_enabled("#train-button")
    # The pinned run is still the one served; nothing has switched yet.
    assert f"Serving run {trained_run.name}" in page.inner_text("#served")
    # The labels came with the result: no predict looked them up.
    assert [sent for sent in page.evaluate("window.sentPredictions") if sent["run"] == run] == []

    # Listen with this model: the header says so, and the microphone's chunks are searched by it.
    page.click("#train-use")
    page.wait_for_selector(f"#served[data-run='{run}']")
    assert "_silence_, _unknown_, lights, music" in page.inner_text("#served")
    page.wait_for_selector("body[data-listening=on]")
    page.wait_for_selector(f"#listen-status:has-text('searched by run {run}')", timeout=120_000)
    page.click("#listen-stop")
    page.wait_for_selector("body[data-listening=stopped]")
    detects = [sent for sent in page.evaluate("window.sentPredictions") if sent["mode"] == "detect"]
    assert detects and all(sent["run"] == run for sent in detects)

    # An upload too is answered by the new run; "Use the served run" goes back to the pinned one.
    page.set_input_files("#file-input", str(demo_clip("yes")))
    page.wait_for_selector("body[data-state]")
    assert page.get_attribute("body", "data-state") == "done", page.inner_text("#error")
    assert page.get_attribute("#result-run", "data-run") == run
    assert {label.split(" ")[0] for label in page.locator(".bar-label").all_inner_texts()} <= {
        "_silence_", "_unknown_", *WORDS}  # fmt: skip
    page.click("#served button")
    page.wait_for_selector("#served:has-text('Serving run')")
    page.evaluate("document.body.removeAttribute('data-state')")
    page.set_input_files("#file-input", str(demo_clip("no")))
    page.wait_for_selector("body[data-state=done]")
    assert page.get_attribute("#result-run", "data-run") == trained_run.name


def test_a_running_training_can_be_cancelled(page, pinned_site):
    fill_tiny_training(page, "pause", steps="50000")
    page.click("#train-button")
    page.wait_for_selector("body[data-training=running]")
    page.wait_for_selector("#train-cancel:visible").click()
    page.wait_for_selector("body[data-training=cancelled], body[data-training=error]", timeout=120_000)
    assert page.get_attribute("body", "data-training") == "cancelled", page.inner_text("#train-error")
    assert page.inner_text("#train-status") == "Cancelled."
    assert page.is_hidden("#train-error") and page.is_enabled("#train-button")
    # DEEPaaS forgets a cancelled training (the earlier tests' finished one may still be listed).
    assert [t for t in trainings(pinned_site[0]) if t["args"]["wanted_words"] == ["pause"]] == []
