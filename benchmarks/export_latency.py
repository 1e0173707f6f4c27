"""Size, test accuracy and single-clip latency of every export of a run,
measured in one run, with ratios to the SavedModel.

    python benchmarks/export_latency.py                       # trains ds_cnn on data/demo, micro and mfcc
    python benchmarks/export_latency.py --run models/2026-11-21_101500 --calls 500 --threads 1

Each export is run as a deployment runs it, on one clip: the SavedModel's
``audio`` signature and the frozen ``model.pb`` (``decoded_sample_data``) in
TensorFlow, ``model.tflite`` and ``model_int8.tflite`` in LiteRT's
interpreter with its default (XNNPACK) delegate. The exports that take
features (int8 always, float TFLite with ``preprocess=micro``) get them
computed outside, as a device's frontend would, and that time is reported on
its own line and added in the "with features" column. The int8 input is
quantised and its output dequantised with model.json's scale and zero point
(inside the timed call). The calls go round-robin over the exports, a few at
a time, so load on a shared machine falls on all of them alike. Test
accuracy and size come from stats/metrics.json ``exports``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from ai_edge_litert.interpreter import Interpreter  # noqa: E402

from speechclas import export  # noqa: E402
from speechclas.audio import decode_audio, place_in_window  # noqa: E402
from speechclas.features import FeatureSettings, compute_features, feature_settings  # noqa: E402
from speechclas.rundir import RunDir  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DEMO_DATA = REPO / "data" / "demo"
EXPORTS = ("saved_model", "model.pb", "model.tflite", "model_int8.tflite")
CALLS_PER_ROUND = 10


def demo_config(models_dir: Path, preprocess: str, steps: str, learning_rate: str):
    """ds_cnn (the architecture meant for microcontrollers) on the demo data,
    40 % of the speakers held out for the test so one clip weighs 0.6 points,
    as tests/test_export.py trains it."""
    from speechclas.config import load_config

    overrides = {
        "data_dir": str(DEMO_DATA), "models_dir": str(models_dir), "model_architecture": "ds_cnn",
        "preprocess": preprocess, "how_many_training_steps": steps, "learning_rate": learning_rate,
        "batch_size": 50, "validation_percentage": 10, "testing_percentage": 40,
        "eval_step_interval": 1000, "save_step_interval": 1000,
    }  # fmt: skip
    if preprocess == "micro":
        overrides["window_stride_ms"] = 20  # TF's micro_speech: 30 ms windows every 20 ms, 49 frames
    return load_config(overrides)


def train_demo_run(models_dir: Path, preprocess: str, steps: str, learning_rate: str) -> RunDir:
    from speechclas.train import train

    return train(demo_config(models_dir, preprocess, steps, learning_rate), progress=False).run


def settings_of(description: dict) -> FeatureSettings:
    """The run's feature settings, from model.json."""
    features = description["features"]
    return feature_settings(
        sample_rate=features["sample_rate"], clip_duration_ms=features["clip_duration_ms"],
        window_size_ms=features["window_size_ms"], window_stride_ms=features["window_stride_ms"],
        feature_bin_count=features["feature_bin_count"], preprocess=features["preprocess"],
    )  # fmt: skip


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


@dataclasses.dataclass
class Timed:
    """One thing to time: a call without arguments, and its durations (s)."""

    name: str
    call: Callable[[], object]
    durations: list[float] = dataclasses.field(default_factory=list)

    def run(self, count: int) -> None:
        for _ in range(count):
            started = time.perf_counter()
            self.call()
            self.durations.append(time.perf_counter() - started)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.durations) * 1000

    @property
    def p90_ms(self) -> float:
        return percentile(self.durations, 0.9) * 1000


def measure(timed: list[Timed], calls: int, warmup: int) -> None:
    """`warmup` untimed calls each, then `calls` timed calls each, round-robin
    in rounds of CALLS_PER_ROUND."""
    for item in timed:
        for _ in range(warmup):
            item.call()
    for item in timed:
        item.durations.clear()
    done = 0
    while done < calls:
        count = min(CALLS_PER_ROUND, calls - done)
        for item in timed:
            item.run(count)
        done += count


