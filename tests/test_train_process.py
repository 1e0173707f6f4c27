"""A training in a process of its own: killed, crashed, cancelled or interrupted, it never takes
its caller down, never outlives it, and never leaves a run that is served.

First `speechclas.trainproc` alone (real spawned processes, no TensorFlow), then
``speechclas-train`` interrupted with Ctrl-C, then a real ``deepaas-run --workers 1``
whose training process is SIGKILLed and whose training is cancelled.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import psutil
import pytest
import requests

from speechclas import api, rundir
from speechclas.rundir import RunDir, RunNotFoundError, served_run
from speechclas.trainproc import TrainingProcessError, TrainingProgress, run_in_process, running_trainings
from tests.conftest import DEMO_DATA, demo_clip, make_project_home, tiny_training_overrides
from tests.processes import deepaas_command, free_port, running, wait_until_serving

HANG_S = 60  # a generous bound: a process or answer later than this is a hang, not a slow machine


# --- children for run_in_process: module-level, so a spawned process can import them --------


def _write_a_temp_file():
    import tempfile

    with tempfile.NamedTemporaryFile(delete=False) as handle:
        handle.write(b"left behind")
    return handle.name



def _pid_and_parent() -> tuple[int, int]:
    return os.getpid(), os.getppid()


def _fail(error: Exception) -> None:
    raise error


def _kill_myself(signal_number: int) -> None:
    os.kill(os.getpid(), signal_number)
    time.sleep(HANG_S)


def _crash(code: int) -> None:
    os._exit(code)


def wait_for(condition, timeout_s: float = HANG_S, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"{what} not reached within {timeout_s} s")


def spawned_children(pid: int) -> list[psutil.Process]:
    """Processes started by `pid` through multiprocessing's spawn (not its resource tracker)."""
    found = []
    for child in psutil.Process(pid).children():
        try:
            if "spawn_main" in " ".join(child.cmdline()):
                found.append(child)
        except psutil.NoSuchProcess:
            pass
    return found


def is_gone(pid: int) -> bool:
    """Ended (a zombie waiting for a reaper that may never come counts as ended)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


# --- the process helper alone ---------------------------------------------------------------


def test_the_result_comes_back_from_another_process():
    pid, parent = run_in_process(_pid_and_parent, what="test")
    assert pid != os.getpid() and parent == os.getpid()


@pytest.mark.parametrize(
    ("error", "message"),
    [
        (ValueError("no clips in /data/x"), "no clips in /data/x"),  # a user's error: its message alone
        (FileNotFoundError(2, "No such file or directory", "/nowhere"), "[Errno 2] No such file or directory: '/nowhere'"),
        (RuntimeError("broken"), "RuntimeError: broken"),  # anything else: with its type
    ],
)
def test_an_error_in_the_child_keeps_its_message(error, message):
    with pytest.raises(TrainingProcessError) as raised:
        run_in_process(_fail, error)
    assert str(raised.value) == message


def test_a_child_killed_by_sigkill_is_reported_as_such():
    with pytest.raises(TrainingProcessError) as raised:
        run_in_process(_kill_myself, signal.SIGKILL)
    message = str(raised.value)
    assert "the training process was killed by signal 9 (SIGKILL) — out of memory?" in message
    assert "never served" in message


def test_a_child_killed_by_another_signal_names_it():
    with pytest.raises(TrainingProcessError, match=r"killed by signal 15 \(SIGTERM\)\. Its run folder"):
        run_in_process(_kill_myself, signal.SIGTERM)


def test_a_crashed_child_is_reported_with_its_exit_code():
    with pytest.raises(TrainingProcessError, match="crashed: it ended with exit code 3 and no result"):
        run_in_process(_crash, 3)


def test_a_child_killed_from_outside_is_reported_and_the_caller_goes_on():
    def kill_the_child():
        child = wait_for(lambda: spawned_children(os.getpid()), what="the child process")[0]
        time.sleep(0.5)
        child.send_signal(signal.SIGKILL)

    killer = threading.Thread(target=kill_the_child)
    killer.start()
    with pytest.raises(TrainingProcessError, match="killed by signal 9"):
        run_in_process(time.sleep, HANG_S)
    killer.join()
    assert run_in_process(_pid_and_parent)[1] == os.getpid()  # and the next one runs


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux only")
def test_the_child_dies_with_its_parent():
    parent = subprocess.Popen(
        [sys.executable, "-c", "import time; from speechclas.trainproc import run_in_process; "
         f"run_in_process(time.sleep, {HANG_S})"]  # fmt: skip
    )
    try:
        child = wait_for(lambda: spawned_children(parent.pid), what="the child process")[0]
        time.sleep(1)  # past its start, into the sleep
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=HANG_S)
        wait_for(lambda: is_gone(child.pid), timeout_s=10, what="the orphan's end")
    finally:
        parent.kill()
        parent.wait()


# --- the progress of an API training ----------------------------------------------------------

TWO_WORDS = types.SimpleNamespace(wanted_words=("lights", "music"), how_many_training_steps=(30, 10))


def _report_steps(progress: TrainingProgress, steps: int) -> None:
    """A training process' reports, without the training."""
    progress.in_child()
    progress.on_run(types.SimpleNamespace(name="2030-01-01_000000"))
    for done in range(1, steps + 1):
        progress.on_step(done, 40)


