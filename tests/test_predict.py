"""Predictor on a real trained run: any wav in, top-k out; the request rules shared by API and CLI."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time

import numpy as np
import pytest
import soundfile

from speechclas import rundir
from speechclas.audio import AudioError, decode_audio, fix_length
from speechclas.cli import predict_main
from speechclas.fetch import FetchError
from speechclas.limits import Limits
from speechclas.predict import (
    InputError,
    Predictor,
    PredictorCache,
    choose_window,
    feature_sizes,
    predict_request,
    run_sample_rate,
)
from speechclas.rundir import API_REASON, NEWEST_REASON, RunDir, RunNotFoundError, ServedRunCache
from tests.conftest import demo_clip, wav_bytes
from tests.http_server import respond, serve_directory


@pytest.fixture(scope="module")
def predictor(trained_run):
    return Predictor.load(trained_run)


@pytest.fixture(scope="module")
def clip():
    """A demo word, padded to the model's 1 s window."""
    samples, rate = soundfile.read(demo_clip("yes"), dtype="float32")
    assert rate == 16000
    return fix_length(samples, 16000)


def predict_bytes(predictor, data: bytes, top_k: int = 5):
    return predictor.predict(decode_audio(data, predictor.settings.sample_rate), top_k)


def probabilities(result) -> dict[str, float]:
    return {p["label"]: p["probability"] for p in result["predictions"]}


def test_predictor_takes_labels_and_window_from_the_run(predictor, trained_run):
    assert predictor.labels == trained_run.labels()
    assert predictor.labels[:2] == ["_silence_", "_unknown_"]
    assert predictor.settings.desired_samples == 16000
    assert predictor.settings.sample_rate == 16000


def test_top5_of_a_demo_clip(predictor, trained_run, clip):
    result = predict_bytes(predictor, wav_bytes(clip, 16000))
    scores = [p["probability"] for p in result["predictions"]]
    assert len(scores) == 5
    assert scores == sorted(scores, reverse=True)
    assert all(0.0 <= s <= 1.0 for s in scores)
    assert {p["label"] for p in result["predictions"]} <= set(predictor.labels)
    assert result["run"] == trained_run.name
    assert result["sample_rate"] == 16000 and result["channels"] == 1
    assert result["duration_s"] == 1.0
    assert result["window"] == {"start_s": 0.0, "end_s": 1.0, "selection": "whole"}


def test_top_k_is_bounded_by_the_labels(predictor, clip):
    data = wav_bytes(clip, 16000)
    assert len(predict_bytes(predictor, data, top_k=3)["predictions"]) == 3
    every = predict_bytes(predictor, data, top_k=50)["predictions"]
    assert len(every) == len(predictor.labels)
    assert sum(p["probability"] for p in every) == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize(
    "subtype, file_format",
    [("PCM_24", "WAV"), ("PCM_32", "WAV"), ("FLOAT", "WAV"), ("PCM_16", "FLAC")],
)
def test_lossless_encodings_score_like_16_bit(predictor, clip, subtype, file_format):
    reference = probabilities(predict_bytes(predictor, wav_bytes(clip, 16000)))
    other = probabilities(predict_bytes(predictor, wav_bytes(clip, 16000, subtype, file_format)))
    assert other == pytest.approx(reference, abs=1e-5)


def test_stereo_is_mixed_to_mono(predictor, clip):
    reference = probabilities(predict_bytes(predictor, wav_bytes(clip, 16000)))
    result = predict_bytes(predictor, wav_bytes(np.stack([clip, clip], axis=1), 16000))
    assert result["channels"] == 2
    assert probabilities(result) == pytest.approx(reference, abs=1e-5)


