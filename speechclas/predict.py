"""Scoring audio with a finished run: load it once, decode any clip, top-k labels.

A `Predictor` holds one run's SavedModel (its ``audio`` signature, which has
the feature extraction inside), its labels and its window size. Audio is
decoded by `speechclas.audio` exactly as in training; a clip longer than the
window is scored on its loudest window and a shorter one is centred, as
training places its clips, and the answer says which happened. `predict_request` is the one prediction that the
DEEPaaS API and ``speechclas-predict`` both answer.

TensorFlow is imported only when a model is loaded, so DEEPaaS's main process,
which imports this module through ``speechclas.api`` but only routes
requests, stays small.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from speechclas.audio import DecodedAudio, decode_audio, place_in_window
from speechclas.fetch import UrlPolicy, fetch_url, redact_url
from speechclas.limits import Limits
from speechclas.rundir import RunDir, find_run

logger = logging.getLogger(__name__)

DEFAULT_TOP_K = 5
# The feature settings that fix what the exported model expects as input.
_FEATURE_KEYS = (
    "sample_rate",
    "clip_duration_ms",
    "window_size_ms",
    "window_stride_ms",
    "feature_bin_count",
    "preprocess",
)


class InputError(ValueError):
    """A prediction request that cannot be served as asked (no input, two inputs...)."""


@dataclasses.dataclass(frozen=True)
class Window:
    """The part of the clip the model scored, in seconds of the clip.

    ``selection`` is ``whole`` (the clip is exactly one window), ``padded``
    (shorter: centred between zeros) or ``loudest`` (longer: its loudest window).
    """

    start_s: float
    end_s: float
    selection: str


def choose_window(samples: np.ndarray, window_samples: int, sample_rate: int):
    """The model's input for a clip of any length, placed exactly as training
    placed its clips (audio.place_in_window), and where it came from."""
    clip, start, selection = place_in_window(samples, window_samples)
    first = max(start, 0)
    end = first + min(len(samples), window_samples)
    return clip, Window(round(first / sample_rate, 3), round(end / sample_rate, 3), selection)


def run_description(run: RunDir) -> dict | None:
    """The run's ckpts/model.json (what its exports take and answer); None
    for runs exported before model.json existed."""
    try:
        return json.loads(run.model_json_path.read_text())
    except FileNotFoundError:
        return None


def _feature_inputs(run: RunDir, description: dict | None) -> dict[str, Any]:
    source = description["features"] if description is not None else run.settings()  # conf.json for older runs
    return {key: source[key] for key in _FEATURE_KEYS}


def run_sample_rate(run: RunDir) -> int:
    """The rate a run's model works at, from its model.json (no model loading)."""
    return int(_feature_inputs(run, run_description(run))["sample_rate"])


def feature_sizes(run: RunDir, description: dict | None = None):
    """`FeatureSettings` of a run, from its model.json."""
    from speechclas.features import feature_settings  # imports TensorFlow

    if description is None:
        description = run_description(run)
    return feature_settings(**_feature_inputs(run, description))


class Predictor:
    """One finished run, loaded once and ready to score clips."""

    def __init__(self, run: RunDir, labels: list[str], settings, signature):
        self.run = run
        self.labels = labels
        self.settings = settings
        self._signature = signature

    @classmethod
    def load(cls, run: RunDir) -> Predictor:
        import tensorflow as tf

        from speechclas.export import AUDIO_SIGNATURE

        description = run_description(run)
        settings = feature_sizes(run, description)
        labels = description["labels"] if description is not None else run.labels()
        signature = tf.saved_model.load(str(run.saved_model_dir)).signatures[AUDIO_SIGNATURE]
        predictor = cls(run, labels, settings, signature)
        # The first call traces the graph; pay that here, not in the first request.
        outputs = predictor.probabilities(np.zeros(settings.desired_samples, np.float32))
        if len(outputs) != len(labels):
            raise RuntimeError(
                f"run {run.name}: the model has {len(outputs)} outputs but labels.txt has {len(labels)} labels"
            )
        logger.info("Loaded run %s (%d labels) from %s", run.name, len(labels), run.root)
        return predictor

    def probabilities(self, clip: np.ndarray) -> np.ndarray:
        """Softmax over the labels for one window of `desired_samples` samples."""
        outputs = self._signature(audio=clip.reshape(1, -1).astype(np.float32, copy=False))
        return next(iter(outputs.values())).numpy()[0]

    def predict(self, audio: DecodedAudio, top_k: int = DEFAULT_TOP_K) -> dict[str, Any]:
        """Top-k labels of a decoded clip (at the model's rate), JSON-ready."""
        if audio.sample_rate != self.settings.sample_rate:
            raise ValueError(f"audio at {audio.sample_rate} Hz given to a {self.settings.sample_rate} Hz model")
        clip, window = choose_window(audio.samples, self.settings.desired_samples, audio.sample_rate)
        scores = self.probabilities(clip)
        best = np.argsort(-scores, kind="stable")[: max(1, top_k)]
        return {
            "predictions": [{"label": self.labels[i], "probability": float(f"{scores[i]:.6g}")} for i in best],
            "run": self.run.name,
            "duration_s": round(audio.duration_s, 3),
            "sample_rate": audio.original_sample_rate,
            "channels": audio.original_channels,
            "window": dataclasses.asdict(window),
        }


