"""May this training run here? The bounds of a training requested through the API.

The CLI is run by the machine's owner and keeps its freedom. A training
requested over HTTP comes from whoever can reach the server, so before any
work starts it is held to the operator's `Limits`: its paths resolve inside
the training roots, its data_url passes the predict URL policy, its labels
are few and short, and its steps, batch, clip, feature size and estimated
memory stay under the caps. Each refusal names the parameter, the cap and
the environment variable that raises it.

This runs in DEEPaaS's main process (argument validation, a 422 before a
worker is occupied), so it only reads folder listings and audio headers and
never imports TensorFlow.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any

import soundfile

from speechclas import noise, said
from speechclas.config import Config, ConfigError
from speechclas.data import AUDIO_SUFFIXES, BACKGROUND_NOISE_DIR, SPLIT_FILES, SPLITS
from speechclas.features import FeatureSettings, settings_from_config
from speechclas.fetch import FetchError, check_url_allowed
from speechclas.limits import Limits, setting
from speechclas.shards import EVAL_CACHE_BYTES, SAMPLED_CLIPS, held_in_memory

logger = logging.getLogger(__name__)

# Parameters of config.yaml an API caller may not set: the operator's (SPEECHCLAS_MODELS_DIR).
OPERATOR_PARAMETERS = ("models_dir",)

MB = 2**20
# What a training holds besides its data: TensorFlow, the model and its exports
# (TensorFlow started and a small network: about 760 MB measured; the rest is headroom).
TENSORFLOW_OVERHEAD_BYTES = 1024 * MB
# Batches the training pipeline prepares ahead of the model (parallel map and prefetch).
BATCHES_IN_FLIGHT = 4
# Floats a batch keeps per feature cell for backpropagation in the widest network
# (conv: 64 channels at full resolution, before and after dropout, then pooled).
ACTIVATION_FLOATS_PER_CELL = 256


class ConfinementError(ConfigError):
    """A training argument this server does not allow; the message names the parameter and the operator setting."""


def check_api_training(config: Config, limits: Limits, base_dir: Path, checked: Collection[str] = ()) -> None:
    """Refuse an API training that may not run here, before any work starts.

    Each argument's own rule (`check_argument`) runs first, but for those in
    `checked`: the API checks each given argument in its own field, so that
    its 422 is reported under its name. Then the rules over several
    parameters: feature cells and memory. The clips of a data_url are
    unknown until downloaded; the training checks them then (`check_memory`).
    """
    for name in ARGUMENT_RULES:
        if name not in checked:
            check_argument(name, getattr(config, name), limits, base_dir)
    settings = check_feature_cells(config, limits)
    # A path refused by its own rule is reported in its field, and never scanned.
    roots = limits.train_root_paths(base_dir)
    scannable = all(_inside(config.path(name, base_dir), roots) for name in ("data_dir", "data_splits_dir"))
    if not config.data_url and scannable:
        check_memory(config, settings, config.path("data_dir", base_dir), config.path("data_splits_dir", base_dir), limits)


def api_training_config(config: Config, limits: Limits, base_dir: Path) -> Config:
    """`config` checked by `check_api_training`, writing its run into the operator's models folder."""
    check_api_training(config, limits, base_dir)
    models_dir = limits.resolved_models_dir(config.path("models_dir", base_dir))
    return config.replace(models_dir=str(models_dir))


def check_argument(name: str, value: Any, limits: Limits, base_dir: Path) -> None:
    """The rule of one training argument on its own (a path, the URL, a cap), if it has one."""
    rule = ARGUMENT_RULES.get(name)
    if rule is not None:
        rule(name, value, limits, base_dir)


def _operator_variable(field: str) -> str:
    return setting(field).env


# --- paths -----------------------------------------------------------------------------------


def check_path(name: str, value: str, limits: Limits, base_dir: Path) -> None:
    """data_dir, data_splits_dir and start_checkpoint resolve (links followed) inside the roots;
    relative ones from the project folder, as `Config.path` takes them.

    The refusal is the same whether the outside path exists or not, and never
    shows where a link points.
    """
    if name == "start_checkpoint" and not value:
        return
    path = Path(value)
    if not _inside(path if path.is_absolute() else base_dir / path, limits.train_root_paths(base_dir)):
        raise ConfinementError(
            f"{name}={value!r} is outside the folders this server trains from "
            f"({', '.join(limits.train_roots)}, relative to the project; {_operator_variable('train_roots')})"
        )