@pytest.mark.parametrize("rate, subtype", [(8000, "PCM_U8"), (44100, "PCM_16"), (48000, "FLOAT")])
def test_other_rates_and_8_bit_are_resampled(predictor, clip, rate, subtype):
    import soxr

    result = predict_bytes(predictor, wav_bytes(soxr.resample(clip, 16000, rate), rate, subtype))
    assert result["sample_rate"] == rate
    assert result["duration_s"] == pytest.approx(1.0, abs=1e-3)
    assert sum(probabilities(result).values()) <= 1.0 + 1e-6


def test_long_clip_is_scored_on_its_loudest_window(predictor, clip):
    long_clip = np.zeros(3 * 16000, np.float32)
    long_clip[28000:44000] = clip  # the word starts at 1.75 s
    peak_s = (28000 + int(np.argmax(np.abs(clip)))) / 16000
    result = predict_bytes(predictor, wav_bytes(long_clip, 16000))
    window = result["window"]
    assert result["duration_s"] == 3.0
    assert window["selection"] == "loudest"
    assert window["end_s"] - window["start_s"] == pytest.approx(1.0)
    assert window["start_s"] <= peak_s <= window["end_s"]


def test_short_clip_is_padded(predictor, clip):
    result = predict_bytes(predictor, wav_bytes(clip[1000:10600], 16000))
    assert result["duration_s"] == 0.6
    assert result["window"] == {"start_s": 0.0, "end_s": 0.6, "selection": "padded"}


def test_windows_are_placed_as_training_places_clips():
    """A short clip is centred between zeros and a long one gives its loudest
    window: the same function (audio.place_in_window) that loads training clips."""
    short = np.ones(40, np.float32)
    window, where = choose_window(short, 100, sample_rate=100)
    assert window[:30].sum() == 0 and window[30:70].tolist() == [1.0] * 40 and window[70:].sum() == 0
    assert (where.start_s, where.end_s, where.selection) == (0.0, 0.4, "padded")
    long = np.zeros(500, np.float32)
    long[300:320] = 1.0
    window, where = choose_window(long, 100, sample_rate=100)
    assert where.selection == "loudest" and window.sum() == 20
    assert where.start_s <= 3.0 and where.end_s >= 3.2


def test_predictor_reads_model_json_and_older_runs_conf_json(trained_run, clip, tmp_path):
    """The run describes itself: without conf.json it loads from model.json;
    a run made before model.json existed loads from conf.json."""
    expected = Predictor.load(trained_run).probabilities(clip)
    without_conf = RunDir(shutil.copytree(trained_run.root, tmp_path / "new"))
    without_conf.conf_path.unlink()
    older = RunDir(shutil.copytree(trained_run.root, tmp_path / "old"))
    older.model_json_path.unlink()
    for run in (without_conf, older):
        assert run_sample_rate(run) == 16000
        assert feature_sizes(run) == feature_sizes(trained_run)
        np.testing.assert_allclose(Predictor.load(run).probabilities(clip), expected, atol=1e-6)


