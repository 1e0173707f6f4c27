"""Batch prediction: stored predictions and statistics, bad files reported one by one,
``speechclas-predict`` over a folder or a split list, and archives uploaded to a real
``deepaas-run`` (the archive checks themselves are speechclas.archive's, tested there)."""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
import zipfile

import pytest
import requests

from speechclas import api, batch
from speechclas.metrics import classification_metrics
from speechclas.predict import InputError, PredictorCache
from speechclas.rundir import RunDir, find_run
from tests.conftest import DEMO_DATA, demo_clip, make_project_home
from tests.processes import deepaas_command, free_port, running, wait_until_serving
from tests.test_deepaas_process import PREDICT

WORDS = ("yes", "no", "bed")  # two wanted words and one that is _unknown_
MAX_FILES = 1000


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory, trained_run):
    """A copy of the session's run, so the predictions written here stay out of other tests' way."""
    models = tmp_path_factory.mktemp("batch") / "models"
    shutil.copytree(trained_run.root, models / trained_run.name)
    return models


@pytest.fixture(scope="module")
def predictors():
    return PredictorCache(max_runs=1)


@pytest.fixture(scope="module")
def clips_folder(tmp_path_factory):
    """Label folders with two demo clips each, an empty wav and a text file named .wav."""
    folder = tmp_path_factory.mktemp("clips")
    for word in WORDS:
        (folder / word).mkdir()
        for clip in sorted((DEMO_DATA / word).glob("*.wav"))[:2]:
            shutil.copy(clip, folder / word / clip.name)
    (folder / "yes" / "empty.wav").write_bytes(b"")
    (folder / "no" / "notes.wav").write_text("not audio at all")
    (folder / "no" / "README.txt").write_text("not a clip, not counted")
    return folder


def recomputed_metrics(stored: dict) -> dict:
    """The metrics of stored predictions, computed here from the file entries alone."""
    labels = stored["labels"]
    scored = [f for f in stored["files"] if "error" not in f and f["label"] is not None]
    truth = [labels.index(f["label"]) for f in scored]
    predicted = [labels.index(f["predictions"][0]["label"]) for f in scored]
    return classification_metrics(truth, predicted, labels)


def test_a_folder_batch_stores_predictions_and_matching_statistics(models_dir, predictors, clips_folder, trained_run):
    result = batch.run_batch(models_dir, clips_folder, name="clips", progress=False, predictors=predictors)
    run = RunDir(models_dir / trained_run.name)
    assert result.predictions_path == run.predictions / "clips.json"
    assert result.metrics_path == run.stats / "clips_metrics.json"
    assert (run.stats / "clips_confusion_matrix.png").stat().st_size > 1000

    stored, metrics = batch.load_batch(run, "clips")
    assert set(stored) == {"run", "source", "root", "created", "labels", "files"}
    assert stored["run"] == trained_run.name and stored["labels"] == trained_run.labels()
    assert len(stored["files"]) == 2 * len(WORDS) + 2
    assert {key: metrics[key] for key in recomputed_metrics(stored)} == recomputed_metrics(stored)
    assert (metrics["files"], metrics["failed"], metrics["count"]) == (8, 2, 6)
    assert result.summary == {"files": 8, "failed": 2, "unlabelled": 0, "count": 6, "accuracy": metrics["accuracy"]}
    by_file = {f["file"]: f for f in stored["files"]}
    assert {f["label"] for f in by_file.values()} == {"yes", "no", "_unknown_"}  # bed is not a wanted word
    assert len(by_file[f"yes/{demo_clip('yes').name}"]["predictions"]) == 5


def test_a_bad_file_is_reported_for_that_file_only(models_dir, predictors, clips_folder):
    batch.run_batch(models_dir, clips_folder, name="clips", progress=False, predictors=predictors)
    stored, _ = batch.load_batch(find_run(models_dir), "clips")
    errors = {f["file"]: f["error"] for f in stored["files"] if "error" in f}
    assert set(errors) == {"yes/empty.wav", "no/notes.wav"}
    assert "is empty" in errors["yes/empty.wav"]
    assert "not a readable audio file" in errors["no/notes.wav"]
    assert all("predictions" in f for f in stored["files"] if "error" not in f)