def _inside(path: Path, roots: Sequence[Path]) -> bool:
    try:
        resolved = path.resolve()
    except (OSError, RuntimeError, ValueError):  # a link loop, a NUL byte
        return False
    return any(resolved == root or resolved.is_relative_to(root) for root in roots)


# --- data_url and labels ---------------------------------------------------------------------


def check_data_url(name: str, url: str, limits: Limits, base_dir: Path) -> None:
    """The predict URL policy: http(s) only, and no loopback, link-local or private host."""
    if not url:
        return
    try:
        check_url_allowed(url, limits.allow_private_urls)
    except FetchError as exc:
        raise ConfinementError(f"parameter {name!r}: {exc}") from None


def check_label_caps(name: str, words: Sequence[str], limits: Limits, base_dir: Path) -> None:
    """How many wanted words, and how long (their characters are config.check_label_names' rule)."""
    if len(words) > limits.max_labels:
        raise ConfinementError(
            f"parameter {name!r} lists {len(words)} words; this server's limit is "
            f"{limits.max_labels} ({_operator_variable('max_labels')})"
        )
    for word in words:
        if len(word) > limits.max_label_chars:
            raise ConfinementError(
                f"parameter {name!r}: {word[:20]!r}... has {len(word)} characters; this server's limit "
                f"is {limits.max_label_chars} ({_operator_variable('max_label_chars')})"
            )


# --- sizes -----------------------------------------------------------------------------------


def _cap(field: str, unit: str = "") -> Callable[[str, Any, Limits, Path], None]:
    """The rule "the value (the sum of a list) is at most `limits.<field>`"."""

    def rule(name: str, value: Any, limits: Limits, base_dir: Path) -> None:
        total = sum(value) if isinstance(value, (list, tuple)) else value
        cap = getattr(limits, field)
        if total > cap:
            shown = f"{name}={value}"
            if isinstance(value, (list, tuple)):
                shown = f"{name}={','.join(str(item) for item in value)} ({total} in all)"
            raise ConfinementError(
                f"{shown} is above this server's limit of {cap}{unit} ({_operator_variable(field)})"
            )

    return rule


def check_feature_cells(config: Config, limits: Limits) -> FeatureSettings:
    """Feature frames × bins of one clip under the cap; answers the feature sizes."""
    try:
        settings = settings_from_config(config)
    except ValueError as exc:
        raise ConfigError(f"parameters 'window_size_ms', 'window_stride_ms', 'sample_rate': {exc}") from None
    cells = settings.spectrogram_length * settings.fingerprint_width
    if cells > limits.max_feature_cells:
        raise ConfinementError(
            f"the features of one clip, {settings.spectrogram_length} frames × {settings.fingerprint_width} bins "
            f"= {cells} (from clip_duration_ms={config.clip_duration_ms}, sample_rate={config.sample_rate}, "
            f"window_stride_ms={config.window_stride_ms:g}, window_size_ms={config.window_size_ms:g}, "
            f"feature_bin_count={config.feature_bin_count}), is above this server's limit of "
            f"{limits.max_feature_cells} cells ({_operator_variable('max_feature_cells')})"
        )
    return settings


# Each argument's own rule: (name, value, limits, base_dir) -> None or ConfinementError.
def check_distribution(name: str, value: str, limits: Limits, base_dir: Path) -> None:
    """multi_worker through the API needs the cluster's TF_CONFIG in the server's environment,
    which the training's own process inherits."""
    if value == "multi_worker" and not os.environ.get("TF_CONFIG", "").strip():
        raise ConfinementError(
            f"{name}=multi_worker needs TF_CONFIG, the cluster description, in this server's environment, and "
            "it has none; train on this machine's devices with distribution=none or mirrored")


ARGUMENT_RULES: dict[str, Callable[[str, Any, Limits, Path], None]] = {
    "data_dir": check_path,
    "data_splits_dir": check_path,
    "start_checkpoint": check_path,
    "data_url": check_data_url,
    "wanted_words": check_label_caps,
    "how_many_training_steps": _cap("max_train_steps", " steps"),
    "batch_size": _cap("max_batch_size"),
    "clip_duration_ms": _cap("max_clip_duration_ms", " ms"),
    "distribution": check_distribution,
}


# --- memory ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ClipCount:
    """Clips a training would load, from a folder listing (or the split lists), nothing decoded."""

    wanted: int  # clips of wanted words
    other: int  # clips of other words (_unknown_)
    background_seconds: float  # noise, read from the headers
    words: int = 0  # word folders (wanted and other), each said by every synthetic speaker

    @property
    def total(self) -> int:
        return self.wanted + self.other


