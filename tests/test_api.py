"""The real DEEPaaS application, built in-process by deepaas.api.get_app with our entry point.

Predictions and trainings run in DEEPaaS's spawned worker process, exactly as
under ``deepaas-run``, so every error below has made the trip back from the
worker. One app (one worker) serves the whole module.
"""

from __future__ import annotations

import asyncio
import io
import json
import pickle
import shutil
import time
import zipfile

import aiohttp
import numpy as np
import pytest
import pytest_asyncio
import soundfile
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from marshmallow import ValidationError

from speechclas import api
from speechclas.audio import fix_length
from speechclas.rundir import RunDir
from tests.conftest import (
    DEMO_DATA,
    demo_clip,
    make_project_home,
    tiny_training_overrides,
    wav_bytes,
)
from tests.http_server import respond, serve_directory, stream

pytestmark = pytest.mark.asyncio(loop_scope="module")

MODEL = "/v2/models/speechclas/"
PREDICT = MODEL + "predict/"
TRAIN = MODEL + "train/"
MAX_BYTES = 1_000_000  # SPEECHCLAS_MAX_AUDIO_BYTES of this app, small so "too large" is cheap


@pytest.fixture(scope="module")
def project_home(tmp_path_factory, trained_run):
    home = make_project_home(tmp_path_factory.mktemp("home"), [trained_run])
    shutil.copytree(DEMO_DATA, home / "data" / "demo")  # API trainings read inside data/ only
    return home


def _deepaas_worker_pools():
    """DEEPaaS keeps no public handle on its worker processes; the tests end them."""
    import deepaas.model

    executors = [wrapper._executor for wrapper in deepaas.model.V2_MODELS.values()]
    return [pool for executor in executors for pool in (*executor._free, *executor._working)]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def client(project_home):
    import deepaas.api
    from deepaas import config as deepaas_config

    with pytest.MonkeyPatch.context() as env:
        # Set before the app spawns its worker, which inherits them.
        env.setenv("SPEECHCLAS_HOME", str(project_home))
        env.setenv("SPEECHCLAS_ALLOW_PRIVATE_URLS", "1")
        env.setenv("SPEECHCLAS_MAX_AUDIO_BYTES", str(MAX_BYTES))
        deepaas_config.prepare_logging()
        deepaas_config.parse_args(["deepaas-run", "--model-name", "speechclas", "--workers", "1"])
        app = await deepaas.api.get_app()
        async with TestClient(TestServer(app)) as test_client:
            yield test_client
            pools = _deepaas_worker_pools()
        for pool in pools:
            pool.terminate()


@pytest.fixture(scope="module")
def clip():
    """A demo word, padded to the model's 1 s window."""
    samples, _ = soundfile.read(demo_clip("yes"), dtype="float32")
    return fix_length(samples, 16000)


@pytest.fixture(scope="module")
def audio_server(tmp_path_factory, clip):
    """A local HTTP server with a good clip, a text file, a 404 and a body that is too large."""
    folder = tmp_path_factory.mktemp("served")
    (folder / "yes.wav").write_bytes(demo_clip("yes").read_bytes())
    routes = {
        "/notes.wav": respond(b"these are notes, not audio", headers={"Content-Type": "audio/wav"}),
        "/missing.wav": respond(b"no such file", status=404),
        "/huge.wav": stream(MAX_BYTES + 1),
    }
    with serve_directory(folder, routes=routes) as base:
        yield base


async def post_predict(client, file: bytes | None = None, filename: str = "clip.wav", **fields):
    form = aiohttp.FormData()
    if file is not None:
        form.add_field("data", file, filename=filename, content_type="audio/wav")
    for name, value in fields.items():
        form.add_field(name, str(value))
    return await client.post(PREDICT, data=form)


async def predict_ok(client, **kwargs) -> dict:
    response = await post_predict(client, **kwargs)
    body = await response.json()
    assert response.status == 200, body
    return body


