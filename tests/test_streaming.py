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


def test_short_validation_audio_allows_one_false_accept_not_zero():
    assert streaming.calibration_limit(1.0, hours=0.2) == 5.0  # 12 minutes: one false accept is 5 an hour
    assert streaming.calibration_limit(1.0, hours=2.0) == 1.0  # long enough to tell the target itself
    assert streaming.calibration_limit(0.0, hours=0.0) == 0.0
    # One stubborn false accept up to 0.94 would otherwise push the threshold where no keyword is found.
    curve = [{"threshold": 0.8, "false_accepts_per_hour": 10.0}, {"threshold": 0.82, "false_accepts_per_hour": 5.0},
             {"threshold": 0.94, "false_accepts_per_hour": 5.0}, {"threshold": 0.96, "false_accepts_per_hour": 0.0}]
    assert streaming.choose_threshold(curve, streaming.calibration_limit(1.0, hours=0.2)) == 0.82
    assert streaming.choose_threshold(curve, 1.0) == 0.96


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
    # No synthetic voices here: each split's babble is made of its own _unknown_ clips, as long as the noise.
    assert stored["babble"]["test"]["source"] == "_unknown_" and stored["babble"]["test"]["clips"] > 0
    assert test["babble_minutes"] == 2.0 and test["babble_false_accepts_per_hour"] is not None
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


# --- babble: speech that is no keyword -------------------------------------------------


def _speech_clips(count: int, seed: int = 0, level: float = 2000.0) -> np.ndarray:
    """One-second clips of noise bursts (0.3–0.7 s, starting 0.1–0.3 s in) standing for words, silent around them."""
    rng = np.random.default_rng(seed)
    clips = np.zeros((count, RATE), np.int16)
    for row in range(count):
        start, length = int(rng.uniform(0.1, 0.3) * RATE), int(rng.uniform(0.3, 0.7) * RATE)
        clips[row, start : start + length] = np.clip(rng.standard_normal(length) * level, -32767, 32767)
    return clips


