"""Samples/s of the training input pipeline alone, the model step alone and the full
training step, for several recipes, with the augmentation in either place (augment_on).

For each recipe (``ds_cnn``: config.yaml's defaults with ds_cnn; ``quickstart``:
scripts/quickstart.sh's QUICKSTART_TRAIN without its synthetic_* entries; or any
architecture's name) and each placement:

- pipeline: iterate the training dataset, no model (input_pipeline: augmented
  feature batches; train_step: int16 audio batches, the augmentation being left
  to the step);
- in-step prep (train_step only): the compiled batch_preparation alone, on
  cycled int16 batches (what the step adds to the model);
- model-only: the training step on 8 precomputed feature batches, cycled;
- full: the training step fed by its pipeline (train_step: augmenting in the step);
- full / model-only: 1.0 means the model never waits for its batches.

Model-only is timed just before and just after the full step (their mean is
reported), so the ratio holds on a busy machine even when the absolute numbers do
not. CPU ms/sample (process time, all threads of this process, so not the other
jobs of a shared machine) tells what each part costs; on C cores the full step
cannot beat C / (pipeline CPU + model CPU) samples/s.

    python benchmarks/train_throughput.py --data-dir data/demo --steps 30
    python benchmarks/train_throughput.py --recipes quickstart --placements train_step --intra-op 2 --inter-op 1
    python benchmarks/train_throughput.py --private-threadpool 1 --autotune-ram-mb 256   # tf.data knobs

The threading and tf.data options are diagnostic knobs of this benchmark only; a
training uses TensorFlow's defaults.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import tensorflow as tf  # noqa: E402
from quickstart_recipe import quickstart_overrides  # noqa: E402

from speechclas import train  # noqa: E402
from speechclas.config import load_config  # noqa: E402
from speechclas.features import settings_from_config  # noqa: E402

DEFAULT_RECIPES = ("ds_cnn", "quickstart")
PLACEMENTS = ("input_pipeline", "train_step")
PRECOMPUTED_BATCHES = 8


def recipe_overrides(name: str) -> dict[str, str]:
    """``quickstart``: the quick start's training without synthetic voices (they add clips,
    not work per step); otherwise an architecture with config.yaml's defaults."""
    if name == "quickstart":
        return {k: v for k, v in quickstart_overrides().items() if not k.startswith("synthetic_")}
    return {"model_architecture": name}


def cycle(items):
    while True:
        yield from items


class Timing:
    """Wall and process CPU time of `count` batches of `batch` samples."""

    def __init__(self, count: int, batch: int, wall: float, cpu: float):
        self.count, self.batch, self.wall, self.cpu = count, batch, wall, cpu

    @property
    def rate(self) -> float:
        return self.count * self.batch / self.wall

    @property
    def cpu_ms(self) -> float:
        return 1000 * self.cpu / (self.count * self.batch)

    def __add__(self, other: Timing) -> Timing:
        return Timing(self.count + other.count, self.batch, self.wall + other.wall, self.cpu + other.cpu)


def timed(run_one, steps: int, max_seconds: float, warmup: int, batch: int) -> Timing:
    """`warmup` untimed calls of `run_one` (the first traces), then up to `steps` timed
    ones or `max_seconds`; `run_one` answers a tensor to wait for."""
    for _ in range(warmup):
        run_one().numpy()
    started, cpu_started = time.perf_counter(), time.process_time()
    done, last = 0, None
    while done < steps and time.perf_counter() - started < max_seconds:
        last = run_one()
        done += 1
    if last is not None:
        last.numpy()  # wait for the last step
    return Timing(done, batch, time.perf_counter() - started, time.process_time() - cpu_started)


def pulling(batches, step=None):
    """One call: the next batch (through `step` when given); answers a tensor to wait for."""
    if step is None:
        return lambda: next(batches)[0]
    return lambda: step(*next(batches))[0]


def with_options(dataset: tf.data.Dataset, args) -> tf.data.Dataset:
    options = tf.data.Options()
    if args.private_threadpool:
        options.threading.private_threadpool_size = args.private_threadpool
    if args.dataset_intra_op:
        options.threading.max_intra_op_parallelism = args.dataset_intra_op
    if args.autotune_ram_mb:
        options.autotune.ram_budget = args.autotune_ram_mb * 2**20
    if args.autotune_cpu_budget:
        options.autotune.cpu_budget = args.autotune_cpu_budget
    return dataset.with_options(options)