async def test_our_http_errors_survive_the_trip_from_the_worker():
    """DEEPaaS pickles what predict raises back from its worker; aiohttp's own errors cannot be
    unpickled (which hangs DEEPaaS's pool, #174), ours can and keep their status and message."""
    for error, status in ((api.BadRequest("the file is empty"), 400), (api.NotFound("no run 'x'"), 404)):
        copy = pickle.loads(pickle.dumps(error))
        assert (type(copy), copy.status, json.loads(copy.text)) == (type(error), status, {"message": error.message})
    with pytest.raises(TypeError):
        pickle.loads(pickle.dumps(web.HTTPBadRequest(text="the file is empty")))


# --- metadata, documentation -------------------------------------------------------------


async def test_metadata_names_the_package_and_the_served_model(client, trained_run):
    response = await client.get(MODEL)
    assert response.status == 200
    meta = await response.json()
    assert meta["name"] == "speechclas"
    assert meta["version"] and meta["author"] and meta["url"]
    assert meta["license"] == "Apache-2.0"
    assert meta["model"]["run"] == trained_run.name
    assert meta["model"]["labels"] == trained_run.labels()
    assert meta["model"]["settings"]["sample_rate"] == 16000
    assert meta["trainings"] == []  # none running


async def test_openapi_documents_the_arguments(client):
    spec = await (await client.get("/swagger.json")).json()
    predict_params = {p["name"]: p for p in spec["paths"][PREDICT]["post"]["parameters"]}
    assert predict_params["data"]["type"] == "file"
    assert {"urls", "run", "top_k"} <= set(predict_params)
    train_params = {p["name"]: p for p in spec["paths"][TRAIN]["post"]["parameters"]}
    assert train_params["model_architecture"]["enum"][0] == "conv"
    assert train_params["batch_size"]["type"] == "integer"
    assert train_params["batch_size"]["maximum"] == 4096
    assert train_params["how_many_training_steps"]["default"] == "3000,1000"
    assert "learning rate" in train_params["learning_rate"]["description"].lower()


# What the AI4OS platform's Gradio UI (ai4os/deepaas_ui, launch.py and ui_utils.py) reads of swagger.json:
# the properties of definitions.ModelPredictionResponse, each turned into an output by its type; with
# `labels` and `probabilities` among them it adds a classification (Label) widget.
UI_RENDERED_TYPES = {None, "string", "boolean", "integer", "number", "array", "object"}


async def test_swagger_names_the_answer_as_the_ai4os_ui_reads_it(client):
    spec = await (await client.get("/swagger.json")).json()
    answer = spec["paths"][PREDICT]["post"]["responses"]["200"]["schema"]
    assert answer == {"$ref": "#/definitions/ModelPredictionResponse"}
    properties = spec["definitions"]["ModelPredictionResponse"]["properties"]
    assert {"labels", "probabilities", "predictions"} <= set(properties)
    assert (properties["labels"]["items"]["type"], properties["probabilities"]["items"]["type"]) == ("string", "number")
    assert {name: field.get("type") for name, field in properties.items()
            if field.get("type") not in UI_RENDERED_TYPES} == {}  # fmt: skip
    # A string whose description names a medium would be shown as that medium (base64 expected).
    media = [name for name, field in properties.items() if field.get("type") == "string"
             and any(word in field.get("description", "").lower() for word in ("image", "audio", "video"))]  # fmt: skip
    assert media == []
    assert "application/json" in spec["paths"][PREDICT]["post"]["produces"]


async def test_the_schema_holds_each_answer_to_its_own_shape(client):
    body = await predict_ok(client, file=demo_clip("yes").read_bytes())
    for missing in ("labels", "probabilities", "predictions", "window"):
        with pytest.raises(ValidationError, match=missing):
            api.schema().load({key: value for key, value in body.items() if key != missing})
    with pytest.raises(ValidationError, match="probabilities"):
        api.schema().load({**body, "probabilities": ["high"]})


async def test_an_archive_answer_still_validates(client, trained_run):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("yes/a.wav", demo_clip("yes").read_bytes())
        archive.writestr("no/b.wav", demo_clip("no").read_bytes())
    body = await predict_ok(client, file=buffer.getvalue(), filename="clips.zip")
    assert api.schema().load(body)  # what DEEPaaS validated before answering
    assert body["run"] == trained_run.name and body["summary"]["files"] == 2
    assert [len(entry["predictions"]) for entry in body["files"]] == [5, 5]