def test_a_trainings_progress_follows_its_phases_and_goes_with_it(tmp_path):
    progress = TrainingProgress.start(TWO_WORDS, tmp_path)
    (listed,) = running_trainings(tmp_path)
    assert listed["phase"] == "preparing" and (listed["step"], listed["total"]) == (0, 40)
    assert listed["run"] is None and listed["wanted_words"] == ["lights", "music"]
    assert listed["elapsed_s"] >= 0 and listed["started"]

    progress.every_s = 3600.0  # no step written between a phase's start and the last step
    run_in_process(_report_steps, progress, 39, what="test")  # written by another process, now gone
    assert running_trainings(tmp_path) == []  # its training process has ended: not running
    written = json.loads(progress.path.read_text())
    assert (written["run"], written["phase"], written["step"]) == ("2030-01-01_000000", "training", 0)

    _report_steps(progress, 5)  # the training process is this one, alive
    (listed,) = running_trainings(tmp_path)
    assert (listed["run"], listed["phase"], listed["step"]) == ("2030-01-01_000000", "training", 0)
    progress.every_s = 0.0
    progress.on_step(7, 40)
    assert running_trainings(tmp_path)[0]["step"] == 7
    progress.on_step(40, 40)
    assert [(t["phase"], t["step"]) for t in running_trainings(tmp_path)] == [("evaluating", 40)]
    progress.remove()
    assert running_trainings(tmp_path) == [] and list(tmp_path.iterdir()) == []


def test_only_this_servers_live_trainings_are_listed(tmp_path):
    dead = run_in_process(_pid_and_parent, what="test")[0]
    ours = TrainingProgress.start(TWO_WORDS, tmp_path)
    for name, pid, server in (("dead", dead, os.getpid()), ("other", os.getppid(), 1)):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({**ours.state, "pid": pid, "server": server}))
    (tmp_path / "garbage.json").write_text("{")
    (tmp_path / "odd.json").write_text(json.dumps({**ours.state, "pid": "1"}))
    assert len(running_trainings(tmp_path)) == 1  # ours; another server's is not listed
    assert not (tmp_path / "dead.json").exists()  # its worker is gone: removed
    assert (tmp_path / "other.json").exists()


# --- speechclas-train interrupted -------------------------------------------------------------


