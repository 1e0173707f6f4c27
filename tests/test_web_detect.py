"""Detection on the web page, in headless Chromium against a real deepaas-run: Listen (the fake
microphone plays three keywords) and Detect in a file.

The served run is a ds_cnn trained here for a few hundred steps (about two
minutes on two loaded cores): the tiny run of the other web tests hears no
keyword reliably. The keywords are test-split clips the run never trained on;
of those, the ones it classifies most surely, since what is tested here is the
page (chunks, session times, deduplication, drawing), not the model.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import requests
import soundfile

from tests.conftest import (
    DEMO_DATA,
    DETECTION_TESTING_PERCENTAGE,
    DETECTION_VALIDATION_PERCENTAGE,
    make_project_home,
)
from tests.test_deepaas_process import PREDICT
from tests.test_web import ARTIFACTS, canvas_is_drawn, chromium, open_page, serving, wait_for_answer

SAMPLE_RATE = 16000
THRESHOLD = 0.6  # set on the page, so the run's own default does not matter
FIRST_WORD_S = 1.0
WORD_SPACING_S = 2.5
VALIDATION_PERCENTAGE, TESTING_PERCENTAGE = DETECTION_VALIDATION_PERCENTAGE, DETECTION_TESTING_PERCENTAGE


@pytest.fixture(scope="module")
def detect_run(detection_run):
    """A ds_cnn run on the demo data, strong enough to spot keywords in a stream (tests/conftest.py)."""
    return detection_run


@dataclasses.dataclass(frozen=True)
class Keywords:
    """A recording of `words`, said at `times_s`, over quiet noise."""

    path: Path
    words: tuple[str, ...]
    times_s: tuple[float, ...]


def surest_test_clips(run, count: int) -> list[tuple[str, Path]]:
    """(word, clip) of `count` different wanted words: the test-split clip of each word that the
    run classifies most surely, the surest words first."""
    from speechclas.audio import decode_audio, fix_length
    from speechclas.data import which_set
    from speechclas.predict import Predictor

    predictor = Predictor.load(run)
    best = []
    for index, label in enumerate(predictor.labels):
        if label.startswith("_"):
            continue
        clips = [p for p in sorted((DEMO_DATA / label).glob("*.wav"))
                 if which_set(p.name, VALIDATION_PERCENTAGE, TESTING_PERCENTAGE) == "testing"]  # fmt: skip
        windows = [fix_length(decode_audio(p, SAMPLE_RATE).samples, predictor.settings.desired_samples) for p in clips]
        scored = [(predictor.probabilities(window)[index], p) for window, p in zip(windows, clips, strict=True)]
        probability, clip = max(scored)
        best.append((probability, label, clip))
    best.sort(reverse=True)
    return [(label, clip) for _, label, clip in best[:count]]


def keyword_recording(path: Path, clips: list[tuple[str, Path]], seconds: float) -> Keywords:
    """The clips every WORD_SPACING_S from FIRST_WORD_S over quiet noise, then quiet noise to `seconds`."""
    audio = 0.003 * np.random.default_rng(0).standard_normal(int(seconds * SAMPLE_RATE)).astype(np.float32)
    times = []
    for i, (_, clip) in enumerate(clips):
        samples = soundfile.read(clip, dtype="float32")[0]
        at = FIRST_WORD_S + i * WORD_SPACING_S
        start = int(at * SAMPLE_RATE)
        audio[start : start + len(samples)] += samples
        times.append(at)
    soundfile.write(path, audio, SAMPLE_RATE, subtype="PCM_16")
    return Keywords(path, tuple(word for word, _ in clips), tuple(times))


@pytest.fixture(scope="module")
def keyword_clips(detect_run):
    return surest_test_clips(detect_run, 3)


@pytest.fixture(scope="module")
def detect_site(tmp_path_factory, detect_run):
    with serving(make_project_home(tmp_path_factory.mktemp("web-detect-home"), [detect_run])) as urls:
        yield urls


def shown_detections(page, selector: str) -> list[dict]:
    return page.eval_on_selector_all(
        selector,
        "rows => rows.map(r => ({label: r.dataset.label, start_s: Number(r.dataset.start), "
        "end_s: Number(r.dataset.end), score: Number(r.dataset.score)}))",
    )


def detect_through_the_api(api_url: str, recording: Keywords) -> dict:
    """The API's detections in the whole recording; they must be the recording's words (else the model,
    not the page, is what failed)."""
    answer = requests.post(
        api_url + PREDICT,
        files={"data": (recording.path.name, recording.path.read_bytes())},
        data={"mode": "detect", "threshold": str(THRESHOLD)},
        timeout=120,
    ).json()
    assert [d["label"] for d in answer.get("detections", [])] == list(recording.words), answer
    return answer


def test_detect_in_a_file_lists_the_keywords_and_marks_them_on_the_waveform(detect_site, keyword_clips, tmp_path):
    recording = keyword_recording(tmp_path / "three-keywords.wav", keyword_clips, seconds=10.0)
    expected = detect_through_the_api(detect_site[0], recording)
    with chromium(recording.path) as browser, open_page(browser, detect_site[1], "detect-in-a-file") as page:
        page.fill("#detect-threshold", str(THRESHOLD))
        page.set_input_files("#detect-file-input", str(recording.path))
        wait_for_answer(page)
        assert shown_detections(page, "#detect-table tbody tr") == expected["detections"]
        assert f"3 keyword(s) in {expected['duration_s']:g} s, found by run {expected['run']}" in page.inner_text("#detect-summary")
        assert canvas_is_drawn(page, "detect-waveform")
        # Each keyword's span ends in a solid line of its label's colour where the API says it was heard.
        marked = page.evaluate(
            """([detections, duration]) => {
                const c = document.getElementById("detect-waveform"), g = c.getContext("2d");
                return detections.map(d => {
                    const x = Math.floor(c.width * d.end_s / duration);
                    const [r, gr, b] = g.getImageData(x, c.height - 30, 1, 1).data;
                    const hex = "#" + [r, gr, b].map(v => v.toString(16).padStart(2, "0")).join("");
                    return hex === labelColor(d.label);
                });
            }""",
            [expected["detections"], expected["duration_s"]],
        )
        assert marked == [True] * 3


def test_listen_shows_the_three_keywords_of_the_microphone_in_order(detect_site, keyword_clips, tmp_path):
    # Chromium loops the file: a long quiet tail, so the words come once before Stop.
    microphone = keyword_recording(tmp_path / "microphone.wav", keyword_clips, seconds=60.0)
    whole = detect_through_the_api(detect_site[0], microphone)
    with chromium(microphone.path) as browser, open_page(browser, detect_site[1], "listen") as page:
        page.fill("#detect-threshold", str(THRESHOLD))
        page.click("#listen-button")
        page.wait_for_selector("body[data-listening=on]")
        page.wait_for_function("document.querySelectorAll('#listen-detections .detection').length >= 3",
                               timeout=90_000)  # fmt: skip
        page.wait_for_timeout(2500)  # the chunks after the last word: a duplicate would show now
        page.click("#listen-stop")
        page.wait_for_selector("body[data-listening=stopped]")
        shown = shown_detections(page, "#listen-detections .detection")
        assert [d["label"] for d in shown] == list(microphone.words), shown
        # Times are the listening session's (chunk offset + time in the chunk): as far apart as in the
        # whole recording (when Chromium started playing it is not known to the page).
        listened = np.diff([d["end_s"] for d in shown])
        assert np.all(np.abs(listened - np.diff([d["end_s"] for d in whole["detections"]])) < 0.3), (shown, whole)
        assert all(d["score"] > THRESHOLD for d in shown)
        assert canvas_is_drawn(page, "listen-timeline")
        assert "3 keyword(s)" in page.inner_text("#listen-status")
        assert page.is_hidden("#listen-stop") and page.is_visible("#listen-button")
        # The picture of README (docs/web-listen.png): the detection cards and the timeline.
        top = page.locator(".detect-inputs").bounding_box()
        bottom = page.locator("#listen-result").bounding_box()
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "web-listen-timeline.png"),
                        clip={"x": bottom["x"] - 8, "y": top["y"] - 8, "width": bottom["width"] + 16,
                              "height": bottom["y"] + bottom["height"] - top["y"] + 16})  # fmt: skip