def count_clips(data_dir: Path, wanted_words: Sequence[str], splits_dir: Path | None) -> ClipCount:
    """What `data.index_dataset` would find, counted cheaply. A folder that cannot be read counts
    nothing: the training itself then reports it."""
    wanted_set = set(wanted_words)
    lists = [splits_dir / name for name in SPLIT_FILES.values()] if splits_dir else []
    counts = {True: 0, False: 0}
    words = set()
    if lists and all(path.is_file() for path in lists):
        for path in lists:
            with open(path, encoding="utf-8", errors="replace") as lines:
                for line in lines:
                    relative = line.strip()
                    if relative and not relative.startswith("#"):
                        words.add(Path(relative).parent.name)
                        counts[Path(relative).parent.name in wanted_set] += 1
    else:
        for folder in _entries(data_dir):
            if folder.is_dir() and not folder.name.startswith(".") and folder.name != BACKGROUND_NOISE_DIR:
                words.add(folder.name)
                counts[folder.name in wanted_set] += sum(1 for entry in _entries(folder) if _is_audio(entry))
    background = sum(_seconds(Path(entry.path)) for entry in _entries(data_dir / BACKGROUND_NOISE_DIR)
                     if _is_audio(entry))
    return ClipCount(wanted=counts[True], other=counts[False], background_seconds=background, words=len(words))


def said_clip_count(config: Config, data_dir: Path) -> ClipCount:
    """The clips of a text_only training's said folder (speechclas.said), before they are said."""
    wanted = len(config.synthetic_voices) * config.synthetic_speakers * len(config.wanted_words)
    given = sum(_seconds(Path(entry.path)) for entry in _entries(data_dir / BACKGROUND_NOISE_DIR) if _is_audio(entry))
    background = given or len(noise.NOISE_KINDS) * said.NOISE_SECONDS
    return ClipCount(wanted=wanted, other=config.unknown_word_clips, background_seconds=background,
                     words=len(config.wanted_words))


def synthetic_clip_count(config: Config, clips: ClipCount) -> int:
    """Clips `synthetic_voices` would say: every word once by each speaker of each engine, and the
    unknown_words clips; with text_only, the wanted words (the data folder is not read)."""
    if config.text_only:
        return said.clip_count(config)
    unknown = config.unknown_word_clips if config.unknown_words else 0
    return len(config.synthetic_voices) * config.synthetic_speakers * clips.words + unknown


def _entries(folder: Path) -> list[os.DirEntry]:
    try:
        with os.scandir(folder) as entries:
            return list(entries)
    except OSError:
        return []


def _is_audio(entry: os.DirEntry) -> bool:
    return entry.name.lower().endswith(AUDIO_SUFFIXES) and entry.is_file()


def _seconds(path: Path) -> float:
    try:
        info = soundfile.info(str(path))
    except (RuntimeError, OSError):  # not audio: the training reports it
        return 0.0
    return info.frames / info.samplerate if info.samplerate > 0 else 0.0


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """What a training holds at its peak, in bytes, by cause."""

    clips: int
    audio: int  # decoded clips (int16) and background noise (float32)
    evaluation_features: int  # the cached features of the evaluation sets (float32)
    batches: int  # batches in the pipeline and one through the network
    overhead: int = TENSORFLOW_OVERHEAD_BYTES

    @property
    def total(self) -> int:
        return self.audio + self.evaluation_features + self.batches + self.overhead

    def describe(self) -> str:
        return (f"{self.clips} clips: {self.audio // MB} MB of decoded audio held, {self.evaluation_features // MB} MB "
                f"of cached evaluation features, {self.batches // MB} MB of batches, {self.overhead // MB} MB "
                "for TensorFlow")