# --- predictions ----------------------------------------------------------------------------


async def test_upload_answers_the_top5(client, trained_run, clip):
    body = await predict_ok(client, file=wav_bytes(clip, 16000))
    assert api.schema().load(body)  # what DEEPaaS validated before answering
    assert body["status"] == "ok"
    assert body["run"] == trained_run.name
    scores = [p["probability"] for p in body["predictions"]]
    assert len(scores) == 5 and scores == sorted(scores, reverse=True)
    assert {p["label"] for p in body["predictions"]} <= set(trained_run.labels())
    # The same, as the two lists the AI4OS platform's UI shows as a classification.
    assert body["labels"] == [p["label"] for p in body["predictions"]]
    assert body["probabilities"] == scores
    assert body["window"]["selection"] == "whole"
    assert (body["duration_s"], body["sample_rate"], body["channels"]) == (1.0, 16000, 1)


async def test_url_answers_like_the_upload(client, audio_server):
    from_upload = await predict_ok(client, file=demo_clip("yes").read_bytes())
    from_url = await predict_ok(client, urls=f"{audio_server}/yes.wav")
    assert from_url == from_upload


async def test_run_and_top_k_can_be_chosen(client, trained_run):
    body = await predict_ok(client, file=demo_clip("no").read_bytes(), run=trained_run.name, top_k=12)
    assert body["run"] == trained_run.name
    assert len(body["predictions"]) == 12


async def test_long_stereo_clip_is_scored_on_its_loudest_window(client, clip):
    import soxr

    word = soxr.resample(clip, 16000, 44100)
    long_clip = np.zeros(3 * 44100, np.float32)
    long_clip[44100 : 44100 + len(word)] = word  # the word fills the second second
    stereo = np.stack([long_clip, long_clip], axis=1)
    body = await predict_ok(client, file=wav_bytes(stereo, 44100, "PCM_24"))
    assert (body["duration_s"], body["sample_rate"], body["channels"]) == (3.0, 44100, 2)
    assert body["window"]["selection"] == "loudest"
    peak_s = 1.0 + int(np.argmax(np.abs(clip))) / 16000
    assert body["window"]["start_s"] <= peak_s <= body["window"]["end_s"]  # the window holds the word


def _truncated_wav(clip) -> bytes:
    return wav_bytes(clip, 16000)[:20000]


def _oversized_wav(clip) -> bytes:
    return wav_bytes(np.tile(clip, 40), 16000)  # 1.28 MB > MAX_BYTES


def _one_hz_wav(clip) -> bytes:
    """A decode bomb: 16000 bytes whose header says 1 Hz (16000 s of audio)."""
    data = bytearray(wav_bytes(clip, 16000, subtype="PCM_U8"))
    data[24:32] = (1).to_bytes(4, "little") * 2  # sample rate and byte rate
    return bytes(data)


def _nan_wav(clip) -> bytes:
    samples = clip.copy()
    samples[100] = np.nan
    return wav_bytes(samples, 16000, subtype="FLOAT")


