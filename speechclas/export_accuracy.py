"""The accuracy of every export of a run, each run the way a deployment runs it.

After a training, the test split is scored again through each written file:
the SavedModel's ``audio`` signature, the frozen graph fed decoded samples,
the float TFLite model and the int8 one (fed the same test features,
quantised with its own input scale and zero point) in LiteRT's interpreter.
The answer goes into stats/metrics.json as ``exports``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import tensorflow as tf

from speechclas.export import (
    AUDIO_SIGNATURE,
    DECODED_INPUT,
    SOFTMAX_OUTPUT,
    TFLiteRunner,
)
from speechclas.features import FeatureSettings, compute_features
from speechclas.rundir import RunDir

logger = logging.getLogger(__name__)

BATCH_SIZE = 256


def _batches(values: np.ndarray):
    for start in range(0, len(values), BATCH_SIZE):
        yield values[start : start + BATCH_SIZE]


def _size_bytes(path: Path) -> int:
    if path.is_dir():
        return sum(item.stat().st_size for item in path.rglob("*") if item.is_file())
    return path.stat().st_size


def saved_model_predictions(path: Path, audio: np.ndarray) -> np.ndarray:
    signature = tf.saved_model.load(str(path)).signatures[AUDIO_SIGNATURE]
    scores = [signature(audio=tf.constant(batch))[SOFTMAX_OUTPUT].numpy() for batch in _batches(audio)]
    return np.concatenate(scores).argmax(-1)


def frozen_graph_predictions(path: Path, audio: np.ndarray, sample_rate: int) -> np.ndarray:
    """One clip at a time through ``decoded_sample_data``, as the Android demo feeds it."""
    graph_def = tf.compat.v1.GraphDef()
    graph_def.ParseFromString(path.read_bytes())
    graph = tf.Graph()
    with graph.as_default():
        tf.compat.v1.import_graph_def(graph_def, name="")
    with tf.compat.v1.Session(graph=graph) as session:
        return np.array([
            session.run(f"{SOFTMAX_OUTPUT}:0", {f"{DECODED_INPUT}:0": clip[:, None],
                                                  f"{DECODED_INPUT}:1": sample_rate})[0].argmax()
            for clip in audio
        ])


def tflite_predictions(path: Path, examples: np.ndarray) -> np.ndarray:
    runner = TFLiteRunner(path)
    return np.array([runner(example).argmax() for example in examples])


def export_accuracies(
    run: RunDir, settings: FeatureSettings, audio_int16: np.ndarray, labels: np.ndarray
) -> dict[str, dict]:
    """``{export file name: {"test_accuracy", "bytes"}}`` for every export in
    model.json; the accuracy is null when the split is empty."""
    description = json.loads(run.model_json_path.read_text())["exports"]
    audio = audio_int16.astype(np.float32) / 32768.0
    takes_features = any(entry.get("takes") == "features" for entry in description.values())
    features = _features(audio, settings) if takes_features and len(labels) else None
    results = {}
    for name, entry in description.items():
        path = run.ckpts / entry["file"]
        accuracy = None
        if len(labels):
            if entry["format"] == "saved_model":
                predicted = saved_model_predictions(path, audio)
            elif entry["format"] == "frozen_graph":
                predicted = frozen_graph_predictions(path, audio, settings.sample_rate)
            elif entry["takes"] == "features":
                predicted = tflite_predictions(path, features)
            else:
                predicted = tflite_predictions(path, audio)
            accuracy = float(np.mean(predicted == labels))
        results[name] = {"test_accuracy": accuracy, "bytes": _size_bytes(path)}
        logger.info("Export %s: test accuracy %s (N=%d), %d bytes",
                    name, "-" if accuracy is None else f"{accuracy:.3f}", len(labels), results[name]["bytes"])
    return results


def _features(audio: np.ndarray, settings: FeatureSettings) -> np.ndarray:
    return np.concatenate([compute_features(tf.constant(batch), settings).numpy() for batch in _batches(audio)])
