"""Streaming evaluation: generated streams, TF's matching, the calibrated threshold, the DET curve, and a training."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from speechclas import detect, streaming
from speechclas.streaming import ScoredStreams, StreamCounts, Word, count_matches, stream_metrics

from .conftest import DEMO_DATA, tiny_training_overrides

RATE = 16000
LABELS = ["_silence_", "_unknown_", "yes", "no", "up"]


def _rms(samples: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(samples, dtype=np.float64))))


def test_count_matches_follows_tf_streaming_accuracy():
    words = [Word("yes", 1.0, 2.0), Word("no", 4.0, 5.0), Word("_unknown_", 7.0, 8.0), Word("up", 10.0, 11.0)]
    found = [
        detect.Detection("yes", 1.3, 2.3, 0.9),  # correct
        detect.Detection("yes", 1.5, 2.5, 0.9),  # the same word again: wrong
        detect.Detection("no", 4.9, 5.9, 0.9),  # 0.9 s late, past the 0.75 s tolerance: false positive
        detect.Detection("up", 7.2, 8.2, 0.9),  # on an other word: wrong
        detect.Detection("up", 9.3, 10.3, 0.9),  # 0.7 s early: correct
        detect.Detection("no", 20.0, 21.0, 0.9),  # near nothing: false positive
    ]
    counts = count_matches(words, found, tolerance_s=0.75)
    assert counts == StreamCounts(keywords=3, other_words=1, matched=2, correct=2, wrong=2, false_positives=2)

    # 60 s of words and 540 s of noise with 3 detections: 7 false accepts in 1/6 hour.
    figures = stream_metrics(counts, stream_seconds=60.0, noise_detections=3, noise_seconds=540.0)
    assert figures["matched_percentage"] == figures["correct_percentage"] == 66.67
    assert figures["wrong_percentage"] == figures["false_positive_percentage"] == 66.67
    assert figures["false_reject_rate"] == 0.3333
    assert figures["false_accepts_per_hour"] == 42.0
    assert figures["noise_false_accepts_per_hour"] == 20.0


def test_a_wrong_label_on_a_keyword_is_wrong_and_a_reject():
    counts = count_matches([Word("yes", 1.0, 2.0)], [detect.Detection("no", 1.0, 2.0, 0.8)], tolerance_s=0.75)
    assert counts == StreamCounts(keywords=1, other_words=0, matched=1, correct=0, wrong=1, false_positives=0)
    assert stream_metrics(counts, 3600.0, 0, 0.0)["false_reject_rate"] == 1.0
    assert stream_metrics(counts, 3600.0, 0, 0.0)["noise_false_accepts_per_hour"] is None


def test_choose_threshold_is_the_lowest_meeting_the_target():
    curve = [{"threshold": t, "false_accepts_per_hour": fa} for t, fa in [(0.5, 9.0), (0.6, 3.0), (0.7, 1.0), (0.8, 0.0)]]
    assert streaming.choose_threshold(curve, 1.0) == 0.7
    assert streaming.choose_threshold(curve, 5.0) == 0.6
    assert streaming.choose_threshold(curve[:2], 1.0) == 0.6  # none meets it: the highest


def _synthetic_scores(seconds: float, hop_s: float, bumps: list[tuple[str, float, float]]):
    """Probabilities that are silence except for plateaus of (label, start_s, height) 1.2 s long."""
    times = np.arange(0.0, seconds, hop_s)
    probabilities = np.zeros((len(times), len(LABELS)), np.float32)
    probabilities[:, 0] = 1.0
    for label, start, height in bumps:
        inside = (times >= start) & (times < start + 1.2)
        probabilities[inside] = 0.0
        probabilities[inside, LABELS.index(label)] = height
        probabilities[inside, 0] = 1.0 - height
    return times, probabilities


@pytest.fixture
def synthetic_streams():
    """Ten keywords scored from 0.35 to 0.95 and noise blips scored from 0.3 to 0.75."""
    heights = np.linspace(0.35, 0.95, 10)
    words = [Word(["yes", "no", "up"][i % 3], 5.0 * i + 2.0, 5.0 * i + 3.0) for i in range(10)]
    settings = detect.DetectSettings(hop_ms=20.0)
    stream = _synthetic_scores(60.0, 0.02, [(w.label, w.start_s, h) for w, h in zip(words, heights, strict=True)])
    noise = _synthetic_scores(600.0, 0.02, [("yes", 10.0 + 60.0 * i, h) for i, h in enumerate(np.linspace(0.3, 0.75, 8))])
    return ScoredStreams(tuple(words), 60.0, stream, 600.0, noise), settings


def test_threshold_calibrated_on_synthetic_scores(synthetic_streams):
    scored, settings = synthetic_streams
    curve = streaming.sweep(scored, LABELS, settings, tolerance_s=0.75)
    threshold = streaming.choose_threshold(curve, target_false_accepts_per_hour=0.0)
    # The loudest noise blip (0.75) must be refused: the next threshold up.
    assert threshold == 0.76
    figures = scored.metrics(LABELS, dataclasses.replace(settings, threshold=threshold), 0.75)
    assert figures["noise_detections"] == 0 and figures["false_accepts_per_hour"] == 0.0
    assert figures["correct"] == 3  # the keywords scored 0.82, 0.88, 0.95
    # 660 s of audio: one false accept is 5.45 per hour. A target of 6 lets the 0.75 blip
    # through, so the threshold drops to just above the next one (0.69), and one keyword more is found.
    loose = streaming.choose_threshold(curve, target_false_accepts_per_hour=6.0)
    assert loose == 0.7
    figures = scored.metrics(LABELS, dataclasses.replace(settings, threshold=loose), 0.75)
    assert figures["noise_detections"] == 1 and figures["correct"] == 4


def test_det_curve_is_monotonic(synthetic_streams, tmp_path):
    scored, settings = synthetic_streams
    curve = streaming.sweep(scored, LABELS, settings, tolerance_s=0.75)
    false_accepts = [row["false_accepts_per_hour"] for row in curve]
    false_rejects = [row["false_reject_rate"] for row in curve]
    assert false_accepts == sorted(false_accepts, reverse=True) and false_accepts[0] > false_accepts[-1]
    assert false_rejects == sorted(false_rejects) and false_rejects[0] < false_rejects[-1]
    path = tmp_path / "det.png"
    streaming.save_det_curve({"validation": curve}, 0.8, 1.0, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _tone_clips(count: int) -> np.ndarray:
    """One-second clips, silent but for a 0.4 s tone in the middle whose loudness names the clip."""
    clips = np.zeros((count, RATE), np.int16)
    tone = np.sin(2 * np.pi * 440 * np.arange(int(0.4 * RATE)) / RATE)
    for row in range(count):
        clips[row, int(0.3 * RATE) : int(0.7 * RATE)] = (tone * 3000 * (row + 1)).astype(np.int16)
    return clips


def test_word_stream_places_the_clips_where_the_ground_truth_says():
    clips = _tone_clips(5)
    labels = ["yes", "no", "_unknown_", "up", "yes"]
    background = np.random.default_rng(0).uniform(-1, 1, 5 * RATE).astype(np.float32)
    stream = streaming.word_stream(clips, labels, background, RATE, 60.0, background_volume=0.02, seed=3)
    audio = stream.render(0, stream.length)
    assert len(audio) == 60 * RATE and np.abs(audio).max() <= 1.0
    starts = [word.start_s for word in stream.words]
    assert 15 <= len(starts) <= 30 and starts[-1] + 1.0 <= 60.0
    assert all(2.0 <= later - earlier <= 4.0 for earlier, later in zip(starts, starts[1:], strict=False))
    amplitude = 3000 * np.sqrt(0.5) / 32768
    used = []
    for word in stream.words:
        tone = audio[int((word.start_s + 0.35) * RATE) : int((word.start_s + 0.65) * RATE)]
        row = int(round(_rms(tone) / amplitude)) - 1  # the loudness names the clip
        assert 0 <= row < 5 and labels[row] == word.label
        used.append(row)
        before = audio[int((word.start_s + 0.05) * RATE) : int((word.start_s + 0.25) * RATE)]
        assert _rms(before) < 0.02  # only the quiet noise around the tone
    assert sorted(used[:5]) == [0, 1, 2, 3, 4]  # every clip once before any twice
    # Rendered in blocks, it is the same audio; and the same seed makes the same stream.
    np.testing.assert_array_equal(np.concatenate(list(stream.blocks(block_seconds=7.3))), audio)
    again = streaming.word_stream(clips, labels, background, RATE, 60.0, background_volume=0.02, seed=3)
    assert again.words == stream.words
    np.testing.assert_array_equal(again.render(0, again.length), audio)


def test_noise_stream_is_noise_at_varying_volume_and_no_words():
    background = np.random.default_rng(1).uniform(-0.5, 0.5, 3 * RATE).astype(np.float32)
    stream = streaming.noise_stream(background, RATE, 120.0, seed=5)
    assert stream.words == () and stream.duration_s == 120.0
    blocks = list(stream.blocks(block_seconds=10.0))
    assert len(blocks) == 12
    levels = [_rms(block[RATE // 2 : RATE]) for block in blocks]  # a half second inside one segment each
    assert min(levels) > 0 and max(levels) > 3 * min(levels)
    audio = np.concatenate(blocks)
    assert len(audio) == 120 * RATE and 0.05 < _rms(audio) < 0.3


def test_training_writes_streaming_metrics_and_det_curve(tmp_path):
    from speechclas.config import load_config
    from speechclas.train import train

    overrides = tiny_training_overrides(DEMO_DATA, tmp_path / "models")
    config = load_config({**overrides, "streaming_minutes": 1.0, "streaming_noise_minutes": 2.0,
                          "target_false_accepts_per_hour": 30.0})
    run = train(config, progress=False).run
    stored = json.loads(run.metrics_path.read_text())["streaming"]
    assert stored["threshold"] in streaming.THRESHOLDS
    assert stored["target_false_accepts_per_hour"] == 30.0
    test = stored["test"]
    assert test["keywords"] > 10 and test["stream_minutes"] == 1.0 and test["noise_minutes"] == 2.0
    assert test["correct"] + test["wrong"] + test["false_positives"] >= 0
    assert 0.0 <= test["false_reject_rate"] <= 1.0
    assert len(stored["det_curve"]) == len(streaming.THRESHOLDS)
    chosen = next(row for row in stored["det_curve"] if row["threshold"] == stored["threshold"])
    # The chosen threshold meets the target on validation, or is the highest one.
    assert (chosen["validation"]["false_accepts_per_hour"] <= 30.0
            or stored["threshold"] == max(streaming.THRESHOLDS))
    assert chosen["validation"]["false_accepts_per_hour"] == stored["validation"]["false_accepts_per_hour"]
    assert (run.stats / streaming.DET_CURVE_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert detect.default_threshold(run) == stored["threshold"]


def test_training_without_streaming_evaluation(tmp_path):
    from speechclas.config import load_config
    from speechclas.train import train

    config = load_config({**tiny_training_overrides(DEMO_DATA, tmp_path / "models"), "streaming_minutes": 0})
    run = train(config, progress=False).run
    assert "streaming" not in json.loads(run.metrics_path.read_text())
    assert not (run.stats / streaming.DET_CURVE_FILE).exists()
