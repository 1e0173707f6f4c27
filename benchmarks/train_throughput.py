"""Samples/s of the full training step (pipeline + model) against the model
step alone on precomputed batches, for several architectures.

The ratio full / model-only is the input pipeline's efficiency: 1.0 means
the model never waits for data. Both figures come from the same run, so the
ratio holds on a busy machine even when the absolute numbers do not.

    python benchmarks/train_throughput.py --data-dir data/demo --steps 30
"""

from __future__ import annotations

import argparse
import logging
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

from speechclas import architectures  # noqa: E402
from speechclas.config import load_config  # noqa: E402
from speechclas.features import settings_from_config  # noqa: E402
from speechclas.train import make_optimizer, make_train_step, prepare_data, training_pipeline  # noqa: E402

DEFAULT_ARCHITECTURES = ("conv", "low_latency_conv", "tiny_conv", "ds_cnn")


def time_steps(step_fn, batches, steps: int, max_seconds: float) -> tuple[int, float]:
    """Run up to `steps` steps (or `max_seconds`) after two warm-up steps."""
    for _ in range(2):
        features, labels = next(batches)
        step_fn(features, labels)[0].numpy()
    started = time.perf_counter()
    done = 0
    while done < steps and time.perf_counter() - started < max_seconds:
        features, labels = next(batches)
        loss, _ = step_fn(features, labels)
        done += 1
    loss.numpy()  # wait for the last step
    return done, time.perf_counter() - started


def cycle(items):
    while True:
        yield from items


def measure(name: str, config, settings, prepared, steps: int, max_seconds: float) -> dict:
    config = config.replace(model_architecture=name)
    dataset = training_pipeline(config, settings, prepared.training)
    model = architectures.build_model(name, settings.input_shape, len(prepared.index.labels), config.dropout_rate,
                                      width=config.model_width)
    optimizer = make_optimizer(config.optimizer, config.learning_rate[0])
    optimizer.build(model.trainable_variables)
    step = make_train_step(model, optimizer, tf.Variable(0, dtype=tf.int64), check_nans=False)

    precomputed = [(features, labels) for features, labels in dataset.take(8)]
    model_steps, model_seconds = time_steps(step, cycle(precomputed), steps, max_seconds)
    full_steps, full_seconds = time_steps(step, iter(dataset), steps, max_seconds)
    batch = config.batch_size
    full_rate = full_steps * batch / full_seconds
    model_rate = model_steps * batch / model_seconds
    return {
        "architecture": name,
        "parameters": model.count_params(),
        "full_samples_per_s": full_rate,
        "model_only_samples_per_s": model_rate,
        "efficiency": full_rate / model_rate,
        "steps": (full_steps, model_steps),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default="data/demo")
    parser.add_argument("--architectures", default=",".join(DEFAULT_ARCHITECTURES))
    parser.add_argument("--steps", type=int, default=30, help="timed steps per measurement")
    parser.add_argument("--seconds", type=float, default=60.0, help="time limit per measurement")
    parser.add_argument("--batch-size", type=int, default=100)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    config = load_config({"data_dir": args.data_dir, "batch_size": args.batch_size})
    settings = settings_from_config(config)
    prepared = prepare_data(config, settings, config.path("data_dir"), config.path("data_splits_dir"))
    device = "GPU" if tf.config.list_physical_devices("GPU") else f"CPU ({os.cpu_count()} cores)"
    print(f"TensorFlow {tf.__version__} on {device}, batch {args.batch_size}, data {args.data_dir}")
    print(f"{'architecture':<18} {'params':>9} {'full samples/s':>15} {'model-only samples/s':>21} {'full/model':>11}")
    for name in args.architectures.split(","):
        result = measure(name, config, settings, prepared, args.steps, args.seconds)
        print(
            f"{name:<18} {result['parameters']:>9,} {result['full_samples_per_s']:>15.0f} "
            f"{result['model_only_samples_per_s']:>21.0f} {result['efficiency']:>11.2f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
