"""A training in a process of its own: killed, crashed, cancelled or interrupted, it never takes
its caller down, never outlives it, and never leaves a run that is served.

First `speechclas.trainproc` alone (real spawned processes, no TensorFlow), then
``speechclas-train`` interrupted with Ctrl-C, then a real ``deepaas-run --workers 1``
whose training process is SIGKILLed and whose training is cancelled.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import requests

from speechclas import api, rundir
from speechclas.rundir import RunDir, RunNotFoundError, served_run
from speechclas.trainproc import TrainingProcessError, run_in_process
from tests.conftest import DEMO_DATA, demo_clip, make_project_home, tiny_training_overrides
from tests.processes import deepaas_command, free_port, running, wait_until_serving

HANG_S = 60  # a generous bound: a process or answer later than this is a hang, not a slow machine


# --- children for run_in_process: module-level, so a spawned process can import them --------


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
        time.sleep(0.2)
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
