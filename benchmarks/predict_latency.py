"""Latency of one prediction: in-process, through ``deepaas-run`` on loopback, and DEEPaaS's own
floor for comparison; then throughput with concurrent clients.

    python benchmarks/predict_latency.py --train-demo ds_cnn          # trains a throwaway model first
    python benchmarks/predict_latency.py --models-dir models --run 2025-01-01_120000

DEEPaaS's floor is a second ``deepaas-run`` serving DEEPaaS's built-in test model
(``deepaas-test``, which DEEPaaS serves when it finds no model), sent the same
clip: its multipart parsing, the copy of the upload, the hop to the worker and
back and the response validation, with a model that does nothing. The
sequential phase goes round the three (in-process request, floor, ours) one
request each, so the machine's load falls on all three alike (and TensorFlow
idles as long in this process as in the server's worker between two requests); what is ours
beyond the model is the gap: HTTP p50 - (floor p50 + in-process p50).

Every phase is bounded by a request count and by a time limit. Both servers
listen on free 127.0.0.1 ports and are stopped at the end.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import logging
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEMO_DATA = REPO / "data" / "demo"
OUR_PREDICT = "/v2/models/speechclas/predict/"
FLOOR_PREDICT = "/v2/models/deepaas-test/predict/"
# deepaas-run, made to find no model so that it serves its built-in test model.
FLOOR_LAUNCHER = """
import sys
import deepaas.model.loading
from deepaas.cmd.run import main
deepaas.model.loading.get_available_models = lambda version: {}
sys.argv[0] = "deepaas-run"
main()
"""


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def timed_calls(call, count: int, max_seconds: float) -> list[float]:
    """Seconds taken by each of up to `count` calls, stopping after `max_seconds`."""
    durations = []
    deadline = time.monotonic() + max_seconds
    while len(durations) < count and time.monotonic() < deadline:
        started = time.perf_counter()
        call()
        durations.append(time.perf_counter() - started)
    return durations


def timed_rounds(calls: dict, count: int, max_seconds: float) -> dict[str, list[float]]:
    """Seconds taken by each call of `calls`, called in turn, up to `count` rounds or `max_seconds`."""
    durations: dict[str, list[float]] = {name: [] for name in calls}
    deadline = time.monotonic() + max_seconds
    for _ in range(count):
        if time.monotonic() >= deadline:
            break
        for name, call in calls.items():
            started = time.perf_counter()
            call()
            durations[name].append(time.perf_counter() - started)
    return durations


def train_demo_model(architecture: str, models_dir: Path) -> None:
    """A throwaway model of the given architecture on the demo data: its size, not its accuracy, matters here."""
    from speechclas.config import load_config
    from speechclas.train import train

    overrides = {
        "data_dir": str(DEMO_DATA),
        "models_dir": str(models_dir),
        "model_architecture": architecture,
        "how_many_training_steps": "20",
        "learning_rate": "0.001",
        "eval_step_interval": 20,
        "batch_size": 50,
        "validation_percentage": 20,
        "testing_percentage": 20,
    }
    train(load_config(overrides), progress=False)


def in_process_calls(models_dir: Path, run: str | None, clip: Path) -> tuple[str, dict]:
    """The served run's name and the in-process calls to time: the model alone on one window,
    decoding and scoring with the loaded Predictor, and `predict_request` (which also finds the run)."""
    from speechclas.audio import decode_audio, fix_length
    from speechclas.predict import PredictorCache, predict_request
    from speechclas.rundir import find_run

    cache = PredictorCache()
    predictor = cache.get(find_run(models_dir, run))
    settings = predictor.settings
    window = fix_length(decode_audio(clip, settings.sample_rate).samples, settings.desired_samples)
    calls = {
        "model": lambda: predictor.probabilities(window),
        "decode": lambda: predictor.predict(decode_audio(clip, settings.sample_rate)),
        "request": lambda: predict_request(cache, models_dir, file=clip, run=run),
    }
    for call in calls.values():
        timed_calls(call, 10, 30)  # warm-up
    return predictor.run.name, calls


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def deepaas_options(port: int, workers: int) -> list[str]:
    return ["--listen-ip", "127.0.0.1", "--listen-port", str(port), "--workers", str(workers)]


@contextlib.contextmanager
def serving(command: list[str], env: dict, port: int, log_path: Path):
    """A server process started with `command`, its URL once it answers; stopped on exit."""
    import requests

    with log_path.open("w") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if process.poll() is not None:
                raise SystemExit(f"{command[0]} exited; see {log_path}")
            if time.monotonic() > deadline:
                raise SystemExit(f"{command[0]} did not start within 180 s; see {log_path}")
            try:
                requests.get(url + "/v2/", timeout=2)
                break
            except requests.ConnectionError:
                time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def our_server(models_dir: Path, home: Path, workers: int):
    """``deepaas-run`` serving `models_dir`, through a project folder of its own (SPEECHCLAS_HOME)."""
    (home / "etc").mkdir(parents=True)
    shutil.copy(REPO / "etc" / "config.yaml", home / "etc" / "config.yaml")
    (home / "models").symlink_to(models_dir.resolve(), target_is_directory=True)
    port = free_port()
    env = {**os.environ, "SPEECHCLAS_HOME": str(home), "TF_CPP_MIN_LOG_LEVEL": "2"}
    command = [str(Path(sys.executable).parent / "deepaas-run"), *deepaas_options(port, workers)]
    return serving(command, env, port, home / "deepaas.log")


def floor_server(folder: Path, workers: int):
    """``deepaas-run`` serving DEEPaaS's own test model (see FLOOR_LAUNCHER)."""
    port = free_port()
    command = [sys.executable, "-c", FLOOR_LAUNCHER, *deepaas_options(port, workers)]
    return serving(command, dict(os.environ), port, folder / "deepaas-floor.log")