def test_babble_stream_adds_overlapping_voices_over_the_noise():
    clips = _speech_clips(12)
    background = np.random.default_rng(2).uniform(-0.05, 0.05, 3 * RATE).astype(np.float32)
    stream = streaming.babble_stream(clips, background, RATE, 40.0, seed=4)
    assert stream.words == () and stream.duration_s == 40.0
    audio = stream.render(0, stream.length)
    # The audio is the noise plus every placed clip, faded at its edges, at its gain, overlaps added up.
    noise = dataclasses.replace(stream, clip_offsets=np.zeros(0, np.int64))
    expected = noise.render(0, stream.length).astype(np.float64)
    envelope = streaming._envelope(RATE, int(streaming.CLIP_RAMP_S * RATE))
    for row, offset, gain in zip(stream.clip_rows, stream.clip_offsets, stream.clip_gains, strict=True):
        expected[offset : offset + RATE] += clips[row] / 32768.0 * gain * envelope
    assert np.abs(expected).max() < 1.0  # nothing clipped, so the sum is exact
    np.testing.assert_allclose(audio, expected, atol=1.0 / 32768)
    # Dense speech in up to three voices: how many clips' speech covers each 10 ms.
    starts, ends = streaming._speech_extents(clips, RATE)
    talking = np.zeros(stream.length // 160, np.int64)
    for row, offset in zip(stream.clip_rows, stream.clip_offsets, strict=True):
        talking[(offset + starts[row]) // 160 : (offset + ends[row]) // 160] += 1
    assert talking.max() == 3 and np.mean(talking >= 2) > 0.2 and np.mean(talking >= 1) > 0.9
    decibels = 20 * np.log10(stream.clip_gains)
    assert np.all((decibels <= 0.0) & (decibels >= -20.0)) and np.sum(decibels < -6.0) > 10
    # Blocks give the same audio; the same seed the same stream; one voice never overlaps itself.
    np.testing.assert_array_equal(np.concatenate(list(stream.blocks(block_seconds=7.3))), audio)
    again = streaming.babble_stream(clips, background, RATE, 40.0, seed=4)
    np.testing.assert_array_equal(again.render(0, again.length), audio)
    alone = streaming.babble_stream(clips, background, RATE, 40.0, seed=4, voices=(1, 1))
    spans = sorted((offset + starts[row], offset + ends[row])
                   for row, offset in zip(alone.clip_rows, alone.clip_offsets, strict=True))
    gaps = [later - earlier for (_, earlier), (later, _) in zip(spans, spans[1:], strict=False)]
    assert len(spans) > 40 and 0 <= min(gaps) and max(gaps) <= 0.2 * RATE  # speech after speech, never on itself


def test_stream_metrics_count_the_babble():
    counts = StreamCounts(keywords=10, other_words=2, matched=9, correct=8, wrong=1, false_positives=3)
    # 60 s of words, 540 s of noise, 300 s of babble: 4 + 3 + 5 false accepts in a quarter hour.
    figures = stream_metrics(counts, 60.0, 3, 540.0, babble_detections=5, babble_seconds=300.0)
    assert figures["false_accepts_per_hour"] == 48.0
    assert figures["noise_false_accepts_per_hour"] == 20.0 and figures["babble_false_accepts_per_hour"] == 60.0
    assert figures["babble_detections"] == 5 and figures["babble_minutes"] == 5.0
    assert stream_metrics(counts, 60.0, 3, 540.0)["babble_false_accepts_per_hour"] is None


class _EnergyScorer:
    """A detector that says "yes" as loud as the window is (20 ms frames of RMS): it fires on any speech."""

    labels = tuple(LABELS)
    sample_rate = RATE
    frame_stride_samples = frame_length_samples = 320
    window_frames = 50
    window_samples = RATE
    frame_width = 1

    def frames(self, samples: np.ndarray) -> np.ndarray:
        count = len(samples) // 320
        return np.sqrt(np.mean(np.square(samples[: count * 320].reshape(count, 320)), axis=1, keepdims=True))

    def score(self, windows: np.ndarray) -> np.ndarray:
        loudness = np.clip(windows.mean(axis=(1, 2)) / 0.25, 0.0, 0.99)
        probabilities = np.zeros((len(windows), len(LABELS)), np.float32)
        probabilities[:, 0], probabilities[:, LABELS.index("yes")] = 1.0 - loudness, loudness
        return probabilities


def _keyword_clips(count: int) -> np.ndarray:
    """Loud "yes" clips: a tone over most of the second, far louder than the babble."""
    clips = np.zeros((count, RATE), np.int16)
    tone = np.sin(2 * np.pi * 440 * np.arange(int(0.9 * RATE)) / RATE)
    clips[:, int(0.05 * RATE) : int(0.95 * RATE)] = (tone * 20000).astype(np.int16)
    return clips


def _evaluate(tmp_path, evaluation, babble=None):
    settings = streaming.StreamingSettings(stream_seconds=30.0, noise_seconds=30.0, babble_seconds=30.0,
                                           background_volume=0.1, time_tolerance_s=0.75,
                                           target_false_accepts_per_hour=1.0, seed=0)
    background = np.random.default_rng(3).uniform(-0.01, 0.01, 3 * RATE).astype(np.float32)
    return streaming.evaluate(_EnergyScorer(), LABELS, evaluation, background, RATE, settings,
                              detect.DetectSettings(hop_ms=20.0), tmp_path / "det.png", babble=babble)


def test_babble_false_accepts_raise_the_calibrated_threshold(tmp_path):
    yes = LABELS.index("yes")
    keywords = {split: (_keyword_clips(6), np.full(6, yes)) for split in ("validation", "testing")}
    quiet = _evaluate(tmp_path, keywords)  # no _unknown_ clips and none given: no babble
    assert quiet["babble"]["validation"] == {"source": None, "clips": 0}
    assert quiet["validation"]["babble_minutes"] == 0.0
    assert quiet["validation"]["babble_false_accepts_per_hour"] is None
    babble = {split: _speech_clips(20, seed=seed, level=6000.0) for seed, split in enumerate(("validation", "testing"))}
    loud = _evaluate(tmp_path, keywords, babble)
    assert loud["babble"]["validation"] == {"source": "given", "clips": 20}
    assert loud["threshold"] > quiet["threshold"]
    # At the threshold chosen without babble, the babble fires: the combined curve is past the target there.
    limit = loud["calibrated_false_accepts_per_hour"]  # 1.5 minutes a split: one false accept is 40 an hour
    assert limit == 40.0 and quiet["calibrated_false_accepts_per_hour"] == 60.0
    row = next(row for row in loud["det_curve"] if row["threshold"] == quiet["threshold"])
    assert row["validation"]["false_accepts_per_hour"] > limit
    validation = loud["validation"]
    assert validation["babble_minutes"] == 0.5 and validation["false_accepts_per_hour"] <= limit
    assert validation["babble_detections"] <= 1
    assert validation["correct"] == validation["keywords"] > 0  # the keywords are still found above the babble
    assert (tmp_path / "det.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_babble_falls_back_to_the_splits_unknown_clips(tmp_path):
    yes, unknown = LABELS.index("yes"), LABELS.index("_unknown_")
    evaluation = {split: (np.concatenate([_keyword_clips(4), _speech_clips(5, seed=number, level=6000.0)]),
                          np.array([yes] * 4 + [unknown] * 5))
                  for number, split in enumerate(("validation", "testing"))}
    results = _evaluate(tmp_path, evaluation, {"validation": _speech_clips(7, seed=5, level=6000.0)})
    assert results["babble"] == {"validation": {"source": "given", "clips": 7},
                                 "test": {"source": "_unknown_", "clips": 5}}
    test = results["test"]
    assert test["babble_minutes"] == 0.5 and test["babble_false_accepts_per_hour"] is not None
    babble, _, count = streaming.split_babble(*evaluation["testing"], LABELS, np.zeros(0, np.float32), RATE,
                                              streaming.StreamingSettings(30.0, 30.0, 30.0, 0.1, 0.75, 1.0, 0), seed=2)
    assert count == 5 and babble.words == () and len(babble.clips) == 5 and len(babble.noise_offsets) == 0
    assert set(babble.clip_rows) == set(range(5))