def litert_model(path: Path, threads: int) -> Callable[[np.ndarray], np.ndarray]:
    """A TFLite model in LiteRT (default delegate), loaded once: one example
    in, float scores out; an int8 model's input quantised and output
    dequantised in the call, with the model's own scale and zero point."""
    interpreter = Interpreter(model_path=str(path), num_threads=threads)
    interpreter.allocate_tensors()
    model_input = interpreter.get_input_details()[0]
    model_output = interpreter.get_output_details()[0]

    def call(example: np.ndarray) -> np.ndarray:
        values = np.asarray(example, np.float32).reshape(model_input["shape"])
        if model_input["dtype"] == np.int8:
            values = export.quantize(values, *model_input["quantization"])
        interpreter.set_tensor(model_input["index"], values)
        interpreter.invoke()
        scores = interpreter.get_tensor(model_output["index"])[0]
        if model_output["dtype"] == np.int8:
            scale, zero_point = model_output["quantization"]
            return (scores.astype(np.float32) - zero_point) * scale
        return scores

    return call


def frozen_graph_call(path: Path, samples: np.ndarray, sample_rate: int, threads: int) -> Callable[[], np.ndarray]:
    """model.pb fed decoded samples, in a Session that stays open."""
    graph_def = tf.compat.v1.GraphDef()
    graph_def.ParseFromString(path.read_bytes())
    graph = tf.Graph()
    with graph.as_default():
        tf.compat.v1.import_graph_def(graph_def, name="")
    config = tf.compat.v1.ConfigProto(intra_op_parallelism_threads=threads, inter_op_parallelism_threads=threads)
    session = tf.compat.v1.Session(graph=graph, config=config)
    feed = {f"{export.DECODED_INPUT}:0": samples[:, None], f"{export.DECODED_INPUT}:1": sample_rate}
    return lambda: session.run(f"{export.SOFTMAX_OUTPUT}:0", feed)[0]


def saved_model_call(path: Path, samples: np.ndarray) -> Callable[[], np.ndarray]:
    signature = tf.saved_model.load(str(path)).signatures[export.AUDIO_SIGNATURE]
    audio = tf.constant(samples[None, :])
    return lambda: signature(audio=audio)[export.SOFTMAX_OUTPUT].numpy()[0]


def benchmark_run(run: RunDir, clip: Path, calls: int, warmup: int, threads: int) -> dict:
    """Every export's size, accuracy and latency on `clip`; answers the table's rows."""
    description = json.loads(run.model_json_path.read_text())
    settings = settings_of(description)
    exports_metrics = json.loads(run.metrics_path.read_text()).get("exports", {}) if run.metrics_path.is_file() else {}
    samples = place_in_window(decode_audio(clip.read_bytes(), settings.sample_rate).samples,
                              settings.desired_samples)[0]  # fmt: skip
    features_function = tf.function(
        lambda audio: compute_features(audio, settings),
        input_signature=[tf.TensorSpec([1, settings.desired_samples], tf.float32)],
    )
    audio = tf.constant(samples[None, :])
    features = features_function(audio).numpy()
    features_timed = Timed("features", lambda: features_function(audio).numpy())

    calls_by_export = {
        "saved_model": saved_model_call(run.saved_model_dir, samples),
        "model.pb": frozen_graph_call(run.frozen_graph_path, samples, settings.sample_rate, threads),
    }
    takes = {"saved_model": "audio", "model.pb": "audio"}
    timed = [features_timed]
    for name in ("model.tflite", "model_int8.tflite"):
        takes[name] = description["exports"][name]["takes"]
        model = litert_model(run.ckpts / name, threads)
        if takes[name] == "features":
            calls_by_export[name] = lambda model=model: model(features)
            timed.append(Timed(f"{name} with features", lambda model=model: model(features_function(audio).numpy())))
        else:
            calls_by_export[name] = lambda model=model: model(samples)
    timed += [Timed(name, call) for name, call in calls_by_export.items()]
    measure(timed, calls, warmup)
    by_name = {item.name: item for item in timed}

    rows = []
    for name in EXPORTS:
        model = by_name[name]
        end_to_end = by_name.get(f"{name} with features", model)
        entry = exports_metrics.get(name, {})
        rows.append({
            "export": name, "takes": takes[name], "bytes": entry.get("bytes") or _size_bytes(run.ckpts / name),
            "test_accuracy": entry.get("test_accuracy"), "median_ms": model.median_ms, "p90_ms": model.p90_ms,
            "end_to_end_ms": end_to_end.median_ms, "end_to_end_p90_ms": end_to_end.p90_ms,
        })  # fmt: skip
    return {"run": run.name, "settings": settings, "rows": rows, "features": features_timed,
            "architecture": run.settings().get("model_architecture", "?")}  # fmt: skip