def post_clip(session, url: str, clip_name: str, data: bytes, fields: dict) -> None:
    response = session.post(url, files={"data": (clip_name, data, "audio/wav")}, data=fields, timeout=60)
    response.raise_for_status()


def concurrent_clients(request, count: int, concurrency: int, max_seconds: float) -> dict:
    """Latencies of `concurrency` clients sending `count` requests between them, and requests/s."""
    import requests

    sessions = [requests.Session() for _ in range(concurrency)]
    deadline = time.monotonic() + max_seconds
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(
            lambda s: timed_calls(lambda: request(s), count // concurrency, deadline - time.monotonic()), sessions
        ))  # fmt: skip
    elapsed = time.perf_counter() - started
    for session in sessions:
        session.close()
    loaded = [d for durations in results for d in durations]
    return {"loaded": loaded, "throughput": len(loaded) / elapsed}


def row(name: str, durations: list[float]) -> str:
    median, p95 = statistics.median(durations) * 1000, percentile(durations, 0.95) * 1000
    return f"| {name:<48} | {len(durations):>5} | {median:>9.2f} | {p95:>7.2f} |"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--models-dir", type=Path, help="folder of trained runs to serve")
    source.add_argument("--train-demo", metavar="ARCHITECTURE", help="train a throwaway model of this architecture")
    parser.add_argument("--run", help="run to use (default: the served one, as a client naming none gets)")
    parser.add_argument("--clip", type=Path, default=min((DEMO_DATA / "yes").glob("*.wav")), help="audio file to send")
    parser.add_argument("--requests", type=int, default=200, help="requests per phase (default 200)")
    parser.add_argument("--max-seconds", type=float, default=60.0, help="time limit per phase (default 60)")
    parser.add_argument("--concurrency", type=int, default=4, help="concurrent HTTP clients (default 4)")
    parser.add_argument("--workers", type=int, default=1, help="deepaas-run --workers (default 1)")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.basicConfig(level=logging.WARNING)
    import requests

    with tempfile.TemporaryDirectory(prefix="speechclas-bench-") as scratch:
        models_dir = args.models_dir
        if args.train_demo:
            models_dir = Path(scratch) / "models"
            train_demo_model(args.train_demo, models_dir)
        run, local = in_process_calls(models_dir, args.run, args.clip)
        data = args.clip.read_bytes()
        ours_fields = {"run": args.run} if args.run else {}
        with (
            floor_server(Path(scratch), args.workers) as floor_url,
            our_server(models_dir, Path(scratch) / "home", args.workers) as our_url,
            requests.Session() as floor_session,
            requests.Session() as our_session,
        ):

            def floor():
                post_clip(floor_session, floor_url + FLOOR_PREDICT, args.clip.name, data, {"parameter": "1"})

            def ours():
                post_clip(our_session, our_url + OUR_PREDICT, args.clip.name, data, ours_fields)

            sequential = {"in-process": local["request"], "floor": floor, "ours": ours}
            timed_rounds(sequential, 10, args.max_seconds)  # warm-up: every worker has loaded the run
            # In-process TensorFlow idles between its request calls as long as the worker's does.
            timed = timed_rounds({**sequential, "model": local["model"], "decode": local["decode"]},
                                 args.requests, args.max_seconds)  # fmt: skip
            loaded = concurrent_clients(
                lambda s: post_clip(s, our_url + OUR_PREDICT, args.clip.name, data, ours_fields),
                args.requests, args.concurrency, args.max_seconds,
            )  # fmt: skip

    print(f"run {run}, clip {args.clip.name}, deepaas-run --workers {args.workers}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    print(f"| {'what':<48} |     n | median ms |  p95 ms |")
    print(f"|{'-' * 50}|------:|----------:|--------:|")
    print(row("in-process: model only (one 1 s window)", timed["model"]))
    print(row("in-process: decode + model (loaded Predictor)", timed["decode"]))
    print(row("in-process: predict_request (+ finding the run)", timed["in-process"]))
    print(row("DEEPaaS floor: deepaas-run, its test model", timed["floor"]))
    print(row("HTTP deepaas-run, 1 client", timed["ours"]))
    print(row(f"HTTP deepaas-run, {args.concurrency} concurrent clients", loaded["loaded"]))
    print(f"throughput with {args.concurrency} clients: {loaded['throughput']:.1f} requests/s")
    floor_p50, local_p50, ours_p50 = (statistics.median(timed[name]) * 1000 for name in ("floor", "in-process", "ours"))
    gap = ours_p50 - (floor_p50 + local_p50)
    print(f"gap: HTTP p50 - (floor p50 + in-process p50) = {ours_p50:.2f} - ({floor_p50:.2f} + {local_p50:.2f}) "
          f"= {gap:.2f} ms")  # fmt: skip
    print(f"HTTP / in-process median latency: {ours_p50 / local_p50:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