def test_cache_loads_a_run_once_and_again_when_replaced(trained_run):
    cache = PredictorCache(max_runs=1)
    first = cache.get(trained_run)
    assert cache.get(trained_run) is first
    stat = trained_run.done_path.stat()
    os.utime(trained_run.done_path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert cache.get(trained_run) is not first


_real_served_run = rundir.served_run


def _settled(folder):
    """Date the folder's last change 5 s back, as if that long had passed since (ServedRunCache.settle_ns)."""
    past = time.time_ns() - 5_000_000_000
    os.utime(folder, ns=(past, past))


def test_the_served_run_is_remembered_until_the_disk_changes_it(tmp_path, trained_run, monkeypatch):
    """The served run's choice is kept between requests and follows every change that decides it: a run
    folder appearing, its training finishing (a marker inside it, unseen in the folder's mtime),
    models/api arriving, being replaced by another copy, and losing its marker."""
    scans = []
    monkeypatch.setattr(rundir, "served_run", lambda *args: scans.append(args) or _real_served_run(*args))
    models = tmp_path / "models"
    old = RunDir(shutil.copytree(trained_run.root, models / "2020-01-01_000000"))
    cache, predictors = ServedRunCache(), PredictorCache()
    _settled(models)
    assert cache.get(models) == (old, NEWEST_REASON)
    assert cache.get(models) == (old, NEWEST_REASON) and len(scans) == 1  # remembered

    training = RunDir(shutil.copytree(trained_run.root, models / "2030-01-01_000000"))
    training.done_path.unlink()  # still training
    _settled(models)
    assert cache.get(models) == (old, NEWEST_REASON)
    training.mark_finished()  # the training finishes: models/'s mtime does not change
    assert cache.get(models) == (training, NEWEST_REASON)

    api = RunDir(shutil.copytree(trained_run.root, models / "api"))
    _settled(models)
    assert cache.get(models) == (api, API_REASON)
    first = predictors.get(cache.get(models)[0])
    shutil.rmtree(api.root)
    shutil.copytree(training.root, api.root)  # replaced by another run
    _settled(models)
    assert cache.get(models) == (api, API_REASON)
    assert predictors.get(cache.get(models)[0]) is not first  # loaded again
    api.done_path.unlink()
    assert cache.get(models) == (training, NEWEST_REASON)
    scans_before = len(scans)
    assert cache.get(models) == (training, NEWEST_REASON) and len(scans) == scans_before


def test_a_models_folder_changed_just_now_is_listed_again(tmp_path, trained_run, monkeypatch):
    """A change in the same clock tick as the listing would not move the folder's mtime: not trusted yet."""
    scans = []
    monkeypatch.setattr(rundir, "served_run", lambda *args: scans.append(args) or _real_served_run(*args))
    models = tmp_path / "models"
    shutil.copytree(trained_run.root, models / "2020-01-01_000000")
    cache = ServedRunCache()
    cache.get(models)
    cache.get(models)
    assert len(scans) == 2
    _settled(models)
    cache.get(models)
    cache.get(models)
    assert len(scans) == 3


def test_no_served_run_is_not_remembered(tmp_path, trained_run):
    models = tmp_path / "models"
    models.mkdir()
    _settled(models)
    cache = ServedRunCache()
    with pytest.raises(RunNotFoundError, match="train one first"):
        cache.get(models)
    run = RunDir(shutil.copytree(trained_run.root, models / "2020-01-01_000000"))
    _settled(models)
    assert cache.get(models)[0] == run


# --- predict_request: what the API and the CLI both answer ---------------------------


def test_exactly_one_input_is_required(trained_run, tmp_path):
    models_dir = trained_run.root.parent
    with pytest.raises(InputError, match="send an audio file"):
        predict_request(PredictorCache(), models_dir)
    with pytest.raises(InputError, match="not both"):
        predict_request(PredictorCache(), models_dir, file=demo_clip(), url="http://example.org/a.wav")


def test_audio_limits_are_checked_before_the_model_is_loaded(trained_run, tmp_path):
    """The operator's bounds on duration and channels come from the header, before any decoding or TensorFlow."""
    cache = PredictorCache()
    models_dir = trained_run.root.parent
    short = Limits.defaults().replace(max_audio_seconds=0.25)
    with pytest.raises(AudioError, match=r"lasts 0\.\d s .* longest accepted is 0\.25 s .*SPEECHCLAS_MAX_AUDIO_SECONDS"):
        predict_request(cache, models_dir, file=demo_clip(), limits=short)
    stereo = tmp_path / "stereo.wav"
    stereo.write_bytes(wav_bytes(np.zeros((16000, 2), np.float32), 16000))
    with pytest.raises(AudioError, match="has 2 channels; at most 1 .*SPEECHCLAS_MAX_CHANNELS"):
        predict_request(cache, models_dir, file=stereo, limits=Limits.defaults().replace(max_channels=1))
    assert cache._loaded == {}


def test_no_trained_model_is_reported(tmp_path):
    with pytest.raises(RunNotFoundError, match="train one first"):
        predict_request(PredictorCache(), tmp_path / "models", file=demo_clip())


@pytest.fixture
def private_tmp(tmp_path, monkeypatch):
    """Route tempfile into a folder of this test, to see what a request leaves behind."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def test_url_is_fetched_and_scored_like_the_file(trained_run, private_tmp):
    models_dir = trained_run.root.parent
    cache = PredictorCache()
    from_file = predict_request(cache, models_dir, file=demo_clip("no"))
    with serve_directory(demo_clip("no").parent) as base:
        from_url = predict_request(
            cache, models_dir, url=f"{base}/{demo_clip('no').name}",
            limits=Limits.from_env({"SPEECHCLAS_ALLOW_PRIVATE_URLS": "1"}),
        )
    assert from_url == from_file
    assert list(private_tmp.iterdir()) == []


def test_loopback_url_is_refused_unless_allowed(trained_run):
    with serve_directory(demo_clip().parent) as base, pytest.raises(FetchError, match="loopback"):
        predict_request(PredictorCache(), trained_run.root.parent, url=f"{base}/{demo_clip().name}")


@pytest.mark.parametrize(
    "route, error, message",
    [
        (respond(b"<html>not audio</html>", headers={"Content-Type": "audio/wav"}), AudioError, "not a readable"),
        (respond(b"gone", status=404), FetchError, "HTTP 404"),
        (respond(b"\0" * 5000), FetchError, "larger than 4000 bytes"),
    ],
    ids=["not-audio", "http-404", "too-large"],
)
def test_bad_urls_are_refused(trained_run, private_tmp, route, error, message):
    routes = {"/clip.wav": route}
    with serve_directory(private_tmp, routes=routes) as base, pytest.raises(error, match=message):
        predict_request(
            PredictorCache(),
            trained_run.root.parent,
            url=f"{base}/clip.wav",
            limits=Limits.from_env({"SPEECHCLAS_ALLOW_PRIVATE_URLS": "1", "SPEECHCLAS_MAX_AUDIO_BYTES": "4000"}),
        )
    assert list(private_tmp.iterdir()) == []


# --- speechclas-predict ---------------------------------------------------------------


def test_cli_prints_the_api_json(trained_run, capsys):
    code = predict_main([str(demo_clip("go")), "--models-dir", str(trained_run.root.parent), "--top-k", "3"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["status"] == "ok" and result["run"] == trained_run.name
    assert len(result["predictions"]) == 3


def test_cli_predicts_a_url(trained_run, capsys, monkeypatch):
    monkeypatch.setenv("SPEECHCLAS_ALLOW_PRIVATE_URLS", "1")
    with serve_directory(demo_clip("go").parent) as base:
        code = predict_main([f"{base}/{demo_clip('go').name}", "--models-dir", str(trained_run.root.parent)])
    assert code == 0
    assert len(json.loads(capsys.readouterr().out)["predictions"]) == 5


def test_cli_reads_the_audio_limits_of_the_operator(trained_run, monkeypatch, caplog):
    monkeypatch.setenv("SPEECHCLAS_MAX_AUDIO_SECONDS", "0.25")
    assert predict_main([str(demo_clip()), "--models-dir", str(trained_run.root.parent)]) == 2
    assert "the longest accepted is 0.25 s (operator setting SPEECHCLAS_MAX_AUDIO_SECONDS)" in caplog.text


def test_cli_reports_a_bad_file(trained_run, tmp_path, caplog):
    not_audio = tmp_path / "notes.wav"
    not_audio.write_text("just text")
    assert predict_main([str(not_audio), "--models-dir", str(trained_run.root.parent)]) == 2
    assert "not a readable audio file" in caplog.text
    assert predict_main([str(demo_clip()), "--models-dir", str(trained_run.root.parent), "--run", "nope"]) == 2
    assert "not a run name" in caplog.text