# Every bad input of the spec's Errors section: (form fields, status, words of the message).
BAD_PREDICTIONS = {
    "no-file-no-url": (lambda clip, base: {}, 400, "send an audio file"),
    "file-and-url": (
        lambda clip, base: {"file": wav_bytes(clip, 16000), "urls": f"{base}/yes.wav"},
        400,
        "not both",
    ),
    "empty-file": (lambda clip, base: {"file": b""}, 400, "is empty"),
    "not-audio": (lambda clip, base: {"file": b"hello, this is text"}, 400, "not a readable audio file"),
    "truncated-wav": (lambda clip, base: {"file": _truncated_wav(clip)}, 400, "truncated wav"),
    "one-hz-wav": (lambda clip, base: {"file": _one_hz_wav(clip)}, 400, "SPEECHCLAS_MIN_SAMPLE_RATE"),
    "too-long": (lambda clip, base: {"file": wav_bytes(np.zeros(61 * 1000), 1000, subtype="PCM_U8")}, 400,
                 "the longest accepted is 60 s (operator setting SPEECHCLAS_MAX_AUDIO_SECONDS)"),
    "nan-samples": (lambda clip, base: {"file": _nan_wav(clip)}, 400, "not finite numbers"),
    # Above the clip bound, below mode=detect's (SPEECHCLAS_DETECT_MAX_AUDIO_BYTES): refused by the worker.
    "oversized-file": (lambda clip, base: {"file": _oversized_wav(clip)}, 400,
                       f"the largest accepted is {MAX_BYTES} bytes (operator setting SPEECHCLAS_MAX_AUDIO_BYTES"),
    "text-instead-of-file": (lambda clip, base: {"data": "yes.wav"}, 422, "must be an uploaded file"),
    "url-unreachable": (lambda clip, base: {"urls": "http://127.0.0.1:1/yes.wav"}, 400, "could not reach"),
    "url-not-audio": (lambda clip, base: {"urls": f"{base}/notes.wav"}, 400, "not a readable audio file"),
    "url-not-found": (lambda clip, base: {"urls": f"{base}/missing.wav"}, 400, "HTTP 404"),
    "url-too-large": (lambda clip, base: {"urls": f"{base}/huge.wav"}, 400, "larger than"),
    "url-not-http": (lambda clip, base: {"urls": "file:///etc/passwd"}, 422, "must be an http(s) URL"),
    "unknown-run": (
        lambda clip, base: {"file": wav_bytes(clip, 16000), "run": "2001-01-01_000000"},
        404,
        "there is no run",
    ),
    "top-k-zero": (lambda clip, base: {"file": wav_bytes(clip, 16000), "top_k": 0}, 422, "greater than"),
}


@pytest.mark.parametrize("case", BAD_PREDICTIONS, ids=list(BAD_PREDICTIONS))
async def test_bad_prediction_input_answers_4xx_with_a_message(client, audio_server, clip, case):
    make_fields, status, message = BAD_PREDICTIONS[case]
    response = await post_predict(client, **make_fields(clip, audio_server))
    body = await response.json()
    assert response.status == status, body
    assert message in str(body)
    if status != 422:  # ours; 422 is webargs' {"field": ["message"]}
        assert set(body) == {"message"}


async def test_huge_float_samples_are_clipped_not_a_500(client, clip):
    samples = clip.copy()
    samples[::2] = 1e30
    response = await post_predict(client, file=wav_bytes(samples, 16000, subtype="FLOAT"))
    assert response.status == 200, await response.text()
    assert len((await response.json())["predictions"]) == 5


async def test_prediction_before_any_model_exists(client, project_home, clip):
    models = project_home / "models"
    hidden = project_home / "models-hidden"
    models.rename(hidden)
    models.mkdir()
    try:
        response = await post_predict(client, file=wav_bytes(clip, 16000))
        body = await response.json()
        assert response.status == 404
        assert "no trained model yet" in body["message"] and "train one first" in body["message"]
        meta = await (await client.get(MODEL)).json()
        assert meta["model"] is None
    finally:
        models.rmdir()
        hidden.rename(models)


# --- training -------------------------------------------------------------------------------

BAD_TRAININGS = {
    "out-of-range": ({"batch_size": "0"}, "batch_size", "must be between 1 and 4096"),
    "not-a-choice": ({"model_architecture": "resnet"}, "model_architecture", "must be one of"),
    "not-a-number": ({"how_many_training_steps": "100,many"}, "how_many_training_steps", "must be an integer"),
    "not-a-bool": ({"check_nans": "maybe"}, "check_nans", "must be true or false"),
    "stages-mismatch": ({"learning_rate": "0.01"}, "learning_rate", "same number of stages"),
}


@pytest.mark.parametrize("case", BAD_TRAININGS, ids=list(BAD_TRAININGS))
async def test_wrong_training_argument_answers_422_before_any_work(client, case):
    params, field, message = BAD_TRAININGS[case]
    response = await client.post(TRAIN, params=params)
    body = await response.json()
    assert response.status == 422, body
    assert message in " ".join(body[field])
    assert await (await client.get(TRAIN)).json() == []  # nothing was started


