"""Detection in long audio with a real trained model: keywords of generated streams and
their times, blocks against the whole, hours in bounded memory, the CLI and predict
``mode=detect`` through a real deepaas-run.

The model (ds_cnn, a few hundred steps on data/demo with wide time shifts, so it
knows a word anywhere in its window) is trained once for the module. The streams
are the run's held-out test clips placed every 2 to 4 s over the demo background
noise, with the time of each word known.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import threading
import zipfile
from pathlib import Path

import numpy as np
import psutil
import pytest
import requests
import soundfile

from speechclas import detect
from speechclas.api import schema as predict_response_schema
from speechclas.audio import AudioError, AudioLimits
from speechclas.cli import detect_main
from speechclas.data import read_split_list
from speechclas.detect import DetectError, Detection, DetectSettings
from speechclas.features import compute_features
from speechclas.limits import Limits
from speechclas.rundir import RunDir
from tests.conftest import DEMO_DATA, make_project_home
from tests.http_server import serve_directory
from tests.processes import free_port, running, serve_command, wait_until_serving

RATE = 16000
NOISE_GAIN = 0.05
TOLERANCE_S = 0.5


@pytest.fixture(scope="module")
def run(detection_run) -> RunDir:
    """ds_cnn on the demo data (tests/conftest.py), shared with the web page's detection tests."""
    return detection_run


@pytest.fixture(scope="module")
def scorer(run):
    return detect.load_scorer(run)


@pytest.fixture(scope="module")
def settings(scorer) -> DetectSettings:
    return DetectSettings.for_features(scorer.feature_settings)


@dataclasses.dataclass(frozen=True)
class Spoken:
    label: str
    centre_s: float  # the middle of the word's audible part


def background(seconds: float, seed: int = 0) -> np.ndarray:
    """The demo noise recordings end to end, repeated, at a low level."""
    noise = np.concatenate(
        [soundfile.read(path, dtype="float32")[0] for path in sorted((DEMO_DATA / "_background_noise_").glob("*.wav"))]
    )
    start = np.random.default_rng(seed).integers(len(noise))
    return np.resize(np.roll(noise, -start), int(seconds * RATE)) * NOISE_GAIN


def held_out_keywords(run: RunDir) -> list[tuple[str, np.ndarray]]:
    """The run's held-out clips of its wanted words, with their label."""
    labels = set(run.labels())
    return [(entry.example.word, soundfile.read(DEMO_DATA / entry.example.path, dtype="float32")[0])
            for entry in read_split_list(run.dataset_files / "test.txt") if entry.example.word in labels]  # fmt: skip


