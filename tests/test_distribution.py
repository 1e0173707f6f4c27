"""distribution=mirrored on 2 logical CPU devices and distribution=multi_worker as 2 local
processes on loopback ports: they train what one device trains, write one run, and a dead
worker fails the run instead of hanging it.

Logical CPU devices and the multi-worker servers are set before TensorFlow starts, so every
training here runs in a process of its own.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from speechclas import cli
from speechclas.rundir import RunDir
from tests.processes import free_port

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "data" / "demo"
HANG_BOUND_S = 90  # a dead peer is seen within seconds; this only catches a hang

# One process, 2 logical CPUs: 20 steps on one device at global batch 32, then 20 steps of the
# same batches mirrored over both devices (16 each). The batches are the same examples (one
# input pipeline, split into consecutive halves) and, with no random augmentation, the same
# features; tiny_conv without dropout has no other randomness and no batch statistics.
SAME_LOSS = """
import json, sys
import numpy as np
import tensorflow as tf
from speechclas import distribution, train
from speechclas.config import load_config
from speechclas.features import settings_from_config
from speechclas.limits import Limits
mirrored = distribution.place("mirrored", replicas=2)
single = distribution.place("none")
config = load_config({"data_dir": sys.argv[1], "model_architecture": "tiny_conv", "dropout_rate": 0.0,
                      "batch_size": 32, "time_shift_ms": 0, "background_frequency": 0.0, "speed_perturbation": 0,
                      "pitch_perturbation": 0, "gain_db": 0, "spec_time_masks": 0, "spec_freq_masks": 0,
                      "silence_percentage": 0, "learning_rate": "0.002", "how_many_training_steps": "20"})
settings = settings_from_config(config)
limits = Limits.defaults().replace(shard_cache_dir=sys.argv[2])
prepared = train.prepare_data(config, settings, config.path("data_dir"), config.path("data_splits_dir"), limits)
losses, initial = {}, None
for placement in (single, mirrored):
    with placement.strategy.scope():
        model = train.build_network(config, settings, len(prepared.index.labels))
        initial = initial or model.get_weights()
        model.set_weights(initial)
        optimizer = train.make_optimizer("adam", 0.002)
        optimizer.build(model.trainable_variables)
        step = tf.Variable(0, dtype=tf.int64, trainable=False)
    batches = iter(train.distributed_pipeline(config, settings, prepared.training, placement))
    step_fn = train.make_train_step(model, optimizer, step, False, strategy=placement.distributed_strategy)
    losses[placement.kind] = [float(step_fn(*next(batches))[0]) for _ in range(20)]
    losses[placement.kind + "_steps"] = int(step.numpy())