class PredictorCache:
    """The last few runs loaded, so a run is loaded once and not per request.

    Keyed by run folder and its DONE marker (inode, mtime and ctime), so a
    ``models/api`` folder replaced by an operator is loaded again, also by a
    copy that kept the marker's mtime (``cp -a``).
    """

    def __init__(self, max_runs: int = 3):
        self.max_runs = max_runs
        self._loaded: collections.OrderedDict[tuple[str, int, int, int], Predictor] = collections.OrderedDict()

    @staticmethod
    def _key(run: RunDir) -> tuple[str, int, int, int]:
        marker = run.done_path.stat()
        return str(run.root), marker.st_ino, marker.st_mtime_ns, marker.st_ctime_ns

    def loaded(self, run: RunDir) -> Predictor | None:
        """The run's Predictor if it is loaded and current; never loads."""
        return self._loaded.get(self._key(run))

    def get(self, run: RunDir) -> Predictor:
        key = self._key(run)
        predictor = self._loaded.get(key)
        if predictor is None:
            predictor = Predictor.load(run)
            self._loaded[key] = predictor
            while len(self._loaded) > self.max_runs:
                self._loaded.popitem(last=False)
        self._loaded.move_to_end(key)
        return predictor


def download_audio(url: str, policy: UrlPolicy) -> bytes:
    """The body of an http(s) URL, fetched safely into a private temp folder that is always removed."""
    with tempfile.TemporaryDirectory(prefix="speechclas-url-") as folder:
        return fetch_url(url, folder, **policy.kwargs()).read_bytes()


def check_one_input(file: Path | None, url: str | None) -> None:
    """A request scores exactly one input: a file or a URL (predict and detect alike)."""
    if file is None and not url:
        raise InputError("send an audio file (form field 'data') or the URL of one (field 'urls')")
    if file is not None and url:
        raise InputError("send either an audio file ('data') or a URL ('urls'), not both")


def predict_request(
    predictors: PredictorCache,
    models_dir: Path,
    *,
    file: Path | None = None,
    file_name: str | None = None,
    url: str | None = None,
    run: str | None = None,
    top_k: int = DEFAULT_TOP_K,
    limits: Limits | None = None,
) -> dict[str, Any]:
    """Score exactly one input, a local file or a URL, with the chosen (or served) run, within the
    operator's `limits` (download size, audio duration, channels, rate; default: their defaults).

    Raises InputError, audio.AudioError, fetch.FetchError and
    rundir.RunNotFoundError with messages meant for the caller.
    """
    limits = limits if limits is not None else Limits.defaults()
    check_one_input(file, url)
    run_dir = find_run(models_dir, run)
    # Decode before loading the model, so a bad input is refused without waiting for TensorFlow.
    predictor = predictors.loaded(run_dir)
    rate = predictor.settings.sample_rate if predictor is not None else run_sample_rate(run_dir)
    if file is not None:
        audio = decode_audio(file, rate, name=f"the file {file_name or Path(file).name!r}", limits=limits)
    else:
        data = download_audio(url, UrlPolicy.for_audio(limits or Limits.defaults()))
        audio = decode_audio(data, rate, name=f"the download of {redact_url(url)}", limits=limits)
    answer = (predictor or predictors.get(run_dir)).predict(audio, top_k)
    return {"predictions": answer["predictions"], **label_lists(answer["predictions"]), **answer}


def label_lists(predictions: list[dict[str, Any]]) -> dict[str, list]:
    """`predictions` as the two lists the AI4OS platform's UI shows as a classification
    (``labels`` and ``probabilities``, most probable first)."""
    return {"labels": [p["label"] for p in predictions], "probabilities": [p["probability"] for p in predictions]}
