"""Servers the tests start as real processes: deepaas-run and speechclas-web on loopback."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

START_TIMEOUT_S = 180


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def deepaas_command(port: int, workers: int) -> list[str]:
    """deepaas-run of this interpreter's environment on a loopback port."""
    return [str(Path(sys.executable).parent / "deepaas-run"), "--listen-ip", "127.0.0.1",
            "--listen-port", str(port), "--workers", str(workers)]  # fmt: skip


def serve_command(port: int, workers: int) -> list[str]:
    """speechclas-serve (deepaas-run with the body limit of the environment's Limits) of this checkout."""
    return [sys.executable, "-m", "speechclas.serve", "--listen-ip", "127.0.0.1", "--listen-port", str(port),
            "--workers", str(workers)]  # fmt: skip


def wait_until_serving(url: str, process: subprocess.Popen, log: Path, path: str = "/v2/",
                       timeout_s: float = START_TIMEOUT_S) -> None:
    """Until `url` + `path` answers 200; fails the test with the log's end if the process dies or never answers."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"{process.args[0]} exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if requests.get(f"{url}{path}", timeout=2).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.5)
    pytest.fail(f"{process.args[0]} did not answer within {timeout_s} s:\n{log.read_text()[-3000:]}")


@contextlib.contextmanager
def running(command: list[str], env: dict[str, str], cwd: Path, log: Path):
    """A process with its output in `log`, stopped (terminate, then kill) on exit."""
    with log.open("w") as output:
        process = subprocess.Popen(command, env=env, cwd=cwd, stdout=output, stderr=subprocess.STDOUT)
    try:
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