losses["replicas"] = mirrored.replicas
print(json.dumps(losses))
"""


def run_python(script: str, *args, timeout=300) -> str:
    done = subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": "-1"},
                          cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().splitlines()[-1]


def test_mirrored_steps_give_the_single_device_loss(tmp_path):
    result = json.loads(run_python(SAME_LOSS, DEMO, tmp_path / "cache"))
    assert result["replicas"] == 2 and result["none_steps"] == result["mirrored_steps"] == 20
    single, mirrored = result["none"], result["mirrored"]
    assert single[-1] < single[0]  # it learns
    # The same arithmetic up to the order of the gradient sum (two halves added, not one batch):
    # float32 rounding, about 1e-7 relative a step; 20 Adam steps grew it to 4e-6 at most here
    # (a loss near 10). 1e-4 relative leaves room for other CPUs' kernels and catches any real
    # difference (another batch, a loss scaled twice or not summed: 5 % and more).
    for one, two in zip(single, mirrored, strict=True):
        assert abs(one - two) <= 1e-4 * max(1.0, abs(one)), (single, mirrored)


def tiny(models_dir: Path, *extra: str) -> list[str]:
    return [f"data_dir={DEMO}", f"models_dir={models_dir}", "model_architecture=tiny_conv",
            "how_many_training_steps=30,10", "learning_rate=0.002,0.0005", "batch_size=32",
            "eval_step_interval=20", "save_step_interval=20", "streaming_minutes=0.25",
            "streaming_noise_minutes=0.25", *extra]


def train_process(args: list[str], log: Path, **env) -> subprocess.Popen:
    environment = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": "-1", **env}
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-m", "speechclas.cli", "--no-progress", *args], stdout=out,
                                stderr=subprocess.STDOUT, env=environment, cwd=ROOT, start_new_session=True)


def finished_runs(models_dir: Path) -> list[RunDir]:
    return [RunDir(p) for p in sorted(models_dir.iterdir()) if RunDir(p).is_finished()] if models_dir.is_dir() else []


def test_mirrored_on_two_logical_cpus_trains_and_exports_one_run(tmp_path):
    models = tmp_path / "models"
    process = train_process(tiny(models, "distribution=mirrored", "replicas=2"), tmp_path / "train.log",
                            SPEECHCLAS_SHARD_CACHE_DIR=str(tmp_path / "cache"))
    assert process.wait(timeout=300) == 0, (tmp_path / "train.log").read_text()[-3000:]
    [run] = finished_runs(models)
    metrics = json.loads(run.metrics_path.read_text())
    assert metrics["steps"] == 40 and metrics["testing"]["accuracy"] > 2 / len(metrics["labels"])
    assert abs(metrics["exports"]["model.pb"]["test_accuracy"] - metrics["testing"]["accuracy"]) < 0.03
    assert "Distribution mirrored: 2 replicas" in (run.logs / "train.log").read_text()


def cluster(tmp_path: Path, count: int = 2) -> list[dict]:
    workers = [f"localhost:{free_port()}" for _ in range(count)]
    return [{"TF_CONFIG": json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": i}}),
             "SPEECHCLAS_SHARD_CACHE_DIR": str(tmp_path / f"cache{i}"), "TMPDIR": str(tmp_path / f"tmp{i}")}
            for i in range(count)]


def start_cluster(tmp_path: Path, *extra: str) -> list[subprocess.Popen]:
    processes = []
    for i, env in enumerate(cluster(tmp_path)):
        Path(env["TMPDIR"]).mkdir()
        args = tiny(tmp_path / f"models{i}", "distribution=multi_worker", "collective_timeout_s=60", *extra)
        processes.append(train_process(args, tmp_path / f"worker{i}.log", **env))
    return processes


def stop(processes) -> None:
    for process in processes:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)


def test_multi_worker_writes_one_run_that_is_served_and_predicts(tmp_path, capsys):
    processes = start_cluster(tmp_path)
    try:
        codes = [process.wait(timeout=300) for process in processes]
    finally:
        stop(processes)
    logs = [(tmp_path / f"worker{i}.log").read_text() for i in range(2)]
    assert codes == [0, 0], logs[0][-2000:] + logs[1][-2000:]
    [run] = finished_runs(tmp_path / "models0")  # the chief's
    assert not (tmp_path / "models1").exists()  # the other worker writes no run
    assert list((tmp_path / "tmp1").iterdir()) == []  # and cleans its temporary checkpoints
    assert json.loads(logs[1][logs[1].rindex('{\n  "run"'):])["task"] == "worker 1 of 2 workers"
    assert json.loads(run.metrics_path.read_text())["steps"] == 40
    clip = sorted((DEMO / "yes").iterdir())[0]
    capsys.readouterr()
    assert cli.predict_main([str(clip), "--models-dir", str(tmp_path / "models0"), "--run", run.name]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["status"] == "ok" and len(answer["predictions"]) == 5
    assert answer["predictions"][0]["label"] in json.loads(run.metrics_path.read_text())["labels"]


def test_a_dead_worker_fails_the_chief_within_the_hang_bound(tmp_path):
    processes = start_cluster(tmp_path, "how_many_training_steps=100000,10")
    chief_log = tmp_path / "worker0.log"
    try:
        deadline = time.monotonic() + 180
        while "Model tiny_conv" not in chief_log.read_text():
            assert processes[0].poll() is None and time.monotonic() < deadline, chief_log.read_text()[-3000:]
            time.sleep(0.5)
        time.sleep(3)  # inside the step loop
        os.killpg(processes[1].pid, signal.SIGKILL)
        killed = time.monotonic()
        try:
            code = processes[0].wait(timeout=HANG_BOUND_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the chief still runs {HANG_BOUND_S} s after its peer died")
        waited = time.monotonic() - killed
    finally:
        stop(processes)
    log = chief_log.read_text()
    assert code == 1, log[-3000:]
    assert "another worker died or stopped answering" in log and waited < HANG_BOUND_S
    assert finished_runs(tmp_path / "models0") == []  # left unfinished, never served