def test_ctrl_c_on_the_cli_leaves_an_unfinished_run_that_is_never_served(tmp_path):
    models_dir = tmp_path / "models"
    log = tmp_path / "train.log"
    command = [str(Path(sys.executable).parent / "speechclas-train"), f"data_dir={DEMO_DATA}",
               f"models_dir={models_dir}", "model_architecture=tiny_conv", "how_many_training_steps=100000",
               "learning_rate=0.001", "eval_step_interval=100000", "--no-progress"]  # fmt: skip
    with log.open("w") as output:
        # SIGINT as a terminal's Ctrl-C finds it: handled (a shell's background job would ignore it).
        training = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=output,
                                    preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    try:
        wait_for(lambda: "Model tiny_conv" in log.read_text(), timeout_s=180, what="the training loop")
        time.sleep(1)
        training.send_signal(signal.SIGINT)
        returncode = training.wait(timeout=HANG_S)
    finally:
        training.kill()
        training.wait()
    stderr = log.read_text()
    assert returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr
    last_line = stderr.strip().splitlines()[-1]
    assert "Interrupted: the run folder is left unfinished and will not be served" in last_line
    (run,) = [RunDir(path) for path in models_dir.iterdir()]
    assert run.conf_path.is_file() and not run.is_finished()
    with pytest.raises(RunNotFoundError, match="no trained model yet"):
        served_run(models_dir)


# --- the served run: default, pinned, and where API trainings go --------------------------------


def copy_run(run: RunDir, models_dir: Path, name: str, finished: bool = True) -> RunDir:
    import shutil

    copy = RunDir(models_dir / name)
    shutil.copytree(run.root, copy.root)
    if not finished:
        copy.done_path.unlink()
    return copy


def test_served_run_says_which_and_why(tmp_path, trained_run):
    models = tmp_path / "models"
    older = copy_run(trained_run, models, "2020-01-01_000000")
    newer = copy_run(trained_run, models, "2021-01-01_000000")
    copy_run(trained_run, models, "2022-01-01_000000", finished=False)
    assert served_run(models) == (newer, "newest finished run")
    assert served_run(models, pinned=older.name) == (older, "pinned by SPEECHCLAS_RUN")
    api_run = copy_run(trained_run, models, rundir.API_RUN)
    assert served_run(models) == (api_run, "models/api")
    assert served_run(models, pinned=older.name)[0] == older  # a pin wins over models/api
    for pinned, why in [("2019-01-01_000000", "there is no run"), ("2022-01-01_000000", "did not finish"),
                        ("../etc", "is not a run name")]:  # fmt: skip
        with pytest.raises(RunNotFoundError) as raised:
            served_run(models, pinned=pinned)
        assert f"pinned by SPEECHCLAS_RUN to {pinned!r}, which cannot be served" in str(raised.value)
        assert why in str(raised.value)


def predict_in_process(**args) -> dict:
    """api.predict as a DEEPaaS worker calls it, with a copy of a demo clip as the upload."""
    import shutil
    import tempfile

    from deepaas.model.v2.wrapper import UploadedFile

    handle, name = tempfile.mkstemp()
    os.close(handle)
    shutil.copy(demo_clip("yes"), name)
    return api.predict(data=UploadedFile("data", name, "audio/wav", "yes.wav"), **args)


def test_a_pinned_run_is_served_and_shown_and_an_api_training_does_not_change_it(
    tmp_path, trained_run, monkeypatch
):
    models = tmp_path / "operator-models"
    pinned = copy_run(trained_run, models, "2020-01-01_000000")
    newer = copy_run(trained_run, models, "2021-01-01_000000")
    monkeypatch.setenv("SPEECHCLAS_MODELS_DIR", str(models))
    monkeypatch.delenv("SPEECHCLAS_RUN", raising=False)
    assert api.get_metadata()["model"]["run"] == newer.name
    assert api.get_metadata()["model"]["reason"] == "newest finished run"

    monkeypatch.setenv("SPEECHCLAS_RUN", pinned.name)
    model = api.get_metadata()["model"]
    assert (model["run"], model["reason"]) == (pinned.name, "pinned by SPEECHCLAS_RUN")
    assert model["labels"] == pinned.labels()
    assert predict_in_process()["run"] == pinned.name
    assert predict_in_process(run=newer.name)["run"] == newer.name  # a request may still name another

    # A training through the API writes into the operator's models folder and serves nothing new.
    params = tiny_training_overrides(DEMO_DATA, tmp_path / "ignored")
    del params["models_dir"]
    summary = api.train(**params)
    assert Path(summary["run_dir"]).parent == models.resolve()
    assert RunDir(Path(summary["run_dir"])).is_finished()
    assert api.get_metadata()["model"]["run"] == pinned.name
    assert predict_in_process()["run"] == pinned.name

    monkeypatch.setenv("SPEECHCLAS_RUN", "2019-01-01_000000")
    model = api.get_metadata()["model"]
    assert model["run"] is None and "pinned by SPEECHCLAS_RUN to '2019-01-01_000000'" in model["error"]
    with pytest.raises(api.NotFound) as raised:
        predict_in_process()
    assert raised.value.status == 404
    assert "pinned by SPEECHCLAS_RUN to '2019-01-01_000000', which cannot be served" in raised.value.message