def test_a_split_list_is_read_against_the_run_data_and_bad_lines_are_reported(
    models_dir, predictors, trained_run, tmp_path
):
    run = RunDir(models_dir / trained_run.name)
    test_list = (run.dataset_files / "test.txt").read_text().splitlines()
    split_list = tmp_path / "test.txt"
    split_list.write_text("\n".join([*test_list, "", "# a comment", "yes/gone_nohash_0.wav", "../etc/passwd"]) + "\n")

    result = batch.run_batch(models_dir, split_list, progress=False, predictors=predictors)
    assert result.name == "test"
    stored, metrics = batch.load_batch(run, "test")
    assert [f["file"] for f in stored["files"]] == [*test_list, "yes/gone_nohash_0.wav", "../etc/passwd"]
    errors = {f["file"]: f["error"] for f in stored["files"] if "error" in f}
    assert set(errors) == {"yes/gone_nohash_0.wav", "../etc/passwd"}
    assert metrics["count"] == len(test_list)
    assert {key: metrics[key] for key in recomputed_metrics(stored)} == recomputed_metrics(stored)


def test_nothing_to_score_is_refused(models_dir, tmp_path):
    with pytest.raises(InputError, match="names no audio files"):
        batch.run_batch(models_dir, tmp_path, progress=False)
    (tmp_path / "clip.wav").write_bytes(b"")
    with pytest.raises(InputError, match="neither a folder nor a split list"):
        batch.run_batch(models_dir, tmp_path / "clip.wav", progress=False)


def test_loose_clips_are_predicted_without_statistics(models_dir, predictors, tmp_path):
    shutil.copy(demo_clip("yes"), tmp_path / "a.wav")
    result = batch.run_batch(models_dir, tmp_path, name="loose", progress=False, predictors=predictors)
    assert result.metrics_path is None
    assert result.summary["unlabelled"] == 1
    assert batch.load_batch(result.run, "loose")[1] is None