def _size_bytes(path: Path) -> int:
    if path.is_dir():
        return sum(item.stat().st_size for item in path.rglob("*") if item.is_file())
    return path.stat().st_size


def print_table(result: dict, calls: int, threads: int) -> None:
    settings = result["settings"]
    features = result["features"]
    print(f"\nrun {result['run']}: {result['architecture']}, preprocess={settings.preprocess}, "
          f"input {settings.spectrogram_length}x{settings.fingerprint_width}; {calls} calls each, "
          f"{threads} thread(s), {os.cpu_count()} CPUs")  # fmt: skip
    print(f"features computed outside (TF op, one clip): median {features.median_ms:.2f} ms, "
          f"p90 {features.p90_ms:.2f} ms\n")  # fmt: skip
    print("| export | takes | bytes | size / SavedModel | test accuracy | model median / p90 ms "
          "| with features median / p90 ms | latency / SavedModel |")  # fmt: skip
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    reference = result["rows"][0]
    for row in result["rows"]:
        accuracy = "-" if row["test_accuracy"] is None else f"{100 * row['test_accuracy']:.1f} %"
        print(f"| `{row['export']}` | {row['takes']} | {row['bytes']:,} | {row['bytes'] / reference['bytes']:.3f} "
              f"| {accuracy} | {row['median_ms']:.2f} / {row['p90_ms']:.2f} "
              f"| {row['end_to_end_ms']:.2f} / {row['end_to_end_p90_ms']:.2f} "
              f"| {row['end_to_end_ms'] / reference['end_to_end_ms']:.2f} |")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, action="append",
                        help="a finished run folder (repeatable); default: train ds_cnn on data/demo, micro and mfcc")
    parser.add_argument("--preprocess", nargs="+", default=["micro", "mfcc"], choices=["micro", "mfcc", "average"],
                        help="the demo runs to train without --run (default: micro mfcc)")
    parser.add_argument("--steps", default="250,50", help="training steps of a demo run (default 250,50)")
    parser.add_argument("--learning-rate", default="0.003,0.0005", help="one per stage of --steps")
    parser.add_argument("--clip", type=Path, default=min((DEMO_DATA / "yes").glob("*.wav")), help="audio file")
    parser.add_argument("--calls", type=int, default=500, help="timed calls per export (default 500)")
    parser.add_argument("--warmup", type=int, default=20, help="untimed calls first (default 20)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="LiteRT num_threads and TensorFlow's op threads (default: the CPU count)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    # Before TensorFlow starts its runtime: the same thread count for TF and LiteRT.
    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="speechclas-export-bench-") as scratch:
        runs = [RunDir(path) for path in args.run or []]
        for run in runs:
            if not run.is_finished() or not run.model_json_path.is_file():
                parser.error(f"{run.root} is not a finished run with ckpts/model.json")
        if not runs:
            runs = [train_demo_run(Path(scratch) / preprocess, preprocess, args.steps, args.learning_rate)
                    for preprocess in args.preprocess]  # fmt: skip
        results = [benchmark_run(run, args.clip, args.calls, args.warmup, args.threads) for run in runs]
    for result in results:
        print_table(result, args.calls, args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