# --- a real deepaas-run --workers 1 -------------------------------------------------------------

MODEL = "/v2/models/speechclas/"
PREDICT = MODEL + "predict/"
TRAIN = MODEL + "train/"
# Long enough to still be running when the test acts; under the default step cap.
LONG_TRAINING = {"data_dir": str(DEMO_DATA), "model_architecture": "tiny_conv", "how_many_training_steps": "40000",
                 "learning_rate": "0.001", "eval_step_interval": "40000"}  # fmt: skip


@dataclasses.dataclass
class Server:
    url: str
    home: Path
    log: Path
    process: subprocess.Popen

    @property
    def models(self) -> Path:
        return self.home / "models"


@pytest.fixture(scope="module")
def server(tmp_path_factory, trained_run):
    home = make_project_home(tmp_path_factory.mktemp("trainproc-home"), [trained_run])
    log = home / "deepaas.log"
    port = free_port()
    env = {
        **os.environ,
        "SPEECHCLAS_HOME": str(home),
        "SPEECHCLAS_TRAIN_ROOTS": os.pathsep.join(["data", "models", str(DEMO_DATA)]),
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }
    for name in ("SPEECHCLAS_RUN", "SPEECHCLAS_MODELS_DIR"):
        env.pop(name, None)
    with running(deepaas_command(port, workers=1), env, home, log) as process:
        url = f"http://127.0.0.1:{port}"
        wait_until_serving(url, process, log)
        yield Server(url=url, home=home, log=log, process=process)


def training_process(server: Server) -> tuple[psutil.Process, psutil.Process] | None:
    """(worker, training process) once the one worker has started a training."""
    for worker in spawned_children(server.process.pid):
        children = spawned_children(worker.pid)
        if children:
            return worker, children[0]
    return None


def start_training(server: Server, params: dict) -> str:
    response = requests.post(server.url + TRAIN, params=params, timeout=30)
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "running"
    return response.json()["uuid"]


def training_status(server: Server, uuid: str, timeout_s: float) -> dict:
    def finished():
        status = requests.get(server.url + TRAIN + uuid, timeout=10).json()
        return status if status["status"] != "running" else None

    return wait_for(finished, timeout_s=timeout_s, what=f"the end of training {uuid}")


def new_runs(server: Server, trained_run: RunDir) -> list[RunDir]:
    return [RunDir(path) for path in server.models.iterdir() if path.name != trained_run.name]


def listed_trainings(server: Server) -> list[dict]:
    """The metadata's running trainings (answered by the server's main process)."""
    return requests.get(server.url + MODEL, timeout=10).json()["trainings"]


def listed_at_a_step(server: Server, run_names: set[str]) -> dict:
    """The one listed training, once it names its run and has made a step."""

    def at_a_step():
        listed = listed_trainings(server)
        assert len(listed) <= 1, listed
        return listed[0] if listed and listed[0]["run"] in run_names and listed[0]["step"] > 0 else None

    return wait_for(at_a_step, what="a listed training at a step")


def predict_upload(server: Server, timeout_s: float = 30) -> requests.Response:
    clip = demo_clip("yes")
    return requests.post(server.url + PREDICT, files={"data": (clip.name, clip.read_bytes(), "audio/wav")},
                         timeout=timeout_s)  # fmt: skip