def test_speechclas_predict_runs_a_batch_over_a_folder_or_a_split_list(models_dir, clips_folder, trained_run, capsys):
    from speechclas.cli import predict_main

    assert predict_main([str(clips_folder), "--models-dir", str(models_dir), "--name", "from-cli"]) == 0
    printed = json.loads(capsys.readouterr().out)
    run = RunDir(models_dir / trained_run.name)
    assert printed["predictions"] == str(batch.predictions_path(run, "from-cli"))
    assert (printed["files"], printed["failed"]) == (8, 2)

    split_list = run.dataset_files / "val.txt"
    assert predict_main([str(split_list), "--models-dir", str(models_dir), "--data-dir", str(DEMO_DATA)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["metrics"] == str(run.stats / "val_metrics.json")
    assert printed["count"] == len(split_list.read_text().split())
    assert predict_main([str(clips_folder / "nowhere.txt"), "--models-dir", str(models_dir)]) == 2


# --- archives -----------------------------------------------------------------------------


def zip_of(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def tar_gz_of(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def labelled_clips() -> dict[str, bytes]:
    return {f"clips/{word}/{demo_clip(word).name}": demo_clip(word).read_bytes() for word in WORDS} | {
        "clips/no/broken.wav": b"RIFF....",
    }


@pytest.mark.parametrize("pack", [zip_of, tar_gz_of], ids=["zip", "tar.gz"])
def test_an_archive_is_predicted_per_file(models_dir, predictors, tmp_path, pack, trained_run):
    upload = tmp_path / "upload"
    upload.write_bytes(pack(labelled_clips()))
    answer = batch.predict_archive(predictors, models_dir, upload, archive_name="clips.bin", max_files=MAX_FILES)
    assert answer["run"] == trained_run.name
    by_file = {f["file"]: f for f in answer["files"]}
    assert set(by_file) == {name.removeprefix("clips/") for name in labelled_clips()}
    assert "not a readable audio file" in by_file["no/broken.wav"]["error"]
    assert all(len(f["predictions"]) == 5 for name, f in by_file.items() if name != "no/broken.wav")
    assert answer["summary"] == {"files": 4, "failed": 1, "unlabelled": 0}
    assert answer["metrics"]["count"] == 3


def test_archive_limits_and_traversal_are_refused(models_dir, predictors, tmp_path):
    upload = tmp_path / "upload"
    upload.write_bytes(zip_of({"../escape.wav": demo_clip().read_bytes()}))
    with pytest.raises(batch.ArchiveRefused, match="'..'"):
        batch.predict_archive(predictors, models_dir, upload, archive_name="evil.zip", max_files=MAX_FILES)
    upload.write_bytes(zip_of({f"yes/{i}.wav": demo_clip().read_bytes() for i in range(4)}))
    with pytest.raises(batch.ArchiveRefused, match="more than 3 files.*SPEECHCLAS_MAX_ARCHIVE_MEMBERS"):
        batch.predict_archive(predictors, models_dir, upload, archive_name="many.zip", max_files=3)
    upload.write_bytes(zip_of({"notes.txt": b"no clips here"}))
    with pytest.raises(batch.ArchiveRefused, match="holds no audio files"):
        batch.predict_archive(predictors, models_dir, upload, archive_name="notes.zip", max_files=MAX_FILES)
    assert list(tmp_path.iterdir()) == [upload]  # nothing unpacked next to the upload


@pytest.mark.parametrize("pack", [zip_of, tar_gz_of], ids=["zip", "tar.gz"])
def test_archives_inside_an_archive_are_reported_per_member_not_unpacked(models_dir, predictors, tmp_path, pack):
    inner = {"yes/hidden.wav": demo_clip("yes").read_bytes()}
    upload = tmp_path / "upload"
    upload.write_bytes(pack({
        f"yes/{demo_clip('yes').name}": demo_clip("yes").read_bytes(),
        "yes/inner.zip": zip_of(inner),
        "no/inner.tar.gz": tar_gz_of(inner),
        "loose.tgz": tar_gz_of(inner),
    }))  # fmt: skip
    answer = batch.predict_archive(predictors, models_dir, upload, archive_name="outer", max_files=MAX_FILES)
    by_file = {f["file"]: f for f in answer["files"]}
    assert set(by_file) == {f"yes/{demo_clip('yes').name}", "yes/inner.zip", "no/inner.tar.gz", "loose.tgz"}
    for name in ("yes/inner.zip", "no/inner.tar.gz", "loose.tgz"):
        assert by_file[name]["error"] == batch.NESTED_ARCHIVE_ERROR and "predictions" not in by_file[name]
    assert len(by_file[f"yes/{demo_clip('yes').name}"]["predictions"]) == 5
    assert answer["summary"] == {"files": 4, "failed": 3, "unlabelled": 0}
    assert api.schema().load({"status": "ok", **answer})


class FailingPredictor:
    """The real predictor, except that its `fail_on`-th prediction raises `error`: what a
    TensorFlow or I/O failure in the middle of a batch looks like to the batch."""

    def __init__(self, predictor, error: Exception, fail_on: int = 2):
        self.predictor, self.error, self.fail_on, self.calls = predictor, error, fail_on, 0

    def __getattr__(self, name):
        return getattr(self.predictor, name)

    def predict(self, audio, top_k):
        self.calls += 1
        if self.calls == self.fail_on:
            raise self.error
        return self.predictor.predict(audio, top_k)


class OneRun:
    """A PredictorCache that answers one given predictor."""

    def __init__(self, predictor):
        self.predictor = predictor

    def get(self, run):
        return self.predictor


def member_errors():
    import tensorflow as tf

    return [
        OSError(5, "Input/output error"),
        ValueError("shapes do not match"),
        tf.errors.InvalidArgumentError(None, None, "Input to reshape is a tensor with 0 values"),
        MemoryError(),
    ]


@pytest.mark.parametrize("error", member_errors(), ids=lambda e: type(e).__name__)
def test_any_failure_of_one_member_is_reported_against_that_member(models_dir, predictors, tmp_path, error):
    failing = OneRun(FailingPredictor(predictors.get(find_run(models_dir)), error))
    upload = tmp_path / "upload"
    upload.write_bytes(zip_of(labelled_clips()))
    answer = batch.predict_archive(failing, models_dir, upload, archive_name="clips.zip", max_files=MAX_FILES)
    errors = {f["file"]: f["error"] for f in answer["files"] if "error" in f}
    # Sorted members: bed/..., no/broken.wav (not audio, never reaches the model), no/<clip>, yes/<clip>.
    assert set(errors) == {"no/broken.wav", f"no/{demo_clip('no').name}"}
    assert type(error).__name__ in errors[f"no/{demo_clip('no').name}"]
    assert answer["summary"] == {"files": 4, "failed": 2, "unlabelled": 0}
    assert api.schema().load({"status": "ok", **answer})

    failing.predictor.calls = 0
    result = batch.run_batch(models_dir, DEMO_DATA / "yes", name="failing", progress=False, predictors=failing)
    assert result.summary["failed"] == 1 and result.summary["files"] == len(list((DEMO_DATA / "yes").glob("*.wav")))


class NaNPredictor(FailingPredictor):
    """The real predictor, except that its `fail_on`-th answer holds NaN scores (what extreme
    float samples can make of a model's softmax)."""

    def predict(self, audio, top_k):
        answer = self.predictor.predict(audio, top_k)
        self.calls += 1
        if self.calls == self.fail_on:
            answer["predictions"] = [{**p, "probability": float("nan")} for p in answer["predictions"]]
        return answer


def test_a_member_whose_scores_are_not_numbers_is_reported_not_answered(models_dir, predictors, tmp_path):
    nan = OneRun(NaNPredictor(predictors.get(find_run(models_dir)), error=None, fail_on=1))
    upload = tmp_path / "upload"
    upload.write_bytes(zip_of(labelled_clips()))
    answer = batch.predict_archive(nan, models_dir, upload, archive_name="clips.zip", max_files=MAX_FILES)
    errors = {f["file"]: f["error"] for f in answer["files"] if "error" in f}
    assert set(errors) == {"no/broken.wav", f"bed/{demo_clip('bed').name}"}  # bed/ is scored first
    assert "not finite numbers" in errors[f"bed/{demo_clip('bed').name}"]
    assert answer["summary"] == {"files": 4, "failed": 2, "unlabelled": 0}
    assert api.schema().load({"status": "ok", **answer})  # what DEEPaaS validates: no NaN may reach it


def test_archives_are_told_from_clips(tmp_path):
    clip = tmp_path / "upload"
    clip.write_bytes(demo_clip().read_bytes())
    assert not batch.looks_like_archive(clip, "yes.wav")
    assert batch.looks_like_archive(clip, "clips.tar.gz")
    clip.write_bytes(tar_gz_of({"a.wav": b"x"}))
    assert batch.looks_like_archive(clip, None)
    clip.write_bytes(zip_of({"a.wav": b"x"}))
    assert batch.looks_like_archive(clip, "upload")



# --- the API: archives uploaded to a real deepaas-run ------------------------------------------


@pytest.fixture(scope="module")
def api_url(tmp_path_factory, trained_run):
    """deepaas-run (one worker) serving the session's run on a loopback port."""
    home = make_project_home(tmp_path_factory.mktemp("batch-home"), [trained_run])
    url = f"http://127.0.0.1:{free_port()}"
    log = home / "deepaas.log"
    env = {**os.environ, "SPEECHCLAS_HOME": str(home), "TF_CPP_MIN_LOG_LEVEL": "2"}
    with running(deepaas_command(int(url.rsplit(":", 1)[1]), workers=1), env, home, log) as process:
        wait_until_serving(url, process, log)
        yield url


def post_archive(api_url: str, name: str, content: bytes) -> requests.Response:
    return requests.post(api_url + PREDICT, files={"data": (name, content)}, headers={"Accept": "application/json"},
                         timeout=60)  # fmt: skip


@pytest.mark.parametrize(("pack", "name"), [(zip_of, "clips.zip"), (tar_gz_of, "clips.tar.gz")], ids=["zip", "tar.gz"])
def test_the_api_answers_an_uploaded_archive_per_file(api_url, trained_run, pack, name):
    response = post_archive(api_url, name, pack(labelled_clips()))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "ok" and body["run"] == trained_run.name
    assert api.schema().load(body)  # what DEEPaaS validated before answering
    by_file = {f["file"]: f for f in body["files"]}
    assert set(by_file) == {name.removeprefix("clips/") for name in labelled_clips()}
    assert "not a readable audio file" in by_file["no/broken.wav"]["error"]
    yes = by_file[f"yes/{demo_clip('yes').name}"]
    assert yes["label"] == "yes" and len(yes["predictions"]) == 5
    assert body["summary"] == {"files": 4, "failed": 1, "unlabelled": 0}


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("evil.zip", zip_of({"../../escape.wav": b"RIFF"}), "'..'"),
        ("evil.tar.gz", tar_gz_of({"/tmp/escape.wav": b"RIFF"}), "absolute path"),
        ("broken.zip", b"PK\x03\x04 and then nothing", "not a valid"),
    ],
    ids=["zip-traversal", "tar-absolute", "broken"],
)
def test_the_api_refuses_a_bad_archive_with_a_400(api_url, name, content, message):
    response = post_archive(api_url, name, content)
    assert response.status_code == 400, response.text
    assert message in response.json()["message"]


def test_the_api_refuses_an_archive_of_60000_files_from_its_headers(api_url):
    many = zip_of({f"yes/{i:05d}.wav": b"" for i in range(60_000)})
    response = post_archive(api_url, "many.zip", many)
    assert response.status_code == 400, response.text
    message = response.json()["message"]
    assert "more than 10000 files" in message and "SPEECHCLAS_MAX_ARCHIVE_MEMBERS" in message


def test_the_api_answers_nested_archives_per_member(api_url):
    response = post_archive(api_url, "outer.zip", zip_of({"yes/a.wav": demo_clip("yes").read_bytes(),
                                                          "inner.zip": zip_of(labelled_clips())}))
    assert response.status_code == 200, response.text
    by_file = {f["file"]: f for f in response.json()["files"]}
    assert by_file["inner.zip"]["error"] == batch.NESTED_ARCHIVE_ERROR
    assert len(by_file["yes/a.wav"]["predictions"]) == 5
