"""MLflow tracking: a training logged to a real local `mlflow server` (sqlite, loopback),
and trainings that go on when MLflow cannot be reached or imported."""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from speechclas import tracking
from speechclas.config import Config, load_config
from speechclas.rundir import RunDir, create_run_dir
from speechclas.train import train
from tests.conftest import DEMO_DATA, make_project_home, tiny_training_overrides
from tests.processes import free_port, wait_until_serving

SERVER_START_TIMEOUT_S = 240
# Four then two steps, an evaluation every three: evaluations at steps 3 and 6.
STEPS = {"how_many_training_steps": "4,2", "eval_step_interval": 3}


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """`mlflow server` on a free loopback port, runs in sqlite and artifacts proxied into a folder."""
    root = tmp_path_factory.mktemp("mlflow")
    url = f"http://127.0.0.1:{free_port()}"
    command = [str(Path(sys.executable).parent / "mlflow"), "server",
               "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
               "--artifacts-destination", str(root / "artifacts"),
               "--host", "127.0.0.1", "--port", url.rsplit(":", 1)[1], "--workers", "1"]  # fmt: skip
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    log = root / "server.log"
    with log.open("w") as output:
        process = subprocess.Popen(command, env=env, cwd=root, stdout=output, stderr=subprocess.STDOUT,
                                   start_new_session=True)  # its uvicorn child goes with it
    try:
        wait_until_serving(url, process, log, path="/health", timeout_s=SERVER_START_TIMEOUT_S)
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def test_cli_training_is_tracked_with_its_evaluations_artifacts_and_registered_model(mlflow_server, tmp_path,
                                                                                     monkeypatch):
    from mlflow.artifacts import download_artifacts
    from mlflow.tracking import MlflowClient

    overrides = {**tiny_training_overrides(DEMO_DATA, tmp_path / "models"), **STEPS}
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)  # for the training and for README's download below
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "keywords")
    monkeypatch.setenv("SPEECHCLAS_MLFLOW_MODEL_NAME", "keywords-model")
    completed = subprocess.run(
        [sys.executable, "-m", "speechclas.cli", "--no-progress", *(f"{k}={v}" for k, v in overrides.items())],
        capture_output=True, text=True, timeout=600, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    summary = json.loads(completed.stdout)  # MLflow's own prints stay off stdout
    run = RunDir(Path(summary["run_dir"]))
    run_metrics = json.loads(run.metrics_path.read_text())

    client = MlflowClient(tracking_uri=mlflow_server)
    experiment = client.get_experiment_by_name("keywords")
    [tracked] = client.search_runs([experiment.experiment_id])
    assert tracked.info.run_name == run.name and tracked.info.status == "FINISHED"
    assert tracked.data.tags["speechclas.run"] == run.name

    params = tracked.data.params
    assert set(params) == {field for field in Config.__dataclass_fields__}
    assert params["model_architecture"] == "tiny_conv"
    assert params["how_many_training_steps"] == "4,2"
    assert params["wanted_words"] == ",".join(run.settings()["wanted_words"])

    for name, history_key in [("validation_accuracy", "validation_accuracy"), ("train_loss", "train_loss"),
                              ("train_batch_accuracy", "train_batch_accuracy")]:
        logged = [(m.step, m.value) for m in client.get_metric_history(tracked.info.run_id, name)]
        assert sorted(logged) == [(e["step"], pytest.approx(e[history_key])) for e in run_metrics["history"]]
        assert [step for step, _ in sorted(logged)] == [3, 6]
    final = tracked.data.metrics
    assert final["test_accuracy"] == pytest.approx(summary["test_accuracy"])
    assert final["final_train_accuracy"] == pytest.approx(summary["train_accuracy"])
    assert final["final_validation_accuracy"] == pytest.approx(summary["validation_accuracy"])
    assert final["parameter_count"] == run_metrics["parameter_count"]
    assert final["duration_s"] == pytest.approx(run_metrics["duration_s"])

    listed = {a.path for folder in ("stats", "conf", "ckpts") for a in client.list_artifacts(tracked.info.run_id, folder)}
    optional = {f"ckpts/{name}" for name in ("model_int8.tflite", "model.json") if (run.ckpts / name).is_file()}
    assert listed == {"stats/metrics.json", "stats/confusion_matrix_test.png", "conf/conf.json",
                      "ckpts/labels.txt", "ckpts/model.tflite"} | optional
    downloaded = Path(client.download_artifacts(tracked.info.run_id, "stats/metrics.json", str(tmp_path)))
    assert downloaded.read_bytes() == run.metrics_path.read_bytes()

    [version] = client.search_model_versions("name='keywords-model'")
    assert version.run_id == tracked.info.run_id and version.status == "READY"
    model_dir = Path(download_artifacts(artifact_uri=f"models:/keywords-model/{version.version}",
                                        dst_path=str(tmp_path / "registered")))
    assert (model_dir / "model.tflite").read_bytes() == run.tflite_path.read_bytes()
    assert (model_dir / "labels.txt").read_text() == run.labels_path.read_text()


def test_api_training_is_tracked_by_its_own_training_process(mlflow_server, tmp_path, monkeypatch):
    """DEEPaaS's worker calls api.train, which trains in a process of its own (speechclas.trainproc):
    that process finds the tracking server in the environment the worker was started with."""
    from mlflow.tracking import MlflowClient

    from speechclas import api

    home = make_project_home(tmp_path / "home")
    shutil.copytree(DEMO_DATA, home / "data" / "demo")  # API trainings read inside data/ only
    monkeypatch.setenv("SPEECHCLAS_HOME", str(home))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "api-trainings")
    overrides = {**tiny_training_overrides(DEMO_DATA, DEMO_DATA), **STEPS}
    arguments = {name: str(value) for name, value in overrides.items() if name not in ("data_dir", "models_dir")}
    summary = api.train(data_dir="data/demo", **arguments)
    assert (home / "models" / summary["run"] / "DONE").is_file()

    client = MlflowClient(tracking_uri=mlflow_server)
    experiment = client.get_experiment_by_name("api-trainings")
    [tracked] = client.search_runs([experiment.experiment_id])
    assert tracked.info.run_name == summary["run"] and tracked.info.status == "FINISHED"
    assert tracked.data.params["data_dir"] == "data/demo" and tracked.data.params["how_many_training_steps"] == "4,2"
    assert tracked.data.metrics["test_accuracy"] == pytest.approx(summary["test_accuracy"])
    history = client.get_metric_history(tracked.info.run_id, "validation_accuracy")
    assert sorted(metric.step for metric in history) == [3, 6]
    listed = {a.path for a in client.list_artifacts(tracked.info.run_id, "ckpts")}
    assert {"ckpts/model.tflite", "ckpts/model_int8.tflite", "ckpts/model.json"} <= listed


