"""Latency of one prediction in-process and through ``deepaas-run`` on loopback, and throughput
with concurrent clients.

    python benchmarks/predict_latency.py --train-demo conv          # trains a throwaway model first
    python benchmarks/predict_latency.py --models-dir models --run 2025-01-01_120000

Every phase is bounded by a request count and by a time limit. The HTTP
phases start their own ``deepaas-run`` on a free 127.0.0.1 port, serving the
chosen models folder; it is stopped at the end.
"""

from __future__ import annotations

import argparse
import concurrent.futures
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


def in_process(models_dir: Path, run: str | None, clip: Path, count: int, max_seconds: float) -> dict:
    from speechclas.audio import decode_audio, fix_length
    from speechclas.predict import PredictorCache, predict_request
    from speechclas.rundir import find_run

    cache = PredictorCache()
    predictor = cache.get(find_run(models_dir, run))
    settings = predictor.settings
    window = fix_length(decode_audio(clip, settings.sample_rate).samples, settings.desired_samples)

    def request():
        predict_request(cache, models_dir, file=clip, run=run)

    timed_calls(request, 10, max_seconds)  # warm-up
    return {
        "run": predictor.run.name,
        "request": timed_calls(request, count, max_seconds),
        "model": timed_calls(lambda: predictor.probabilities(window), count, max_seconds),
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_deepaas(models_dir: Path, home: Path, workers: int) -> tuple[subprocess.Popen, str]:
    """``deepaas-run`` serving `models_dir`, through a project folder of its own (SPEECHCLAS_HOME)."""
    import requests

    (home / "etc").mkdir(parents=True)
    shutil.copy(REPO / "etc" / "config.yaml", home / "etc" / "config.yaml")
    (home / "models").symlink_to(models_dir.resolve(), target_is_directory=True)
    port = free_port()
    env = {**os.environ, "SPEECHCLAS_HOME": str(home), "TF_CPP_MIN_LOG_LEVEL": "2"}
    command = [str(Path(sys.executable).parent / "deepaas-run"), "--listen-ip", "127.0.0.1",
               "--listen-port", str(port), "--workers", str(workers)]  # fmt: skip
    log = (home / "deepaas.log").open("w")
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"deepaas-run exited; see {home / 'deepaas.log'}")
        try:
            requests.get(url + "/v2/", timeout=2)
            return process, url
        except requests.ConnectionError:
            time.sleep(0.5)
    process.terminate()
    raise SystemExit("deepaas-run did not start within 180 s")


def over_http(url: str, run: str, clip: Path, count: int, concurrency: int, max_seconds: float) -> dict:
    import requests

    endpoint = url + "/v2/models/speechclas/predict/"
    data = clip.read_bytes()

    def client(session: requests.Session, requests_left: int, deadline: float) -> list[float]:
        def request():
            response = session.post(endpoint, files={"data": (clip.name, data, "audio/wav")},
                                    data={"run": run}, timeout=60)  # fmt: skip
            response.raise_for_status()

        return timed_calls(request, requests_left, deadline - time.monotonic())

    with requests.Session() as session:
        client(session, 10, time.monotonic() + max_seconds)  # warm-up: every worker has loaded the run
        single = client(session, count, time.monotonic() + max_seconds)

    sessions = [requests.Session() for _ in range(concurrency)]
    deadline = time.monotonic() + max_seconds
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda s: client(s, count // concurrency, deadline), sessions))
    elapsed = time.perf_counter() - started
    for session in sessions:
        session.close()
    loaded = [d for durations in results for d in durations]
    return {"single": single, "loaded": loaded, "throughput": len(loaded) / elapsed}


def row(name: str, durations: list[float]) -> str:
    median, p95 = statistics.median(durations) * 1000, percentile(durations, 0.95) * 1000
    return f"| {name:<44} | {len(durations):>5} | {median:>8.2f} | {p95:>8.2f} |"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--models-dir", type=Path, help="folder of trained runs to serve")
    source.add_argument("--train-demo", metavar="ARCHITECTURE", help="train a throwaway model of this architecture")
    parser.add_argument("--run", help="run to use (default: the served one)")
    parser.add_argument("--clip", type=Path, default=min((DEMO_DATA / "yes").glob("*.wav")), help="audio file to send")
    parser.add_argument("--requests", type=int, default=200, help="requests per phase (default 200)")
    parser.add_argument("--max-seconds", type=float, default=30.0, help="time limit per phase (default 30)")
    parser.add_argument("--concurrency", type=int, default=4, help="concurrent HTTP clients (default 4)")
    parser.add_argument("--workers", type=int, default=1, help="deepaas-run --workers (default 1)")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.basicConfig(level=logging.WARNING)

    with tempfile.TemporaryDirectory(prefix="speechclas-bench-") as scratch:
        models_dir = args.models_dir
        if args.train_demo:
            models_dir = Path(scratch) / "models"
            train_demo_model(args.train_demo, models_dir)
        local = in_process(models_dir, args.run, args.clip, args.requests, args.max_seconds)
        process, url = start_deepaas(models_dir, Path(scratch) / "home", args.workers)
        try:
            http = over_http(url, local["run"], args.clip, args.requests, args.concurrency, args.max_seconds)
        finally:
            process.terminate()
            process.wait(timeout=30)

    print(f"run {local['run']}, clip {args.clip.name}, deepaas-run --workers {args.workers}, "
          f"{os.cpu_count()} CPUs")  # fmt: skip
    print("| what                                         |     n | median ms |  p95 ms |")
    print("|----------------------------------------------|------:|----------:|--------:|")
    print(row("in-process: model only (one 1 s window)", local["model"]))
    print(row("in-process: predict_request (decode + model)", local["request"]))
    print(row("HTTP deepaas-run, 1 client", http["single"]))
    print(row(f"HTTP deepaas-run, {args.concurrency} concurrent clients", http["loaded"]))
    print(f"throughput with {args.concurrency} clients: {http['throughput']:.1f} requests/s")
    in_process_median = statistics.median(local["request"])
    print(f"HTTP / in-process median latency: {statistics.median(http['single']) / in_process_median:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
