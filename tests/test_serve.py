"""``speechclas-serve``: deepaas-run with the body limit derived from the upload limit.

The arguments it builds, then the real thing: the command started as a
process (it becomes deepaas-run), a body above the limit answered 413 before
it is stored, and the server serving on.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import requests

from speechclas import serve
from speechclas.limits import Limits, MiB
from tests.conftest import demo_clip, make_project_home
from tests.processes import free_port, running, serve_command, wait_until_serving
from tests.test_deepaas_process import PREDICT, REQUEST_TIMEOUT_S

UPLOAD_LIMIT = 200_000  # bytes: small, so that bodies above it are cheap to send
LIMITS = Limits.defaults().replace(max_audio_bytes=UPLOAD_LIMIT, detect_max_audio_bytes=UPLOAD_LIMIT)
BODY_LIMIT = UPLOAD_LIMIT + MiB


def test_the_body_limit_is_added_and_other_arguments_pass_through():
    argv = ["--listen-ip", "0.0.0.0", "--listen-port", "5000", "--workers", "2"]
    assert serve.deepaas_arguments(argv, LIMITS) == [*argv, "--client-max-size", str(BODY_LIMIT)]


@pytest.mark.parametrize("given", [["--client-max-size", "99000000"], ["--client-max-size=99000000"]])
def test_a_larger_user_limit_wins(given):
    assert serve.deepaas_arguments(["--workers", "2", *given], LIMITS) == ["--workers", "2", "--client-max-size",
                                                                            "99000000"]  # fmt: skip


@pytest.mark.parametrize(
    ("given", "message"),
    [
        (["--client-max-size", "1000"], "below the 1248576 bytes an upload of SPEECHCLAS_MAX_AUDIO_BYTES=200000"),
        (["--client-max-size=0"], "0 would mean no limit"),
        (["--client-max-size", "lots"], "whole number of bytes"),
        (["--client-max-size"], "whole number of bytes"),
    ],
)
def test_a_smaller_or_missing_user_limit_is_refused(given, message):
    with pytest.raises(serve.ServeError, match=message):
        serve.deepaas_arguments(given, LIMITS)


def test_refused_arguments_and_settings_exit_2_without_starting_deepaas(monkeypatch, caplog):
    monkeypatch.setattr(os, "execv", lambda *args: pytest.fail(f"deepaas-run was started: {args}"))
    assert serve.main(["--client-max-size", "10"]) == 2
    monkeypatch.setenv("SPEECHCLAS_MAX_AUDIO_BYTES", "many")
    assert serve.main([]) == 2
    assert "SPEECHCLAS_MAX_AUDIO_BYTES must be a whole number" in caplog.text


# --- the real process ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(tmp_path_factory, trained_run):
    """``python -m speechclas.serve`` (one worker) with a 200 kB upload limit; yields (url, pid)."""
    home = make_project_home(tmp_path_factory.mktemp("serve-home"), [trained_run])
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "SPEECHCLAS_HOME": str(home), "SPEECHCLAS_MAX_AUDIO_BYTES": str(UPLOAD_LIMIT),
           "SPEECHCLAS_DETECT_MAX_AUDIO_BYTES": str(UPLOAD_LIMIT), "TF_CPP_MIN_LOG_LEVEL": "2"}  # fmt: skip
    log = home / "serve.log"
    with running(serve_command(port, workers=1), env, home, log) as process:
        wait_until_serving(url, process, log)
        yield url, process.pid


def test_the_command_becomes_deepaas_run_with_the_limit(served):
    _, pid = served
    command_line = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert any(part.endswith(b"deepaas-run") for part in command_line)  # exec'd: signals reach DEEPaaS
    assert command_line[-3:-1] == [b"--client-max-size", str(BODY_LIMIT).encode()]


def test_a_body_above_the_limit_is_413_and_the_server_serves_on(served):
    url, _ = served
    too_big = [
        {"files": {"data": ("big.wav", b"\0" * (BODY_LIMIT + 1))}},
        {"data": {"urls": "x" * 3 * MiB}},  # a form field, not a file: once held in memory whole
    ]
    for body in too_big:
        response = requests.post(url + PREDICT, timeout=REQUEST_TIMEOUT_S, **body)
        assert response.status_code == 413, response.text
        assert str(BODY_LIMIT) in response.text
    # Below the body limit, above the upload limit: the API's own check names the upload limit.
    response = requests.post(url + PREDICT, files={"data": ("a.wav", b"\0" * (UPLOAD_LIMIT + 1))},
                             timeout=REQUEST_TIMEOUT_S)  # fmt: skip
    assert response.status_code == 422 and f"the largest accepted is {UPLOAD_LIMIT} bytes" in response.text
    clip = demo_clip("yes")
    response = requests.post(url + PREDICT, files={"data": (clip.name, clip.read_bytes())}, timeout=REQUEST_TIMEOUT_S)
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "ok"
