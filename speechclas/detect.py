"""Detecting keywords in long audio: every keyword of a recording, and when it was said.

The run's model slides over the stream every `hop_ms`. The hop is a multiple
of the frame stride, so the feature frames of the stream are computed once
(block by block, with the overlap a frame needs) and each window is a slice of
them: exactly the features of that window's audio, since every frame is
computed from its own samples only. Memory is one block of audio plus one
batch, and the per-hop scores (T × labels float32: 2 h at 20 ms is 17 MB).

Two ways to score the windows:

- Shared trunk (`SharedTrunkScorer`, the default for a network whose output is
  head(mean over time of trunk(features)), its pooling layer named
  ``time_pool``: ds_cnn, and the architectures with a global time pooling).
  Convolutions are translation-equivariant in time, so the trunk runs once over
  the stream's frames (in chunks at fixed stream positions, with a window of
  overlap on each side), a window's pooled vector is the mean of its trunk
  columns (cumulative sums), and the head scores a chunk's windows in one
  batch. A hop computes about lcm(hop, S) new frames of trunk, where S is the
  trunk's time stride (4 for ds_cnn: one trunk pass per window phase modulo S),
  instead of a whole window. It is not the per-window model exactly: with
  'same' padding the columns near a window's edges see the neighbouring frames
  where the window model sees zeros. On the detection tests' trained ds_cnn,
  over a stream of its 80 held-out test words (20 ms hop): max |Δprob| 0.97
  (one window), 99th percentile 0.53, median 0.02; at threshold 0.7, 54
  detections against 57 per window, 50 of them the same (label, end within
  0.1 s), and both find 40 of the 80 words; at its calibrated threshold 0.98,
  28 against 28, 26 the same, 24 words each. The training's streaming
  evaluation scores with the same path (`keras_scorer`), so the calibrated
  threshold is the one for this scorer. A trunk that is not equivariant (a
  per-clip normalisation, checked on random frames when loading) falls back.
- Per window (`FeatureScorer`; `SharedTrunkScorer.per_window` for the
  reference): every window's frames go through the whole network, in fixed
  batches; for networks that flatten the window (conv, tiny_conv...).

Features whose frames are not each computed from their own samples
(``preprocess=pcen``: its smoother starts at a clip's first frame) are not
slices of the stream's: each window's audio goes through the model
(`AudioScorer`), features included.

The scores are then smoothed as TF's RecognizeCommands does
(tensorflow/examples/speech_commands/recognize_commands.py): each hop's
result is averaged with the previous ones within `average_window_ms`, at
least `minimum_count` results (over a quarter of the window) are needed, and
a detection fires when the top averaged label rises above `threshold`.
Labels starting with ``_`` (``_silence_``, ``_unknown_``) are never reported.
One difference: TF never reports a label twice in a row; here a label fires
again once its averaged score has fallen below the threshold and
`suppression_ms` have passed since the last detection.

TensorFlow is imported only when a model is loaded (see `speechclas.predict`).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import math
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from speechclas.audio import AudioLimits, AudioSource, open_audio
from speechclas.fetch import UrlPolicy, fetch_url, redact_url
from speechclas.limits import Limits, setting
from speechclas.predict import InputError, check_one_input, feature_sizes
from speechclas.rundir import RunDir, find_run

logger = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 256
DEFAULT_HOP_STRIDES = 2  # the default hop: this many frame strides (20 ms for a 10 ms stride)
DEFAULT_THRESHOLD = 0.7
# Decoding block: 30 s of audio (2 MB of float32 at 16 kHz), one feature computation each.
BLOCK_SECONDS = 30.0
# speechclas-detect runs on the operator's own machine: a generous bound (the scores of a day are 200 MB).
CLI_MAX_SECONDS = 24 * 3600.0
# Window starts per trunk pass of the shared-trunk path (about 80 s at a 10 ms stride): the pass
# adds a window and two margins of frames, ~7 % more for ds_cnn; its activations are ~20 MB.
SHARED_TRUNK_CHUNK_FRAMES = 8192


class DetectError(InputError):
    """Detection settings that cannot be used with this run (a hop that is not a multiple of the stride...)."""


@dataclasses.dataclass(frozen=True)
class DetectSettings:
    """How the stream is scored and smoothed; defaults as TF's test_streaming_accuracy
    (average 500 ms, threshold 0.7) and its C++ RecognizeCommands (suppression 1500 ms, 3 results)."""

    hop_ms: float  # a multiple of the frame stride; `for_features` gives the default
    average_window_ms: float = 500.0
    threshold: float = DEFAULT_THRESHOLD
    suppression_ms: float = 1500.0
    minimum_count: int = 3

    def __post_init__(self):
        problems = []
        if not self.hop_ms > 0:
            problems.append(f"hop_ms must be above 0, got {self.hop_ms}")
        if not self.average_window_ms >= 0:
            problems.append(f"average_window_ms must be at least 0, got {self.average_window_ms}")
        if not 0.0 <= self.threshold <= 1.0:
            problems.append(f"threshold must be between 0 and 1, got {self.threshold}")
        if not self.suppression_ms >= 0:
            problems.append(f"suppression_ms must be at least 0, got {self.suppression_ms}")
        if not self.minimum_count >= 1:
            problems.append(f"minimum_count must be at least 1, got {self.minimum_count}")
        if problems:
            raise DetectError("; ".join(problems))

    @classmethod
    def for_features(cls, feature_settings, **overrides) -> DetectSettings:
        """Settings for a model of these `FeatureSettings`; None values in `overrides` keep the default."""
        values = {key: value for key, value in overrides.items() if value is not None}
        values.setdefault("hop_ms", default_hop_ms(feature_settings))
        return cls(**values)

    def hop_frames(self, frame_stride_samples: int, sample_rate: int) -> int:
        """The hop in frames; a DetectError if it is not a whole number of frame strides."""
        stride_ms = 1000.0 * frame_stride_samples / sample_rate
        frames = round(self.hop_ms / stride_ms)
        if frames < 1 or abs(frames * stride_ms - self.hop_ms) > 1e-6 * max(1.0, self.hop_ms):
            raise DetectError(
                f"hop_ms {self.hop_ms:g} is not a multiple of the model's frame stride of {stride_ms:g} ms"
            )
        return frames


def default_hop_ms(feature_settings) -> float:
    return DEFAULT_HOP_STRIDES * 1000.0 * feature_settings.window_stride_samples / feature_settings.sample_rate


@dataclasses.dataclass(frozen=True)
class Detection:
    """One keyword: the audio span of the window that fired and its smoothed score."""

    label: str
    start_s: float
    end_s: float
    score: float

    def as_json(self) -> dict[str, Any]:
        return {"label": self.label, "start_s": round(self.start_s, 3), "end_s": round(self.end_s, 3),
                "score": round(self.score, 4)}  # fmt: skip


# --- scoring windows ------------------------------------------------------------------


class WindowScorer(Protocol):
    """A model cut in two: the frames of a piece of stream, and the probabilities of windows of frames.

    A window is `window_frames` consecutive frames, each `frame_stride_samples`
    after the previous one and computed from `frame_length_samples` samples;
    it stands for `window_samples` samples of audio (the model's clip).
    """

    labels: tuple[str, ...]
    sample_rate: int
    frame_stride_samples: int
    frame_length_samples: int
    window_frames: int
    window_samples: int
    frame_width: int

    def frames(self, samples: np.ndarray) -> np.ndarray:
        """[1 + (n - frame_length) // stride, width] frames of n >= frame_length samples."""

    def score(self, windows: np.ndarray) -> np.ndarray:
        """[batch, window_frames, width] to softmax probabilities [batch, labels]."""


class FeatureScorer:
    """Frames are the model's feature frames (spectrogram, MFCC); windows go through the network alone."""

    def __init__(self, labels: Sequence[str], feature_settings, frames_function: Callable, features_function: Callable):
        self.labels = tuple(labels)
        self.feature_settings = feature_settings
        self.sample_rate = feature_settings.sample_rate
        self.frame_stride_samples = feature_settings.window_stride_samples
        self.frame_length_samples = feature_settings.window_size_samples
        self.window_frames = feature_settings.spectrogram_length
        self.window_samples = feature_settings.desired_samples
        self.frame_width = feature_settings.fingerprint_width
        self._frames_function = frames_function
        self._features_function = features_function
        self.owner = None  # what the functions came from (a loaded SavedModel), kept alive with them

    def frames(self, samples: np.ndarray) -> np.ndarray:
        return self._frames_function(samples=np.asarray(samples, np.float32))["frames"].numpy()

    def score(self, windows: np.ndarray) -> np.ndarray:
        # The model's input has a channel axis: [batch, frames, width, 1].
        outputs = self._features_function(features=np.ascontiguousarray(windows[..., None], np.float32))
        return next(iter(outputs.values())).numpy()


class AudioScorer:
    """For runs exported before detection existed (no ``features`` signature): each window's
    audio goes through the ``audio`` signature, features included. Slower, same answers."""

    def __init__(self, labels: Sequence[str], feature_settings, audio_function: Callable):
        self.labels = tuple(labels)
        self.feature_settings = feature_settings
        self.sample_rate = feature_settings.sample_rate
        self.frame_stride_samples = feature_settings.window_stride_samples
        self.frame_length_samples = feature_settings.window_stride_samples  # a frame: the samples of one stride
        self.window_frames = math.ceil(feature_settings.desired_samples / feature_settings.window_stride_samples)
        self.window_samples = feature_settings.desired_samples
        self.frame_width = feature_settings.window_stride_samples
        self._audio_function = audio_function
        self.owner = None

    def frames(self, samples: np.ndarray) -> np.ndarray:
        count = len(samples) // self.frame_stride_samples
        return samples[: count * self.frame_stride_samples].reshape(count, self.frame_stride_samples)

    def score(self, windows: np.ndarray) -> np.ndarray:
        audio = windows.reshape(len(windows), -1)[:, : self.window_samples]
        outputs = self._audio_function(audio=np.ascontiguousarray(audio, np.float32))
        return next(iter(outputs.values())).numpy()


class SharedTrunkScorer(FeatureScorer):
    """For a network whose output is head(mean over time of trunk(features)) (a layer named
    ``time_pool``): the trunk runs once over the stream (`columns`), a window's pooled
    vector is the mean of its columns, and `head` turns it into probabilities.

    `score` (the whole network on windows) stays for the per-window path (`per_window`).
    """

    def __init__(self, labels: Sequence[str], feature_settings, frames_function: Callable,
                 features_function: Callable, columns_function: Callable, pooled_function: Callable):  # fmt: skip
        super().__init__(labels, feature_settings, frames_function, features_function)
        self._columns_function = columns_function
        self._pooled_function = pooled_function
        probe = self._columns_function(frames=np.zeros((1, self.window_frames, self.frame_width), np.float32))
        self.time_stride = int(probe["time_stride"].numpy())
        self.window_columns = int(probe["columns"].shape[1])  # the trunk's columns of one window

    def columns(self, frames: np.ndarray) -> np.ndarray:
        """[pieces, frames, width] to the trunk's columns [pieces, columns, pooled width]."""
        return self._columns_function(frames=np.ascontiguousarray(frames, np.float32))["columns"].numpy()

    def head(self, pooled: np.ndarray) -> np.ndarray:
        """Pooled vectors [batch, pooled width] to probabilities [batch, labels]."""
        return next(iter(self._pooled_function(pooled=np.ascontiguousarray(pooled, np.float32)).values())).numpy()

    def per_window(self) -> FeatureScorer:
        """The same model scoring each window whole (the reference the shared trunk approximates)."""
        scorer = FeatureScorer(self.labels, self.feature_settings, self._frames_function, self._features_function)
        scorer.owner = self.owner
        return scorer

    def is_time_equivariant(self, seed: int = 0) -> bool:
        """Whether a column in the middle of a window equals the stream trunk's column there
        (on random frames): false for a trunk that looks at the whole window (a per-clip
        normalisation) or a receptive field as long as the window."""
        margin = -(-self.window_frames // self.time_stride) * self.time_stride
        frames = np.random.default_rng(seed).normal(size=(self.window_frames + 2 * margin, self.frame_width))
        stream = self.columns(frames[None])[0]
        window = self.columns(frames[None, margin : margin + self.window_frames])[0]
        middle = self.window_columns // 2
        expected = window[middle]
        found = stream[margin // self.time_stride + middle]
        return bool(np.allclose(found, expected, rtol=1e-3, atol=1e-3 * max(1.0, float(np.abs(expected).max()))))


def _shared_trunk_or_per_window(scorer: SharedTrunkScorer, name: str) -> FeatureScorer:
    if scorer.is_time_equivariant():
        return scorer
    logger.warning("%s: the trunk before time_pool is not equivariant in time; scoring each window whole", name)
    return scorer.per_window()


def keras_scorer(model, feature_settings, labels: Sequence[str]) -> FeatureScorer | AudioScorer:
    """A scorer for a Keras model in memory (a training's evaluation), with the export's functions:
    the shared trunk when the model has a ``time_pool`` layer, each window's audio for features
    whose frames are not independent (pcen), as `load_scorer` gives for its export."""
    from speechclas.export import InferenceModule

    module = InferenceModule(model, feature_settings)
    if not module.streams:
        scorer = AudioScorer(labels, feature_settings, module.from_audio)
        scorer.owner = module
        return scorer
    if module.split is None:
        return FeatureScorer(labels, feature_settings, module.stream_features, module.from_features)
    scorer = SharedTrunkScorer(labels, feature_settings, module.stream_features, module.from_features,
                               module.stream_columns, module.pooled)  # fmt: skip
    scorer.owner = module
    return _shared_trunk_or_per_window(scorer, model.name)


def load_scorer(run: RunDir) -> FeatureScorer | AudioScorer:
    """The scorer of a finished run's SavedModel: the shared trunk with its ``stream_columns``
    and ``pooled`` signatures, else windows through its ``features`` signature, else (runs
    exported before detection, and features whose frames are not independent) each window's audio."""
    import tensorflow as tf

    from speechclas.export import (
        AUDIO_SIGNATURE,
        FEATURES_SIGNATURE,
        POOLED_SIGNATURE,
        STREAM_COLUMNS_SIGNATURE,
        STREAM_FEATURES_SIGNATURE,
    )
    from speechclas.features import frames_are_independent

    feature_settings = feature_sizes(run)
    labels = run.labels()
    loaded = tf.saved_model.load(str(run.saved_model_dir))
    signatures = loaded.signatures
    if all(name in signatures for name in (FEATURES_SIGNATURE, STREAM_FEATURES_SIGNATURE,
                                           STREAM_COLUMNS_SIGNATURE, POOLED_SIGNATURE)):  # fmt: skip
        scorer = SharedTrunkScorer(labels, feature_settings, signatures[STREAM_FEATURES_SIGNATURE],
                                   signatures[FEATURES_SIGNATURE], signatures[STREAM_COLUMNS_SIGNATURE],
                                   signatures[POOLED_SIGNATURE])  # fmt: skip
        scorer.owner = loaded
        scorer = _shared_trunk_or_per_window(scorer, f"run {run.name}")
    elif FEATURES_SIGNATURE in signatures and STREAM_FEATURES_SIGNATURE in signatures:
        scorer = FeatureScorer(labels, feature_settings, signatures[STREAM_FEATURES_SIGNATURE],
                               signatures[FEATURES_SIGNATURE])  # fmt: skip
    elif not frames_are_independent(feature_settings):
        logger.info("Run %s: preprocess=%s frames depend on their clip's start; scoring each window's audio",
                    run.name, feature_settings.preprocess)  # fmt: skip
        scorer = AudioScorer(labels, feature_settings, signatures[AUDIO_SIGNATURE])
    else:
        logger.warning("Run %s has no %r signature (exported before detection): scoring each window's audio, "
                       "which is slower", run.name, FEATURES_SIGNATURE)  # fmt: skip
        scorer = AudioScorer(labels, feature_settings, signatures[AUDIO_SIGNATURE])
    scorer.owner = loaded  # the signatures' variables live as long as the object they came from
    # The first call traces the functions; pay that here, not in the first request.
    probabilities = scorer.score(np.zeros((1, scorer.window_frames, scorer.frame_width), np.float32))
    if probabilities.shape[1] != len(labels):
        raise RuntimeError(f"run {run.name}: the model has {probabilities.shape[1]} outputs "
                           f"but labels.txt has {len(labels)} labels")  # fmt: skip
    return scorer


class ScorerCache:
    """The last few runs loaded for detection, keyed as `predict.PredictorCache`."""

    def __init__(self, max_runs: int = 2):
        self.max_runs = max_runs
        self._loaded: collections.OrderedDict[tuple[str, int], Any] = collections.OrderedDict()

    def get(self, run: RunDir):
        key = (str(run.root), run.done_path.stat().st_mtime_ns)
        scorer = self._loaded.get(key)
        if scorer is None:
            scorer = self._loaded[key] = load_scorer(run)
            while len(self._loaded) > self.max_runs:
                self._loaded.popitem(last=False)
        self._loaded.move_to_end(key)
        return scorer


# --- the stream -----------------------------------------------------------------------


class _WindowBatches:
    """Windows queued into fixed batches from the stream's start, so how the stream was cut
    into blocks never changes what the model sees."""

    def __init__(self, scorer: WindowScorer, batch_size: int):
        self.scorer = scorer
        self.batch_size = batch_size
        self._batch: np.ndarray | None = None
        self._filled = 0
        self.results: list[np.ndarray] = []

    def add(self, windows: np.ndarray) -> None:
        if self._batch is None:
            self._batch = np.empty((self.batch_size, *windows.shape[1:]), np.float32)
        start = 0
        while start < len(windows):
            take = min(len(windows) - start, self.batch_size - self._filled)
            self._batch[self._filled : self._filled + take] = windows[start : start + take]
            self._filled += take
            start += take
            if self._filled == self.batch_size:
                self.flush()

    def flush(self) -> None:
        if self._filled:
            self.results.append(np.asarray(self.scorer.score(self._batch[: self._filled]), np.float32))
            self._filled = 0


def stream_scores(
    model: WindowScorer,
    blocks: Iterable[np.ndarray],
    settings: DetectSettings,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> tuple[np.ndarray, np.ndarray]:
    """(times_s [T], probabilities [T, labels]): one softmax per hop window of the stream,
    features computed once per block with overlap; a `SharedTrunkScorer` runs its trunk
    once over the stream, any other scorer takes the windows through the model in batches.

    `blocks` are consecutive float32 mono pieces of one stream at the model's
    rate (any lengths). Window i covers samples [i·hop, i·hop + window) and its
    time is its end. A stream shorter than one window is padded with zeros.
    """
    stride = model.frame_stride_samples
    hop_frames = settings.hop_frames(stride, model.sample_rate)
    if isinstance(model, SharedTrunkScorer):
        windows: _SharedTrunkWindows | _WindowBatches = _SharedTrunkWindows(model, hop_frames)
    else:
        windows = _PerWindow(model, hop_frames, batch_size)
    for frames in _stream_frames(model, blocks):
        windows.add(frames)
    windows.finish()
    labels = len(model.labels)
    probabilities = np.concatenate(windows.results) if windows.results else np.zeros((0, labels), np.float32)
    hop_s = hop_frames * stride / model.sample_rate
    times_s = np.arange(len(probabilities)) * hop_s + model.window_samples / model.sample_rate
    return times_s, probabilities


def _stream_frames(model: WindowScorer, blocks: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
    """The stream's frames [n, width], block by block (the samples of a frame that crosses a
    block's end wait for the next); a stream shorter than one window is padded with zeros."""
    stride = model.frame_stride_samples
    needed = (model.window_frames - 1) * stride + model.frame_length_samples  # samples of the first window
    samples = np.zeros(0, np.float32)  # decoded, not yet in a frame
    total = 0

    def frames_of(block: np.ndarray) -> np.ndarray | None:
        nonlocal samples
        samples = np.concatenate([samples, np.asarray(block, np.float32)])
        if len(samples) < model.frame_length_samples:
            return None
        count = 1 + (len(samples) - model.frame_length_samples) // stride
        new = model.frames(samples[: (count - 1) * stride + model.frame_length_samples])
        samples = samples[count * stride :]
        return new

    for block in blocks:
        total += len(block)
        new = frames_of(block)
        if new is not None:
            yield new
    if total < needed:
        new = frames_of(np.zeros(needed - total, np.float32))
        if new is not None:
            yield new


class _PerWindow:
    """Every hop window's frames through the whole network, in fixed batches."""

    def __init__(self, model: WindowScorer, hop_frames: int, batch_size: int):
        self.model = model
        self.hop_frames = hop_frames
        self.batches = _WindowBatches(model, batch_size)
        self.results = self.batches.results
        self.frames: np.ndarray | None = None  # computed, from stream frame `first_frame` on
        self.first_frame = self.next_window = 0

    def add(self, new: np.ndarray) -> None:
        window_frames = self.model.window_frames
        self.frames = frames = new if self.frames is None else np.concatenate([self.frames, new])
        start = self.next_window - self.first_frame
        if len(frames) - start >= window_frames:
            windows = np.lib.stride_tricks.sliding_window_view(frames[start:], window_frames, axis=0)
            windows = windows[:: self.hop_frames]
            self.batches.add(windows.transpose(0, 2, 1))  # [windows, frames, width]
            self.next_window += len(windows) * self.hop_frames
        drop = min(self.next_window - self.first_frame, len(frames))
        self.frames = frames[drop:]
        self.first_frame += drop

    def finish(self) -> None:
        self.batches.flush()


class _SharedTrunkWindows:
    """The trunk once over the stream, in chunks of fixed stream positions; each window's
    pooled vector is the mean of its columns (cumulative sums), the head takes a chunk's
    windows in one batch.

    A window starting at frame w uses the columns of a trunk pass whose input starts at a
    frame ≡ w (mod the trunk's time stride S): one pass per such phase (S / gcd(S, hop)).
    Each pass's input is the chunk's `chunk_frames` of window starts, one window after it
    and `margin` frames on each side (zeros beyond the stream's ends), a length ≡ the
    window's (mod S), so every 'same'-padded layer aligns its columns as it does in the
    window. Chunks sit at fixed stream positions and wait for all their frames, so how
    the stream was cut into blocks never changes what the trunk sees.
    """

    def __init__(self, model: SharedTrunkScorer, hop_frames: int):
        self.model = model
        self.hop_frames = hop_frames
        stride = model.time_stride
        self.phases = np.array(sorted({(i * hop_frames) % stride for i in range(stride)}))
        self.phase_index = np.full(stride, -1)
        self.phase_index[self.phases] = np.arange(len(self.phases))
        period = math.lcm(hop_frames, stride)
        self.chunk_frames = max(1, round(SHARED_TRUNK_CHUNK_FRAMES / period)) * period
        self.margin = -(-model.window_frames // stride) * stride
        self.pass_frames = 2 * self.margin + self.chunk_frames + model.window_frames
        self.frames = np.zeros((0, model.frame_width), np.float32)  # from stream frame `first_frame` on
        self.first_frame = self.total = self.chunk = 0
        self.results: list[np.ndarray] = []

    def add(self, new: np.ndarray) -> None:
        self.frames = np.concatenate([self.frames, new])
        self.total += len(new)
        # A chunk's passes reach a window, a margin and a phase (< the stride) past its window starts.
        reach = self.model.window_frames + self.margin + self.model.time_stride
        while self.total >= (self.chunk + 1) * self.chunk_frames + reach:
            self._score_chunk()

    def finish(self) -> None:
        while self.chunk * self.chunk_frames + self.model.window_frames <= self.total:
            self._score_chunk()

    def _piece(self, start: int) -> np.ndarray:
        """`pass_frames` stream frames from `start`, zeros outside the stream."""
        piece = np.zeros((self.pass_frames, self.model.frame_width), np.float32)
        low, high = max(start, self.first_frame), min(start + self.pass_frames, self.total)
        if high > low:
            piece[low - start : high - start] = self.frames[low - self.first_frame : high - self.first_frame]
        return piece

    def _score_chunk(self) -> None:
        model, hop, stride = self.model, self.hop_frames, self.model.time_stride
        begin = self.chunk * self.chunk_frames
        first = -(-begin // hop) * hop
        starts = np.arange(first, min(begin + self.chunk_frames, self.total - model.window_frames + 1), hop)
        if len(starts):
            low = begin - self.margin
            columns = model.columns(np.stack([self._piece(low + phase) for phase in self.phases]))
            sums = np.zeros((columns.shape[0], columns.shape[1] + 1, columns.shape[2]), np.float64)
            np.cumsum(columns, axis=1, dtype=np.float64, out=sums[:, 1:])
            phase = starts % stride
            first_column = (starts - low - phase) // stride
            rows = self.phase_index[phase]
            count = model.window_columns
            pooled = (sums[rows, first_column + count] - sums[rows, first_column]) / count
            self.results.append(np.asarray(model.head(pooled.astype(np.float32)), np.float32))
        self.chunk += 1
        drop = min(self.chunk * self.chunk_frames - self.margin, self.total) - self.first_frame
        if drop > 0:
            self.frames = self.frames[drop:]
            self.first_frame += drop


# --- smoothing --------------------------------------------------------------------------


def smoothed_scores(
    times_s: np.ndarray, probabilities: np.ndarray, settings: DetectSettings
) -> tuple[np.ndarray, np.ndarray]:
    """(averaged [T, labels], decided [T]): each result averaged with the previous ones
    within `average_window_ms`, and whether enough results were there to decide
    (`minimum_count`, spanning a quarter of the window), as RecognizeCommands."""
    times_us = np.round(np.asarray(times_s, np.float64) * 1e6).astype(np.int64)
    window_us = round(settings.average_window_ms * 1000)
    first = np.searchsorted(times_us, times_us - window_us, side="left")
    sums = np.zeros((len(times_us) + 1, probabilities.shape[1]), np.float64)
    np.cumsum(probabilities, axis=0, dtype=np.float64, out=sums[1:])
    index = np.arange(len(times_us))
    counts = index + 1 - first
    averaged = (sums[index + 1] - sums[first]) / counts[:, None]
    decided = (counts >= settings.minimum_count) & (4 * (times_us - times_us[first]) >= window_us)
    return averaged, decided


def detect(
    times_s: np.ndarray, probabilities: np.ndarray, labels: Sequence[str], settings: DetectSettings
) -> list[Detection]:
    """Smoothing over average_window_ms, threshold, suppression of repeats, _silence_/_unknown_ never reported.

    A detection is the top averaged label rising above the threshold (a label
    held above it fires once); none fires within `suppression_ms` of the last one.
    `times_s` are window ends as `stream_scores` gives them: the first is one clip
    after the stream's start, so it gives the clip's duration for `start_s`.
    """
    if len(times_s) != len(probabilities) or (len(probabilities) and probabilities.shape[1] != len(labels)):
        raise ValueError(f"{len(times_s)} times, {probabilities.shape} probabilities and {len(labels)} labels disagree")
    if not len(times_s):
        return []
    averaged, decided = smoothed_scores(times_s, probabilities, settings)
    top = np.argmax(averaged, axis=1)
    top_score = averaged[np.arange(len(top)), top]
    above = decided & (top_score > settings.threshold)
    times_us = np.round(np.asarray(times_s, np.float64) * 1e6).astype(np.int64)
    suppression_us = settings.suppression_ms * 1000
    window_s = None
    detections = []
    held = -1  # the label above the threshold now, -1: none
    last_us = None
    for i in np.flatnonzero(decided):
        if not above[i]:
            held = -1
            continue
        label = int(top[i])
        if label == held:
            continue
        held = label
        if labels[label].startswith("_") or (last_us is not None and times_us[i] - last_us <= suppression_us):
            continue
        last_us = int(times_us[i])
        if window_s is None:
            window_s = float(times_s[0])  # the first window ends one clip after the stream's start
        end_s = float(times_s[i])
        detections.append(Detection(labels[label], max(0.0, end_s - window_s), end_s, float(top_score[i])))
    return detections


# --- a file, a request ---------------------------------------------------------------


def default_threshold(run: RunDir) -> float:
    """The run's calibrated threshold (``streaming.threshold`` of stats/metrics.json, stored by the
    training's streaming evaluation), else DetectSettings' default."""
    try:
        value = json.loads(run.metrics_path.read_text())["streaming"]["threshold"]
    except (OSError, ValueError, KeyError, TypeError):
        return DEFAULT_THRESHOLD
    if isinstance(value, (int, float)) and 0.0 <= value <= 1.0:
        return float(value)
    logger.warning("Run %s: streaming.threshold %r of %s is not a probability; using %g",
                   run.name, value, run.metrics_path, DEFAULT_THRESHOLD)  # fmt: skip
    return DEFAULT_THRESHOLD


def detect_audio(
    scorer: WindowScorer,
    source: AudioSource,
    settings: DetectSettings,
    limits: AudioLimits,
    *,
    name: str | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Detections in one audio file of any length, within `limits`: duration_s, settings, detections."""
    counted = {"samples": 0}
    with open_audio(source, name, limits) as reader:
        duration = reader.header.duration_s

        def blocks() -> Iterator[np.ndarray]:
            bar = _progress_bar(duration, reader.name) if progress else None
            for block in reader.blocks(scorer.sample_rate, BLOCK_SECONDS):
                counted["samples"] += len(block)
                if bar is not None:
                    bar.update(len(block) / scorer.sample_rate)
                yield block
            if bar is not None:
                bar.close()

        times_s, probabilities = stream_scores(scorer, blocks(), settings)
    detections = detect(times_s, probabilities, scorer.labels, settings)
    return {
        "duration_s": round(counted["samples"] / scorer.sample_rate, 3),
        "settings": dataclasses.asdict(settings),
        "detections": [detection.as_json() for detection in detections],
    }


def _progress_bar(total_s: float | None, name: str):
    from tqdm import tqdm

    return tqdm(total=round(total_s, 1) if total_s else None, unit="s", desc=f"Detecting in {name}",
                bar_format="{l_bar}{bar}| {n:.0f}/{total_fmt} s [{elapsed}<{remaining}]", leave=False)  # fmt: skip


def detect_request(
    scorers: ScorerCache,
    models_dir: Path,
    *,
    file: Path | None = None,
    file_name: str | None = None,
    url: str | None = None,
    run: str | None = None,
    threshold: float | None = None,
    hop_ms: float | None = None,
    average_window_ms: float | None = None,
    suppression_ms: float | None = None,
    limits: Limits | None = None,
    max_seconds: float | None = None,
    max_seconds_setting: str | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Detect in exactly one input, a local file or a URL, with the chosen (or served) run.

    The duration bound is `max_seconds` (default: the operator's
    ``detect_max_audio_seconds``); a URL's download is bounded by
    ``detect_max_audio_bytes``. Without `threshold`, the run's calibrated one
    (`default_threshold`). Raises InputError (DetectError), audio.AudioError,
    fetch.FetchError and rundir.RunNotFoundError with messages meant for the caller.
    """
    limits = limits if limits is not None else Limits.defaults()
    check_one_input(file, url)
    run_dir = find_run(models_dir, run)
    if max_seconds is None:
        max_seconds = limits.detect_max_audio_seconds
        max_seconds_setting = f"operator setting {setting('detect_max_audio_seconds').env}"
    bounds = AudioLimits.from_limits(limits).with_max_seconds(max_seconds, max_seconds_setting)
    with tempfile.TemporaryDirectory(prefix="speechclas-detect-") as folder:
        if file is not None:
            source, name = Path(file), f"the file {file_name or Path(file).name!r}"
        else:
            policy = dataclasses.replace(UrlPolicy.for_audio(limits), max_bytes=limits.detect_max_audio_bytes)
            source, name = fetch_url(url, folder, **policy.kwargs()), f"the download of {redact_url(url)}"
        # Check the header before loading the model, so a bad input is refused without waiting for TensorFlow.
        with open_audio(source, name, bounds):
            pass
        feature_settings = feature_sizes(run_dir)
        settings = DetectSettings.for_features(
            feature_settings,
            hop_ms=hop_ms,
            average_window_ms=average_window_ms,
            suppression_ms=suppression_ms,
            threshold=threshold if threshold is not None else default_threshold(run_dir),
        )
        settings.hop_frames(feature_settings.window_stride_samples, feature_settings.sample_rate)  # refused early
        result = detect_audio(scorers.get(run_dir), source, settings, bounds, name=name, progress=progress)
    logger.info("Detected %d keywords in %s s of audio with run %s", len(result["detections"]),
                result["duration_s"], run_dir.name)  # fmt: skip
    return {"run": run_dir.name, **result}