def measure(recipe: str, placement: str, args, prepared_cache: dict) -> dict:
    overrides = {**recipe_overrides(recipe), "data_dir": args.data_dir, "batch_size": args.batch_size,
                 "augment_on": placement}
    config = load_config(overrides)
    settings = settings_from_config(config)
    key = (settings.sample_rate, settings.desired_samples)
    if key not in prepared_cache:
        prepared_cache[key] = train.prepare_data(config, settings, config.path("data_dir"),
                                                 config.path("data_splits_dir"))
    prepared = prepared_cache[key]
    tf.random.set_seed(config.random_seed)
    in_step = placement == "train_step"
    batch = config.batch_size

    features = with_options(train.training_pipeline(config, settings, prepared.training), args)
    statistics = iter(features) if config.feature_normalization == "dataset" else None
    model = train.build_network(config, settings, len(prepared.index.labels), training_batches=statistics)
    optimizer = train.make_optimizer(config.optimizer, config.learning_rate[0], config.weight_decay)
    train.exclude_from_weight_decay(optimizer, model.trainable_variables)
    optimizer.build(model.trainable_variables)
    step_var = tf.Variable(0, dtype=tf.int64, trainable=False)
    model_step = train.make_train_step(model, optimizer, step_var, False, config.label_smoothing)
    prepare = train.batch_preparation(config, settings, prepared.training) if in_step else None
    full_step = model_step if prepare is None else train.make_train_step(
        model, optimizer, step_var, False, config.label_smoothing, prepare=prepare)
    dataset = with_options(train.training_pipeline(config, settings, prepared.training, in_step=in_step), args)

    result = {"recipe": recipe, "placement": placement, "parameters": model.count_params(),
              "pipeline": timed(pulling(iter(dataset)), args.pipeline_batches, args.seconds, args.warmup, batch)}
    if in_step:
        raw = list(dataset.take(PRECOMPUTED_BATCHES))
        result["prep"] = timed(pulling(cycle(raw), tf.function(prepare)), args.steps, args.seconds, args.warmup, batch)
    del statistics
    model_once = pulling(cycle(list(features.take(PRECOMPUTED_BATCHES))), model_step)
    before = timed(model_once, args.steps, args.seconds, args.warmup, batch)
    result["full"] = timed(pulling(iter(dataset), full_step), args.steps, args.seconds, args.warmup, batch)
    after = timed(model_once, args.steps, args.seconds, 1, batch)
    result["model"] = before + after
    result["model_spread"] = abs(before.rate - after.rate) / result["model"].rate
    return result


def fmt(value: float) -> str:
    return f"{value:,.0f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default="data/demo")
    parser.add_argument("--recipes", default=",".join(DEFAULT_RECIPES),
                        help="comma-separated: quickstart or an architecture's name (config.yaml's defaults)")
    parser.add_argument("--placements", default=",".join(PLACEMENTS), help="augment_on values to time")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per measurement")
    parser.add_argument("--pipeline-batches", type=int, default=None, help="timed pipeline batches (default: --steps)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps or batches before each timing")
    parser.add_argument("--seconds", type=float, default=60.0, help="time limit per measurement")
    parser.add_argument("--batch-size", type=int, default=100)
    knobs = parser.add_argument_group("diagnostic knobs (TensorFlow's defaults otherwise)")
    knobs.add_argument("--intra-op", type=int, default=0, help="tf.config.threading intra-op threads")
    knobs.add_argument("--inter-op", type=int, default=0, help="tf.config.threading inter-op threads")
    knobs.add_argument("--private-threadpool", type=int, default=0, help="tf.data private threadpool size")
    knobs.add_argument("--dataset-intra-op", type=int, default=0, help="tf.data max_intra_op_parallelism")
    knobs.add_argument("--autotune-ram-mb", type=int, default=0, help="tf.data autotune RAM budget")
    knobs.add_argument("--autotune-cpu-budget", type=int, default=0, help="tf.data autotune CPU budget (cores)")
    args = parser.parse_args(argv)
    args.pipeline_batches = args.pipeline_batches or args.steps
    logging.basicConfig(level=logging.WARNING)
    if args.intra_op:
        tf.config.threading.set_intra_op_parallelism_threads(args.intra_op)
    if args.inter_op:
        tf.config.threading.set_inter_op_parallelism_threads(args.inter_op)

    gpus = tf.config.list_physical_devices("GPU")
    device = f"GPU ({len(gpus)})" if gpus else "CPU"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    knob_text = ", ".join(f"{k}={v}" for k, v in vars(args).items()
                          if k in {"intra_op", "inter_op", "private_threadpool", "dataset_intra_op",
                                   "autotune_ram_mb", "autotune_cpu_budget"} and v) or "TF defaults"
    print(f"TensorFlow {tf.__version__} on {device}, {cores} CPU cores usable, load average {load}; "
          f"batch {args.batch_size}, {args.steps} steps, data {args.data_dir}; {knob_text}", flush=True)

    prepared_cache: dict = {}
    results = []
    for recipe in args.recipes.split(","):
        for placement in args.placements.split(","):
            result = measure(recipe, placement, args, prepared_cache)
            results.append(result)
            print(f"  {recipe} / {placement}: pipeline {fmt(result['pipeline'].rate)}, "
                  f"model-only {fmt(result['model'].rate)}, full {fmt(result['full'].rate)} samples/s",
                  flush=True)

    print()
    print("| recipe | augment_on | parameters | pipeline samples/s | in-step prep samples/s "
          "| model-only samples/s | full samples/s | full / model-only |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        prep = fmt(r["prep"].rate) if "prep" in r else "–"
        print(f"| {r['recipe']} | {r['placement']} | {r['parameters']:,} | {fmt(r['pipeline'].rate)} | {prep} "
              f"| {fmt(r['model'].rate)} | {fmt(r['full'].rate)} | {r['full'].rate / r['model'].rate:.2f} |")
    print()
    print("CPU ms per sample (this process, all threads), and the full step's ceiling on "
          f"{cores} cores: {cores} / (augment+features CPU + model CPU):")
    print()
    print("| recipe | augment_on | pipeline | in-step prep | model-only | full | ceiling samples/s "
          "| model-only drift |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        work = r["prep"].cpu_ms if "prep" in r else r["pipeline"].cpu_ms
        ceiling = 1000 * cores / (work + r["model"].cpu_ms)
        prep = f"{r['prep'].cpu_ms:.2f}" if "prep" in r else "–"
        print(f"| {r['recipe']} | {r['placement']} | {r['pipeline'].cpu_ms:.2f} | {prep} | {r['model'].cpu_ms:.2f} "
              f"| {r['full'].cpu_ms:.2f} | {fmt(ceiling)} | {100 * r['model_spread']:.0f} % |")


if __name__ == "__main__":
    main()