def test_a_killed_training_process_is_an_error_and_the_server_goes_on(server, trained_run):
    done_before = trained_run.done_path.read_text()
    before = {run.name for run in new_runs(server, trained_run)}
    uuid = start_training(server, LONG_TRAINING)
    worker, child = wait_for(lambda: training_process(server), what="the training process")
    # Kill it mid-training: once its run folder exists.
    wait_for(lambda: {r.name for r in new_runs(server, trained_run) if r.conf_path.is_file()} - before,
             what="the run folder")  # fmt: skip
    assert f"The training runs in process {child.pid}" in server.log.read_text()
    # The metadata lists it, at its step, until it ends.
    listed = listed_at_a_step(server, {r.name for r in new_runs(server, trained_run)} - before)
    assert listed["phase"] == "training" and 0 < listed["step"] <= listed["total"] == 40000, listed
    assert listed["wanted_words"] and listed["elapsed_s"] > 0
    child.send_signal(signal.SIGKILL)

    status = training_status(server, uuid, timeout_s=30)
    assert status["status"] == "error", status
    assert listed_trainings(server) == []
    assert "the training process was killed by signal 9 (SIGKILL) — out of memory?" in status["message"]
    # The worker that watched it lives on and answers at once with the earlier model.
    response = predict_upload(server, timeout_s=30)
    assert response.status_code == 200, response.text
    assert response.json()["run"] == trained_run.name
    assert worker.is_running() and training_process(server) is None
    (killed,) = [run for run in new_runs(server, trained_run) if run.name not in before]
    assert not killed.is_finished()
    assert trained_run.done_path.read_text() == done_before and RunDir(server.models / trained_run.name).is_finished()

    # A new training is accepted, finishes, and is then what is served.
    params = tiny_training_overrides(DEMO_DATA, server.models)
    del params["models_dir"]
    status = training_status(server, start_training(server, params), timeout_s=300)
    assert status["status"] == "done", status
    assert listed_trainings(server) == []
    new_run = status["result"]["output"]["run"]
    assert predict_upload(server).json()["run"] == new_run
    model = requests.get(server.url + MODEL, timeout=10).json()["model"]
    assert (model["run"], model["reason"]) == (new_run, "newest finished run")


def test_a_cancelled_training_leaves_no_process_and_no_served_run(server, trained_run):
    before = {run.name for run in new_runs(server, trained_run)}
    uuid = start_training(server, LONG_TRAINING)
    worker, child = wait_for(lambda: training_process(server), what="the training process")
    wait_for(lambda: {r.name for r in new_runs(server, trained_run) if r.conf_path.is_file()} - before,
             what="the run folder")  # fmt: skip
    assert listed_at_a_step(server, {r.name for r in new_runs(server, trained_run)} - before)["phase"] == "training"
    cancelled = requests.delete(server.url + TRAIN + uuid, timeout=30)
    # DEEPaaS 2.6 kills the worker, then answers 500 (see test_deepaas_process); a fixed one, 200.
    assert cancelled.status_code in (200, 500), cancelled.text
    wait_for(lambda: is_gone(worker.pid) and is_gone(child.pid), timeout_s=30, what="the end of both processes")
    assert listed_trainings(server) == []  # the killed worker could not remove its progress: it is stale
    (cancelled_run,) = [run for run in new_runs(server, trained_run) if run.name not in before]
    assert not cancelled_run.is_finished()
    served = requests.get(server.url + MODEL, timeout=10).json()["model"]["run"]
    response = predict_upload(server, timeout_s=60)  # a fresh worker: it loads the model first
    assert response.status_code == 200 and response.json()["run"] == served != cancelled_run.name


def test_the_childs_temp_files_are_removed_when_it_ends(tmp_path, monkeypatch):
    """TensorFlow leaves autograph files in the temp folder; a training's are its own and go with it."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)
    left = Path(run_in_process(_write_a_temp_file, what="test"))
    assert left.parent.parent == tmp_path and left.parent.name.startswith("speechclas-test-")
    assert not left.exists() and list(tmp_path.iterdir()) == []