def recognised(scorer, clips, count: int) -> list[tuple[str, np.ndarray]]:
    """`count` clips of different words that the model, as a clip classifier, gets right
    with confidence: streams of these test how detection reports them, not the model's recall."""
    chosen = {}
    for label, clip in clips:
        if label in chosen:
            continue
        window = np.zeros(scorer.window_samples, np.float32)
        start = max(0, (len(window) - len(clip)) // 2)
        window[start : start + len(clip)] = clip[: len(window)]
        _, probabilities = detect.stream_scores(scorer, [window], DetectSettings(hop_ms=20))
        if probabilities[0, scorer.labels.index(label)] > 0.95:
            chosen[label] = clip
        if len(chosen) == count:
            return list(chosen.items())
    raise AssertionError(f"the model recognises fewer than {count} different words of {len(clips)} clips")


def keyword_stream(clips, seed: int) -> tuple[np.ndarray, list[Spoken]]:
    """`clips` placed every 2 to 4 s (from 1 s on) over background noise, and what was said when."""
    rng = np.random.default_rng(seed)
    starts = 1.0 + np.concatenate([[0.0], np.cumsum(rng.uniform(2.0, 4.0, len(clips) - 1))])
    stream = background(starts[-1] + 2.0, seed)
    spoken = []
    for (label, clip), start in zip(clips, starts, strict=True):
        first = int(start * RATE)
        stream[first : first + len(clip)] += clip
        loud = np.flatnonzero(np.abs(clip) > 0.1 * np.abs(clip).max())
        spoken.append(Spoken(label, start + (loud[0] + loud[-1]) / 2 / RATE))
    return stream, spoken


def matched(detections: list[Detection], spoken: list[Spoken]) -> list[float]:
    """Time errors of the words found: a detection of the same label whose window's
    centre lies within TOLERANCE_S of the word's centre, each detection used once."""
    unused = list(detections)
    errors = []
    for word in spoken:
        candidates = [d for d in unused if d.label == word.label
                      and abs((d.start_s + d.end_s) / 2 - word.centre_s) <= TOLERANCE_S]  # fmt: skip
        if candidates:
            best = min(candidates, key=lambda d: abs((d.start_s + d.end_s) / 2 - word.centre_s))
            unused.remove(best)
            errors.append((best.start_s + best.end_s) / 2 - word.centre_s)
    return errors


def write_wav(path: Path, samples: np.ndarray) -> Path:
    soundfile.write(path, samples, RATE, subtype="PCM_16")
    return path


# --- features and windows -------------------------------------------------------------


def test_windows_of_the_stream_features_are_the_features_of_each_window(scorer, settings):
    fs = scorer.feature_settings
    stream = background(5.0) + np.random.default_rng(1).normal(0, 0.05, 5 * RATE).astype(np.float32)
    frames = scorer.frames(stream)
    hop_frames = settings.hop_frames(fs.window_stride_samples, RATE)
    hop = hop_frames * fs.window_stride_samples
    for window in (0, 1, 17, (len(stream) - fs.desired_samples) // hop):
        alone = compute_features(stream[None, window * hop : window * hop + fs.desired_samples], fs).numpy()
        sliced = frames[window * hop_frames : window * hop_frames + fs.spectrogram_length]
        np.testing.assert_allclose(sliced, alone[0, :, :, 0], rtol=1e-5, atol=1e-5)


def test_old_exports_without_the_features_signature_score_each_windows_audio_alike(run, scorer, settings):
    import tensorflow as tf

    from speechclas.export import AUDIO_SIGNATURE

    audio_scorer = detect.AudioScorer(run.labels(), scorer.feature_settings,
                                      tf.saved_model.load(str(run.saved_model_dir)).signatures[AUDIO_SIGNATURE])  # fmt: skip
    stream, _ = keyword_stream(held_out_keywords(run)[:3], seed=2)
    times, probabilities = detect.stream_scores(scorer.per_window(), [stream], settings)
    old_times, old_probabilities = detect.stream_scores(audio_scorer, [stream], settings)
    np.testing.assert_array_equal(times, old_times)
    np.testing.assert_allclose(probabilities, old_probabilities, atol=1e-4)


def test_the_windows_end_every_hop_and_a_short_stream_is_one_padded_window(scorer, settings):
    times, probabilities = detect.stream_scores(scorer, [background(3.0)], settings)
    assert times[0] == pytest.approx(1.0) and np.diff(times) == pytest.approx(settings.hop_ms / 1000)
    assert times[-1] <= 3.0 < times[-1] + settings.hop_ms / 1000
    assert probabilities.shape == (len(times), len(scorer.labels)) and probabilities.dtype == np.float32
    short_times, short = detect.stream_scores(scorer, [background(0.3)], settings)
    assert short_times.tolist() == [1.0] and short.shape == (1, len(scorer.labels))


def test_a_hop_that_is_not_a_multiple_of_the_frame_stride_is_refused(scorer):
    with pytest.raises(DetectError, match="hop_ms 25 is not a multiple of the model's frame stride of 10 ms"):
        detect.stream_scores(scorer, [background(2.0)], DetectSettings(hop_ms=25))
    with pytest.raises(DetectError, match="threshold must be between 0 and 1"):
        DetectSettings(hop_ms=20, threshold=1.5)


# --- detections -------------------------------------------------------------------------


def test_finds_most_keywords_of_a_stream_at_their_time(run, scorer, settings):
    clips = held_out_keywords(run)
    stream, spoken = keyword_stream(clips, seed=3)
    detections = detect.detect(*detect.stream_scores(scorer, [stream], settings), scorer.labels, settings)
    errors = matched(detections, spoken)
    # Chance: a detection of a random label at a random time matches a word of its label
    # within ±0.5 s about 1 time in 30 (one word per 3 s, 10 labels). This model finds ~70 %.
    assert len(errors) >= 0.5 * len(spoken), (len(errors), len(spoken), detections)
    assert len(errors) >= 0.8 * len(detections), "most detections are words that were said"
    assert max(abs(error) for error in errors) <= TOLERANCE_S
    assert [d.end_s for d in detections] == sorted(d.end_s for d in detections)
    assert all(d.end_s - d.start_s == pytest.approx(1.0) and settings.threshold < d.score <= 1.0 for d in detections)


def test_noise_alone_gives_few_detections(scorer, settings):
    stream = background(120.0, seed=4)
    stream[RATE * 60 :] *= 4  # the second minute louder than training's background
    detections = detect.detect(*detect.stream_scores(scorer, [stream], settings), scorer.labels, settings)
    assert len(detections) <= 2, detections


@pytest.mark.parametrize("chunk_frames", [None, 300], ids=["default", "trunk-chunks-of-3s"])
def test_blocks_give_exactly_the_detections_of_the_whole(run, scorer, settings, monkeypatch, chunk_frames):
    if chunk_frames is not None:  # the shared trunk's chunks end inside the stream, and inside blocks
        monkeypatch.setattr(detect, "SHARED_TRUNK_CHUNK_FRAMES", chunk_frames)
    stream, spoken = keyword_stream(held_out_keywords(run)[:8], seed=5)
    whole = detect.stream_scores(scorer, [stream], settings)
    cuts = np.sort(np.random.default_rng(5).choice(len(stream), 40, replace=False))
    sizes = np.diff(np.concatenate([[0], cuts, [len(stream)]]))
    assert sizes.min() < 480 < sizes.max(), "blocks both shorter and longer than one frame"
    blocked = detect.stream_scores(scorer, np.split(stream, cuts), settings)
    np.testing.assert_array_equal(whole[0], blocked[0])
    np.testing.assert_allclose(whole[1], blocked[1], rtol=0, atol=1e-6)
    found = detect.detect(*whole, scorer.labels, settings)
    assert found == detect.detect(*blocked, scorer.labels, settings)
    assert len(matched(found, spoken)) >= 4


def results(*rows) -> tuple[np.ndarray, np.ndarray]:
    """Per-hop probabilities (every 100 ms) of the labels _silence_, _unknown_, yes, no: rows of (hops, yes, no, unknown)."""
    probabilities = []
    for hops, yes, no, unknown in rows:
        probabilities += [[1.0 - yes - no - unknown, unknown, yes, no]] * hops
    probabilities = np.array(probabilities, np.float32)
    return 1.0 + 0.1 * np.arange(len(probabilities)), probabilities


LABELS = ("_silence_", "_unknown_", "yes", "no")
SMOOTHING = DetectSettings(hop_ms=100, average_window_ms=300, threshold=0.7, suppression_ms=1000, minimum_count=3)


@pytest.mark.parametrize(
    "rows, expected",
    [
        # A word held above the threshold fires once, when its average gets there (3 results).
        ([(10, 0, 0, 0), (20, 1, 0, 0), (10, 0, 0, 0)], [("yes", 2.2)]),
        # The same word again after it fell below the threshold: again, once suppression has passed.
        ([(10, 0, 0, 0), (5, 1, 0, 0), (10, 0, 0, 0), (5, 1, 0, 0), (10, 0, 0, 0)], [("yes", 2.2), ("yes", 3.7)]),
        # ... but not within suppression_ms of the first.
        ([(10, 0, 0, 0), (5, 1, 0, 0), (3, 0, 0, 0), (5, 1, 0, 0), (10, 0, 0, 0)], [("yes", 2.2)]),
        # Nor another word within suppression_ms; after it, yes.
        ([(10, 0, 0, 0), (5, 1, 0, 0), (4, 0, 1, 0), (8, 0, 0, 0), (5, 0, 1, 0)], [("yes", 2.2), ("no", 3.9)]),
        # _unknown_ and _silence_ are never reported; a word below the threshold neither.
        ([(10, 0, 0, 1), (10, 0, 0, 0), (10, 0.6, 0, 0)], []),
        # The first results (fewer than minimum_count) decide nothing.
        ([(2, 1, 0, 0), (10, 0, 0, 0)], []),
    ],
)
def test_smoothing_threshold_and_suppression(rows, expected):
    times, probabilities = results(*rows)
    found = detect.detect(times, probabilities, LABELS, SMOOTHING)
    assert [(d.label, round(d.end_s, 3)) for d in found] == expected
    assert all(d.start_s == pytest.approx(d.end_s - 1.0) for d in found)


def test_the_calibrated_threshold_of_a_run_is_its_default(tmp_path):
    run = RunDir(tmp_path)
    assert detect.default_threshold(run) == 0.7  # no metrics
    run.stats.mkdir()
    run.metrics_path.write_text(json.dumps({"accuracy": 0.9, "streaming": {"threshold": 0.83}}))
    assert detect.default_threshold(run) == 0.83
    run.metrics_path.write_text(json.dumps({"streaming": {"threshold": "high"}}))
    assert detect.default_threshold(run) == 0.7


# --- hours of audio -------------------------------------------------------------------


def test_a_two_hour_file_in_bounded_memory(run, scorer, tmp_path):
    """2 h of 16-bit wav (230 MB on disk, 460 MB as float32) scanned with the RSS growth
    sampled all along; at a 250 ms hop without averaging to keep the test short
    (the memory is the blocks', whatever the hop)."""
    clips = recognised(scorer, held_out_keywords(run), 6)
    path = tmp_path / "two_hours.wav"
    minute = background(60.0, seed=6)
    placed = {}  # minute -> clip
    with soundfile.SoundFile(path, "w", RATE, 1, "PCM_16") as out:
        for index in range(120):
            chunk = minute.copy()
            if index % 20 == 10:
                label, clip = clips[len(placed)]
                chunk[30 * RATE : 30 * RATE + len(clip)] += clip
                placed[index] = label
            out.write(chunk)
    settings = DetectSettings(hop_ms=250, average_window_ms=0, minimum_count=1)
    process = psutil.Process()
    baseline = peak = process.memory_info().rss
    done = threading.Event()

    def sample():
        nonlocal peak
        while not done.wait(0.05):
            peak = max(peak, process.memory_info().rss)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        result = detect.detect_audio(scorer, path, settings, AudioLimits.from_limits().with_max_seconds(3 * 3600))
    finally:
        done.set()
        sampler.join()
    growth_mb = (max(peak, process.memory_info().rss) - baseline) / 2**20
    assert result["duration_s"] == 7200.0
    assert growth_mb < 300, f"RSS grew by {growth_mb:.0f} MB"
    found = {(int(d["end_s"] // 60), d["label"]) for d in result["detections"]}
    assert sum((minute, label) in found for minute, label in placed.items()) >= len(placed) // 2, result


# --- the command line and the API ------------------------------------------------------


@pytest.fixture(scope="module")
def three_keywords(run, scorer, tmp_path_factory) -> tuple[Path, list[Spoken]]:
    """A 10 s wav: three held-out keywords."""
    stream, spoken = keyword_stream(recognised(scorer, held_out_keywords(run), 3), seed=7)
    return write_wav(tmp_path_factory.mktemp("three") / "three.wav", stream), spoken


def test_cli_prints_the_detections_json(run, three_keywords, capsys):
    path, spoken = three_keywords
    arguments = [str(path), "--models-dir", str(run.root.parent), "--run", run.name, "--hop-ms", "30"]
    assert detect_main(arguments) == 0  # the run's calibrated threshold by default
    assert json.loads(capsys.readouterr().out)["settings"]["threshold"] == detect.default_threshold(run)
    code = detect_main([*arguments, "--threshold", "0.7"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["run"] == run.name and result["duration_s"] == pytest.approx(len(soundfile.read(path)[0]) / RATE, abs=1e-3)
    assert result["settings"] == {"hop_ms": 30.0, "average_window_ms": 500.0, "threshold": 0.7,
                                  "suppression_ms": 1500.0, "minimum_count": 3}  # fmt: skip
    detections = [Detection(**d) for d in result["detections"]]
    assert len(matched(detections, spoken)) >= 2, result
    assert [d.label for d in detections] == [w.label for w in spoken], result


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda folder: folder / "missing.wav", "cannot read"),
        (lambda folder: (folder / "notes.wav").write_text("not audio") and folder / "notes.wav", "not a readable audio file"),
    ],
)
def test_cli_refuses_a_bad_file_in_one_line(run, tmp_path, capsys, caplog, make, message):
    code = detect_main([str(make(tmp_path)), "--models-dir", str(run.root.parent), "--no-progress"])
    assert code == 2
    assert capsys.readouterr().out == ""
    errors = [record for record in caplog.records if record.levelname == "ERROR"]
    assert len(errors) == 1 and message in errors[0].getMessage() and "\n" not in errors[0].getMessage()


def test_cli_refuses_a_hop_the_model_cannot_take(run, three_keywords, caplog):
    assert detect_main([str(three_keywords[0]), "--models-dir", str(run.root.parent), "--hop-ms", "15"]) == 2
    assert "hop_ms 15 is not a multiple of the model's frame stride of 10 ms" in caplog.text


CLIP_BYTES = 300_000  # SPEECHCLAS_MAX_AUDIO_BYTES of the server below: the 12 s recording (384 kB) is larger


@pytest.fixture(scope="module")
def server(tmp_path_factory, run):
    home = make_project_home(tmp_path_factory.mktemp("detect-home"), [run])
    log = home / "deepaas.log"
    port = free_port()
    env = {**os.environ, "SPEECHCLAS_HOME": str(home), "SPEECHCLAS_ALLOW_PRIVATE_URLS": "1",
           "SPEECHCLAS_MAX_AUDIO_BYTES": str(CLIP_BYTES), "TF_CPP_MIN_LOG_LEVEL": "2"}  # fmt: skip
    with running(serve_command(port, workers=1), env, home, log) as process:
        url = f"http://127.0.0.1:{port}"
        wait_until_serving(url, process, log)
        yield url


PREDICT = "/v2/models/speechclas/predict/"


def test_predict_mode_detect_through_a_real_deepaas_run(server, run, three_keywords):
    path, spoken = three_keywords
    assert path.stat().st_size > CLIP_BYTES
    upload = {"data": (path.name, path.read_bytes(), "audio/wav")}
    # 0.7 as the CLI test: the run's calibrated default (about 0.98) is tested there, and a small
    # CPU-trained model's smoothed scores reach it for some of the three words only.
    answer = requests.post(server + PREDICT, files=upload, data={"mode": "detect", "threshold": "0.7"}, timeout=120)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    predict_response_schema().load(body)
    assert body["status"] == "ok" and body["run"] == run.name and body["settings"]["hop_ms"] == 20.0
    assert body["settings"]["threshold"] == 0.7
    assert len(matched([Detection(**d) for d in body["detections"]], spoken)) >= 2, body
    assert body["labels"] == [d["label"] for d in body["detections"]]  # for the AI4OS UI's Label widget
    assert body["probabilities"] == [d["score"] for d in body["detections"]]

    with serve_directory(path.parent) as base:
        from_url = requests.post(server + PREDICT, data={"mode": "detect", "urls": f"{base}/{path.name}",
                                                         "threshold": "0.99", "hop_ms": "40"}, timeout=120)  # fmt: skip
    assert from_url.status_code == 200, from_url.text
    assert from_url.json()["settings"]["threshold"] == 0.99 and from_url.json()["settings"]["hop_ms"] == 40.0
    assert from_url.json()["duration_s"] == body["duration_s"]

    # The clip mode keeps its own, smaller bound on uploads; a bad hop is a 400 with its reason.
    clip = requests.post(server + PREDICT, files=upload, timeout=60)
    assert clip.status_code == 400 and f"the largest accepted is {CLIP_BYTES} bytes" in clip.json()["message"]
    bad_hop = requests.post(server + PREDICT, files=upload, data={"mode": "detect", "hop_ms": "25"}, timeout=60)
    assert bad_hop.status_code == 400 and "not a multiple" in bad_hop.json()["message"]
    unknown_mode = requests.post(server + PREDICT, files=upload, data={"mode": "stream"}, timeout=60)
    assert unknown_mode.status_code == 422
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as members:
        members.write(path, "yes/three.wav")
    zipped = requests.post(server + PREDICT, files={"data": ("clips.zip", archive.getvalue())},
                           data={"mode": "detect"}, timeout=60)  # fmt: skip
    assert zipped.status_code == 400 and "not an archive" in zipped.json()["message"]


def test_the_predict_response_schema_takes_both_shapes():
    from marshmallow import ValidationError

    answer = {"status": "ok", "run": "2026-01-01_000000", "duration_s": 3.0,
              "settings": dataclasses.asdict(DetectSettings(hop_ms=20)),
              "detections": [{"label": "yes", "start_s": 0.5, "end_s": 1.5, "score": 0.9}],
              "labels": ["yes"], "probabilities": [0.9]}  # fmt: skip
    assert predict_response_schema().load(answer) == answer
    with pytest.raises(ValidationError, match="labels"):  # what the AI4OS UI's Label widget reads
        predict_response_schema().load({key: value for key, value in answer.items() if key != "labels"})
    with pytest.raises(ValidationError, match="score"):
        predict_response_schema().load({**answer, "detections": [{"label": "yes", "start_s": 0.5, "end_s": 1.5}]})
    with pytest.raises(ValidationError, match="window"):  # a clip's answer still needs its own fields
        predict_response_schema().load({"status": "ok", "run": "r", "duration_s": 1.0, "predictions": [],
                                        "sample_rate": 16000, "channels": 1})  # fmt: skip


def test_the_detect_limits_are_operator_settings():
    limits = Limits.from_env({"SPEECHCLAS_DETECT_MAX_AUDIO_SECONDS": "600", "SPEECHCLAS_DETECT_MAX_AUDIO_BYTES": "5000"})
    assert (limits.detect_max_audio_seconds, limits.detect_max_audio_bytes) == (600.0, 5000)
    defaults = Limits.defaults()
    assert defaults.detect_max_audio_seconds == 3600.0 and defaults.detect_max_audio_bytes == 128 * 2**20
    assert defaults.client_max_size() > defaults.detect_max_audio_bytes > defaults.max_audio_bytes


def test_the_api_refuses_a_recording_above_the_detect_duration(run, three_keywords, tmp_path):
    with pytest.raises(AudioError, match=r"the longest accepted is 5 s \(operator setting SPEECHCLAS_DETECT_MAX_AUDIO_SECONDS\)"):
        detect.detect_request(detect.ScorerCache(), run.root.parent, file=three_keywords[0], run=run.name,
                              limits=Limits.defaults().replace(detect_max_audio_seconds=5.0))  # fmt: skip


# --- the shared trunk -----------------------------------------------------------------


def toy_feature_settings():
    from speechclas.config import load_config
    from speechclas.features import settings_from_config

    return settings_from_config(load_config({"data_dir": str(DEMO_DATA)}))


def toy_model(shape, padding: str, per_clip_normalisation: bool = False):
    """Two time-strided convolutions (stride 4 in all), a global mean named time_pool, a linear head."""
    import keras
    from keras import layers

    inputs = keras.Input(shape=shape)
    x = inputs
    if per_clip_normalisation:
        x = layers.Lambda(lambda t: t - keras.ops.mean(t, axis=1, keepdims=True))(x)
    x = layers.Conv2D(6, (5, 3), strides=(2, 2), padding=padding, activation="relu")(x)
    x = layers.DepthwiseConv2D((3, 3), strides=(2, 2), padding=padding, activation="relu")(x)  # equal: see bc_resnet
    x = layers.GlobalAveragePooling2D(name="time_pool")(x)
    outputs = layers.Dense(5)(x)
    model = keras.Model(inputs, outputs)
    rng = np.random.default_rng(0)
    model.set_weights([rng.normal(0, 0.3, w.shape).astype(np.float32) for w in model.get_weights()])
    return model


@pytest.mark.parametrize("hop_strides", [2, 3, 4])
def test_the_shared_trunk_equals_scoring_each_window_without_padding(monkeypatch, hop_strides):
    """With 'valid' convolutions a window's columns are the stream's columns: the two paths agree
    for hops that are a multiple of the trunk's stride (4), or not (one trunk pass per phase),
    over several trunk chunks."""
    monkeypatch.setattr(detect, "SHARED_TRUNK_CHUNK_FRAMES", 60)
    fs = toy_feature_settings()
    scorer = detect.keras_scorer(toy_model(fs.input_shape, "valid"), fs, [f"w{i}" for i in range(5)])
    assert isinstance(scorer, detect.SharedTrunkScorer) and scorer.time_stride == 4
    stream = background(6.0) + np.random.default_rng(1).normal(0, 0.1, 6 * RATE).astype(np.float32)
    settings = DetectSettings(hop_ms=10.0 * hop_strides)
    times, probabilities = detect.stream_scores(scorer, [stream], settings)
    reference_times, reference = detect.stream_scores(scorer.per_window(), [stream], settings)
    np.testing.assert_array_equal(times, reference_times)
    assert len(times) == 1 + (6 * RATE - fs.desired_samples) // (hop_strides * fs.window_stride_samples)
    np.testing.assert_allclose(probabilities, reference, rtol=0, atol=1e-5)


def test_the_shared_trunk_is_the_default_only_where_it_holds():
    """ds_cnn (a time_pool layer) gets the shared trunk, tiny_conv (a flattened window) and a
    trunk that normalises over the whole window get the per-window path."""
    from speechclas.architectures import build_model

    fs = toy_feature_settings()
    labels = [f"w{i}" for i in range(5)]
    ds_cnn = detect.keras_scorer(build_model("ds_cnn", fs.input_shape, 5, 0.0), fs, labels)
    assert isinstance(ds_cnn, detect.SharedTrunkScorer) and ds_cnn.time_stride == 4
    tiny_conv = detect.keras_scorer(build_model("tiny_conv", fs.input_shape, 5, 0.0), fs, labels)
    assert type(tiny_conv) is detect.FeatureScorer
    normalised = detect.keras_scorer(toy_model(fs.input_shape, "same", per_clip_normalisation=True), fs, labels)
    assert type(normalised) is detect.FeatureScorer

    import keras
    from keras import layers

    inputs = keras.Input(shape=fs.input_shape)  # a trunk bound to the window's length (a fixed reshape)
    x = layers.Reshape(fs.input_shape[:2])(inputs)
    x = layers.Conv1D(8, 3, padding="same")(x)
    outputs = layers.Dense(5)(layers.GlobalAveragePooling1D(name="time_pool")(x))
    fixed = detect.keras_scorer(keras.Model(inputs, outputs), fs, labels)
    assert type(fixed) is detect.FeatureScorer


def test_the_shared_trunk_of_the_trained_run_detects_what_each_window_detects(run, scorer, settings):
    """With 'same' padding the columns at a window's edges see the neighbouring frames instead of
    zeros: the probabilities differ a little, the detections hardly (figures in detect.py)."""
    assert isinstance(scorer, detect.SharedTrunkScorer)
    stream, spoken = keyword_stream(held_out_keywords(run), seed=3)
    fast = detect.stream_scores(scorer, [stream], settings)
    slow = detect.stream_scores(scorer.per_window(), [stream], settings)
    np.testing.assert_array_equal(fast[0], slow[0])
    difference = np.abs(fast[1] - slow[1]).max(axis=1)
    found_fast = detect.detect(*fast, scorer.labels, settings)
    found_slow = detect.detect(*slow, scorer.labels, settings)
    same = [d for d in found_fast if any(d.label == e.label and abs(d.end_s - e.end_s) <= 0.1 for e in found_slow)]
    # Median 0.02 on a CPU with oneDNN, 0.053 on one without (the trained weights differ a little).
    assert np.median(difference) <= 0.1, np.quantile(difference, [0.5, 0.99, 1.0])
    assert len(same) >= 0.8 * max(len(found_fast), len(found_slow)), (found_fast, found_slow)
    assert abs(len(matched(found_fast, spoken)) - len(matched(found_slow, spoken))) <= 0.1 * len(spoken)