# Trainings through the API are confined (speechclas.confine): each case of issue 8, on top of a
# legitimate tiny training, gets a 422 under the argument's name. "*": a rule over several
# parameters, reported with the first argument and naming them in its message.
TINY = {
    "data_dir": "data/demo",
    **{name: str(value) for name, value in tiny_training_overrides(DEMO_DATA, DEMO_DATA).items()
       if name not in ("data_dir", "models_dir")},
}  # fmt: skip
CONFINED = {
    "models_dir": ({"models_dir": "/tmp/anything"}, "models_dir", "Unknown field"),
    "data_dir-absolute": ({"data_dir": "/etc"}, "data_dir", "data_dir='/etc' is outside"),
    "data_dir-dotdot": ({"data_dir": "data/../../etc"}, "data_dir", "SPEECHCLAS_TRAIN_ROOTS"),
    "data_dir-link-out": ({"data_dir": "data/outside"}, "data_dir", "data_dir='data/outside' is outside"),
    "data_splits_dir": ({"data_splits_dir": "/etc"}, "data_splits_dir", "data_splits_dir='/etc' is outside"),
    "start_checkpoint": ({"start_checkpoint": "/etc/passwd"}, "start_checkpoint", "start_checkpoint='/etc/passwd'"),
    "data_url-loopback": ({"data_url": "http://127.0.0.1/x.tgz"}, "data_url", "loopback"),
    "data_url-localhost": ({"data_url": "http://localhost/"}, "data_url", "loopback"),
    "data_url-metadata": ({"data_url": "http://169.254.169.254/"}, "data_url", "link-local"),
    "data_url-file": ({"data_url": "file:///etc/passwd"}, "data_url", "only http:// and https://"),
    "clip-duration": ({"clip_duration_ms": "10000", "sample_rate": "48000", "window_size_ms": "1",
                       "window_stride_ms": "1"}, "clip_duration_ms", "SPEECHCLAS_MAX_CLIP_DURATION_MS"),
    "feature-cells": ({"clip_duration_ms": "3000", "sample_rate": "48000", "window_size_ms": "1",
                       "window_stride_ms": "1"}, "*", "from clip_duration_ms=3000, sample_rate=48000"),
    "label-newline": ({"wanted_words": "yes,n\no"}, "wanted_words", "contains '\\n'"),
    "label-slash": ({"wanted_words": "yes,../models"}, "wanted_words", "contains '/'"),
    "label-dotdot": ({"wanted_words": "yes,.."}, "wanted_words", "starts with '.'"),
    "labels-too-many": ({"wanted_words": ",".join(f"w{n}" for n in range(101))}, "wanted_words",
                        "SPEECHCLAS_MAX_LABELS"),
    "label-too-long": ({"wanted_words": "yes," + "x" * 65}, "wanted_words", "SPEECHCLAS_MAX_LABEL_CHARS"),
    "steps": ({"how_many_training_steps": "50001", "learning_rate": "0.001"}, "how_many_training_steps",
              "SPEECHCLAS_MAX_TRAIN_STEPS"),
    "batch": ({"batch_size": "2000"}, "batch_size", "batch_size=2000 is above this server's limit of 1024"),
}  # fmt: skip


@pytest.fixture
def link_out_of_data(project_home, tmp_path):
    """data/outside: a link inside the training roots to a folder outside them."""
    (tmp_path / "yes").mkdir()
    link = project_home / "data" / "outside"
    link.symlink_to(tmp_path, target_is_directory=True)
    yield
    link.unlink()


@pytest.mark.parametrize("case", CONFINED, ids=list(CONFINED))
async def test_a_confined_training_argument_answers_422_naming_it(client, case, link_out_of_data, monkeypatch):
    monkeypatch.delenv("SPEECHCLAS_ALLOW_PRIVATE_URLS")  # this app's predict tests allow them; trainings may not
    params, field, message = CONFINED[case]
    response = await client.post(TRAIN, params={**TINY, **params})
    body = await response.json()
    assert response.status == 422, body
    if field == "*":
        assert len(body) == 1 and message in next(iter(body.values()))[0], body
    else:
        assert list(body) == [field] and message in body[field][0], body
    assert await (await client.get(TRAIN)).json() == []  # nothing was started