def estimate_memory(config: Config, settings: FeatureSettings, clips: ClipCount,
                    limits: Limits | None = None) -> MemoryEstimate:
    """An upper estimate of a training's peak memory, following train.prepare_data and pipeline.

    In memory (shards.held_in_memory, bounded by the operator's in_memory_max_mb):
    every clip is read back from its shards, and the training clips held four times
    more at the peak (the arrays, their concatenation and the pipeline's table, and
    the reading's copies: data_loading=memory peaked at 16.4 GB for 100k clips, 3.2 GB of
    audio, in benchmarks/scale.py); the evaluation sets (every wanted clip once, plus
    their share of unknown and silence) once more, with their features cached. Streamed: two shuffle buffers of clips (wanted and unknown words), the
    sampled evaluation clips and the evaluation features up to their cache bound,
    whatever the size of the dataset. A batch passes through the widest network.
    Measured peak of conv on data/demo (2 CPU cores): 1586 MB at batch_size=100
    (estimated 1628), 6118 MB at batch_size=1024 (estimated 6786).
    """
    limits = limits or Limits.defaults()
    clip_bytes = settings.desired_samples * 2  # int16
    synthetic = synthetic_clip_count(config, clips)  # training clips only
    # data.evaluation_examples' shares, rounded up in each of the three splits.
    unknown = min(clips.other, math.ceil(clips.wanted * config.unknown_percentage / 100) + 3)
    silence = math.ceil(clips.wanted * config.silence_percentage / 100) + 3
    evaluation_clips = clips.wanted + unknown + silence
    background = int(clips.background_seconds * settings.sample_rate) * 4 * 2  # joined, then the pipeline's copy
    cells = settings.spectrogram_length * settings.fingerprint_width
    if held_in_memory(config.data_loading, clips.total, settings.desired_samples, limits.in_memory_max_mb):
        audio = (5 * (clips.total + synthetic) + evaluation_clips) * clip_bytes + background
        evaluation_features = evaluation_clips * cells * 4
    else:
        sampled = 2 * SAMPLED_CLIPS  # validation and test, for the exports and the streaming evaluation
        audio = (2 * config.shuffle_buffer + sampled) * clip_bytes + background
        evaluation_features = min(evaluation_clips * cells * 4, len(SPLITS) * EVAL_CACHE_BYTES)
    # Per clip of a batch: float audio, its shifted copy, the noise and the mix (and six more
    # arrays of the speed change's interpolation); the spectrogram (at most window_size_samples
    # bins a frame; four more copies for the frequency warp); the features (three with masks and mixup).
    audio_arrays = 4 + (6 if config.speed_perturbation > 0 else 0)
    spectrograms = 1 + (4 if config.pitch_perturbation > 0 else 0)
    feature_copies = 3 if config.spec_time_masks or config.spec_freq_masks or config.mixup_alpha > 0 else 1
    per_clip = (audio_arrays * settings.desired_samples
                + spectrograms * settings.spectrogram_length * settings.window_size_samples
                + feature_copies * cells) * 4
    batches = config.batch_size * (per_clip * BATCHES_IN_FLIGHT + cells * ACTIVATION_FLOATS_PER_CELL * 4)
    return MemoryEstimate(
        clips=clips.total + synthetic, audio=audio, evaluation_features=evaluation_features, batches=batches,
    )


def check_memory(
    config: Config, settings: FeatureSettings, data_dir: Path, splits_dir: Path | None, limits: Limits
) -> MemoryEstimate:
    """Refuse a training whose estimated memory is above the operator's budget, or that
    would synthesize more clips than the operator allows.

    Called at validation for a data_dir, and by the training itself once a
    data_url is downloaded, before any clip is loaded.
    """
    clips = said_clip_count(config, data_dir) if config.text_only else count_clips(data_dir, config.wanted_words,
                                                                                      splits_dir)
    synthetic = synthetic_clip_count(config, clips)
    if synthetic > limits.max_synthetic_clips:
        what = "the wanted words" if config.text_only else f"{clips.words} words of the data"
        unknown = f" and unknown_word_clips={config.unknown_word_clips}" if config.unknown_words or config.text_only else ""
        raise ConfinementError(
            f"synthetic_voices={','.join(config.synthetic_voices)} with synthetic_speakers="
            f"{config.synthetic_speakers}{unknown} would say {synthetic} clips ({what}), above "
            f"this server's limit of {limits.max_synthetic_clips} ({_operator_variable('max_synthetic_clips')}); "
            "use fewer synthetic_speakers, engines or unknown_word_clips"
        )
    estimate = estimate_memory(config, settings, clips, limits)
    budget = limits.train_memory_mb * MB
    logger.info("Estimated memory of the training: %d MB (%s)", estimate.total // MB, estimate.describe())
    if estimate.total > budget:
        raise ConfinementError(
            f"this training would need about {estimate.total // MB} MB ({estimate.describe()}), above this "
            f"server's budget of {limits.train_memory_mb} MB ({_operator_variable('train_memory_mb')}); "
            "use fewer clips (data_dir, data_url), a shorter clip_duration_ms, a lower sample_rate or a "
            "smaller batch_size"
        )
    return estimate