def test_a_dead_tracking_server_does_not_stop_the_training(tmp_path, monkeypatch, caplog):
    # MLflow's own retry settings, so the refused connection fails at once instead of after minutes.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    dead_uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    tracker = tracking.tracker_from_env({"MLFLOW_TRACKING_URI": dead_uri}, "speechclas")
    config = load_config({**tiny_training_overrides(DEMO_DATA, tmp_path / "models"), **STEPS})
    with caplog.at_level(logging.WARNING, logger="speechclas.tracking"):
        result = train(config, progress=False, tracker=tracker)
    assert result.run.is_finished() and result.metrics["steps"] == 6
    warnings = [r.getMessage() for r in caplog.records if r.name == "speechclas.tracking"]
    # One warning: the first failure stops tracking, later evaluations and the end do not retry.
    assert len(warnings) == 1 and "could not start the run" in warnings[0] and dead_uri in warnings[0]


@pytest.fixture
def started_run(tmp_path):
    config = load_config(tiny_training_overrides(DEMO_DATA, tmp_path / "models"))
    return create_run_dir(tmp_path / "models"), config


def test_an_unusable_tracking_uri_is_a_warning(started_run, caplog):
    run, config = started_run
    tracker = tracking.tracker_from_env({"MLFLOW_TRACKING_URI": "nosuchscheme://tracker"}, "speechclas")
    with caplog.at_level(logging.WARNING, logger="speechclas.tracking"):
        tracker.start(run, config)
        tracker.log_evaluation({"step": 1, "validation_accuracy": 0.5})
        tracker.finish(run)
    [warning] = [r.getMessage() for r in caplog.records if r.name == "speechclas.tracking"]
    assert "could not start the run" in warning and "nosuchscheme://tracker" in warning


def test_without_mlflow_installed_a_tracked_training_warns_how_to_install_it(started_run, monkeypatch, caplog):
    run, config = started_run
    for module in ("mlflow", "mlflow.entities", "mlflow.tracking"):
        monkeypatch.setitem(sys.modules, module, None)  # makes `import` raise ImportError
    tracker = tracking.tracker_from_env({"MLFLOW_TRACKING_URI": "http://127.0.0.1:1"}, "speechclas")
    with caplog.at_level(logging.WARNING, logger="speechclas.tracking"):
        tracker.start(run, config)
        tracker.finish(run)
    [warning] = [r.getMessage() for r in caplog.records if r.name == "speechclas.tracking"]
    assert "speechclas[mlflow]" in warning


def test_tracking_is_off_without_the_variable_and_mlflow_is_not_imported():
    code = ("import sys; import speechclas.api; from speechclas import tracking; "
            "tracker = tracking.tracker_from_env({'MLFLOW_TRACKING_URI': '  '}, 'speechclas'); "
            "assert type(tracker) is tracking.Tracker, tracker; "
            "assert 'mlflow' not in sys.modules, 'mlflow imported with tracking off'")
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr[-2000:]


def test_params_are_the_resolved_configuration_flat_with_lists_comma_separated():
    config = load_config({"wanted_words": "yes,no", "how_many_training_steps": "10,5", "learning_rate": "0.01,0.001"})
    params = tracking.flat_params(config)
    assert params["wanted_words"] == "yes,no"
    assert params["how_many_training_steps"] == "10,5" and params["learning_rate"] == "0.01,0.001"
    assert params["batch_size"] == str(config.batch_size)
    assert set(params) == set(Config.__dataclass_fields__)


def test_final_metrics_chart_each_exports_accuracy_and_size():
    run_metrics = {"training": {"accuracy": 0.9}, "validation": {"accuracy": 0.8}, "testing": {"accuracy": 0.7},
                   "duration_s": 12.5, "parameter_count": 94740, "steps": 50,
                   "exports": {"model.tflite": {"test_accuracy": 0.7, "bytes": 380000},
                               "model_int8.tflite": {"test_accuracy": 0.69, "bytes": 99000}}}
    final = tracking.final_metrics(run_metrics)
    assert final["test_accuracy"] == 0.7 and final["final_train_accuracy"] == 0.9
    assert final["exports/model_int8.tflite/test_accuracy"] == 0.69
    assert final["exports/model.tflite/bytes"] == 380000
