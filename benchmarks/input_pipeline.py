"""Samples per second of the input pipelines, with no model.

Training: index sampling, time shift, background noise, silence/unknown
mixing, the configured augmentations and features, exactly as a training
builds them from the config (key=value overrides, e.g. speed_perturbation=0.1).
Evaluation: features only. Both after a warm-up, for a bounded number of
batches or seconds, whichever comes first.

    python benchmarks/input_pipeline.py [--data-dir data/demo] [--batches 100] [--batch-size 100] [key=value ...]
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import tensorflow as tf

from speechclas import pipeline, train
from speechclas.config import load_config, parse_cli_overrides
from speechclas.features import settings_from_config

ROOT = Path(__file__).resolve().parents[1]


def measure(dataset: tf.data.Dataset, batches: int, seconds: float, warmup: int) -> dict:
    """Pull `warmup` batches untimed, then time up to `batches` batches or
    `seconds` seconds. CPU time (all threads) tells the cost apart from
    whatever else the machine is running."""
    iterator = iter(dataset)
    for _ in range(warmup):
        next(iterator)
    count = samples = 0
    start, cpu_start = time.perf_counter(), time.process_time()
    while count < batches and time.perf_counter() - start < seconds:
        features, _ = next(iterator)
        samples += int(features.shape[0])
        count += 1
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return {"batches": count, "samples": samples, "elapsed": elapsed, "cpu": cpu}


def report(name: str, result: dict) -> None:
    samples, elapsed = result["samples"], result["elapsed"]
    print(
        f"{name}: {samples / elapsed:.0f} samples/s ({result['batches']} batches, {samples} samples "
        f"in {elapsed:.2f} s, {1000 * elapsed / result['batches']:.1f} ms/batch; "
        f"{1000 * result['cpu'] / samples:.2f} CPU-ms/sample)"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=ROOT / "data" / "demo", help="label folders of wavs")
    parser.add_argument("--batches", type=int, default=100, help="timed batches (after the warm-up)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: batch_size of etc/config.yaml")
    parser.add_argument("--seconds", type=float, default=60.0, help="stop timing a pipeline after this long")
    parser.add_argument("--warmup", type=int, default=5, help="untimed batches first")
    parser.add_argument("overrides", nargs="*", help="configuration key=value pairs, as for speechclas-train")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    overrides = {**parse_cli_overrides(args.overrides), "data_dir": str(args.data_dir)}
    if args.batch_size:
        overrides["batch_size"] = args.batch_size
    config = load_config(overrides)
    settings = settings_from_config(config)
    prepared = train.prepare_data(config, settings, args.data_dir, config.path("data_splits_dir"))
    training = prepared.training
    print(
        f"TensorFlow {tf.__version__}, {os.cpu_count()} CPUs visible (tf.data runs on the CPU); "
        f"data {args.data_dir}: {len(training.wanted_audio)} wanted + {len(training.unknown_audio)} unknown "
        f"training clips, {len(training.background) / settings.sample_rate:.0f} s of noise; "
        f"features {settings.input_shape} ({config.preprocess})"
    )

    training_data = train.training_pipeline(config, settings, training)
    report(f"training (batch {config.batch_size})", measure(training_data, args.batches, args.seconds, args.warmup))

    # Every evaluation clip of every split, passed over again and again.
    audio = np.concatenate([clips for clips, _ in prepared.evaluation.values()])
    labels = np.concatenate([split_labels for _, split_labels in prepared.evaluation.values()])
    evaluation_data = pipeline.evaluation_dataset(audio, labels, settings, config.batch_size).repeat()
    report(f"evaluation (batch {config.batch_size})", measure(evaluation_data, args.batches, args.seconds, args.warmup))


if __name__ == "__main__":
    main()