async def test_swagger_does_not_offer_models_dir(client):
    spec = await (await client.get("/swagger.json")).json()
    names = {parameter["name"] for parameter in spec["paths"][TRAIN]["post"]["parameters"]}
    assert "data_dir" in names and "models_dir" not in names


async def test_a_training_over_the_memory_budget_answers_422(client, monkeypatch):
    monkeypatch.setenv("SPEECHCLAS_TRAIN_MEMORY_MB", "500")  # read by the validation, in this process
    response = await client.post(TRAIN, params=TINY)
    body = await response.json()
    assert response.status == 422, body
    assert len(body) == 1 and "above this server's budget of 500 MB (SPEECHCLAS_TRAIN_MEMORY_MB)" in str(body)
    assert await (await client.get(TRAIN)).json() == []


async def wait_for_training(client, uuid: str, timeout_s: float = 180, seen: list | None = None) -> dict:
    """The training's status once it no longer runs; `seen` gathers the metadata's "trainings" meanwhile."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if seen is not None:
            seen.append((await (await client.get(MODEL)).json())["trainings"])
        status = await (await client.get(TRAIN + uuid)).json()
        if status["status"] != "running":
            return status
        await asyncio.sleep(0.5)
    raise AssertionError(f"training {uuid} still running after {timeout_s} s")


async def test_failing_training_reports_why_and_keeps_the_models(client, project_home):
    before = sorted(p.name for p in (project_home / "models").iterdir())
    response = await client.post(TRAIN, params={"data_dir": "data/nowhere"})
    assert response.status == 200
    status = await wait_for_training(client, (await response.json())["uuid"])
    assert status["status"] == "error"
    assert "nowhere" in status["message"]
    assert sorted(p.name for p in (project_home / "models").iterdir()) == before


async def test_training_through_the_api_then_predicting_with_the_new_run(client, project_home, trained_run):
    response = await client.post(TRAIN, params=TINY)  # models_dir: the operator's, where predictions look
    started = await response.json()
    assert response.status == 200 and started["status"] == "running"

    seen = []
    status = await wait_for_training(client, started["uuid"], seen=seen)
    assert status["status"] == "done", status
    summary = status["result"]["output"]
    new_run = summary["run"]
    assert new_run != trained_run.name
    assert (project_home / "models" / new_run / "DONE").is_file()
    assert summary["labels"] == RunDir(project_home / "models" / new_run).labels()

    # While it ran, the metadata listed it (the worker's training, answered by the main process)
    # with its phase and step; once done, no longer.
    running = [trainings for trainings in seen if trainings]
    assert running, seen
    assert all(len(trainings) == 1 for trainings in running), running
    entries = [trainings[0] for trainings in running]
    assert {entry["phase"] for entry in entries} <= {"preparing", "training", "evaluating"}
    assert all(0 <= entry["step"] <= entry["total"] == 50 for entry in entries), entries
    assert all(entry["wanted_words"] == summary["labels"][2:] for entry in entries), entries
    assert all(entry["run"] in (None, new_run) and entry["elapsed_s"] >= 0 for entry in entries), entries
    order = [("preparing", "training", "evaluating").index(entry["phase"]) for entry in entries]
    assert order == sorted(order) and [e["step"] for e in entries] == sorted(e["step"] for e in entries), entries
    assert (await (await client.get(MODEL)).json())["trainings"] == []
    assert summary["steps"] == 50 and 0.0 <= summary["test_accuracy"] <= 1.0
    assert set(summary["exports"]) == {"saved_model", "frozen_graph", "tflite", "int8_tflite", "model_json"}
    listed = await (await client.get(TRAIN)).json()
    assert started["uuid"] in {training["uuid"] for training in listed}

    # Served without a restart: by name, and as the newest run by default.
    body = await predict_ok(client, file=demo_clip("yes").read_bytes(), run=new_run)
    assert body["run"] == new_run
    assert (await predict_ok(client, file=demo_clip("yes").read_bytes()))["run"] == new_run
    assert (await (await client.get(MODEL)).json())["model"]["run"] == new_run
