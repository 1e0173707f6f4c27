"""Batched tf.data pipelines: augmentation and features on the fly.

Clips are held in memory as int16 (see data.load_clips). The training
pipeline samples wanted words, unknown words and silence at the configured
rates, then for a whole batch at once changes the speed, shifts in time, mixes
in background noise, changes the gain, computes the features (with a
per-clip warp of the frequency axis), masks time and frequency bands
(SpecAugment) and mixes pairs of clips (mixup). Every random draw is
stateless, seeded from (random_seed, batch number), so a seed gives the same
batches however many batches run in parallel. Evaluation pipelines only
compute features, so validation and test inputs never change.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import tensorflow as tf

from speechclas import shards
from speechclas.features import FeatureSettings, compute_features

# The random draws of one batch, each from its own seed (folded in from the
# batch's seed), so turning one augmentation on leaves the draws of the others alone.
_SPEED, _SHIFT, _NOISE_START, _NOISE_ON, _NOISE_LEVEL, _SILENCE_LEVEL, _GAIN, _WARP, _TIME_MASKS, _FREQ_MASKS, _MIXUP = (
    range(11)
)


logger = logging.getLogger(__name__)

@dataclasses.dataclass(frozen=True)
class AugmentSettings:
    """What the training pipeline does to a batch; the fields after
    silence_label are off (0 / None) unless configured."""

    time_shift_samples: int
    background_volume: float
    background_frequency: float
    silence_label: int
    speed_perturbation: float = 0.0  # factor in [1 - p, 1 + p]
    pitch_perturbation: float = 0.0  # frequency warp factor in [1 - p, 1 + p]
    background_snr_db: tuple[float, float] | None = None  # None: the recipe's background_volume
    gain_db: float = 0.0  # gain in [-g, +g] dB
    spec_time_masks: int = 0
    spec_time_mask_frames: int = 0
    spec_freq_masks: int = 0
    spec_freq_mask_bins: int = 0
    mixup_alpha: float = 0.0


def augment_settings_from_config(config, feature_settings: FeatureSettings, silence_label: int) -> AugmentSettings:
    """The augmentation of a configuration, in samples and frames. The pitch
    perturbation warps the spectrogram, which preprocess=micro computes inside
    its own op: it is left out there (with a warning), as the other augmentations are not."""
    pitch_perturbation = config.pitch_perturbation
    if pitch_perturbation > 0 and feature_settings.preprocess == "micro":
        logger.warning("pitch_perturbation %.2g is not applied: preprocess=micro exposes no spectrogram to warp",
                       pitch_perturbation)
        pitch_perturbation = 0.0
    return AugmentSettings(
        time_shift_samples=int(feature_settings.sample_rate * config.time_shift_ms / 1000),
        background_volume=config.background_volume,
        background_frequency=config.background_frequency,
        silence_label=silence_label,
        speed_perturbation=config.speed_perturbation,
        pitch_perturbation=pitch_perturbation,
        background_snr_db=tuple(config.background_snr_db) if config.background_snr_db else None,
        gain_db=config.gain_db,
        spec_time_masks=config.spec_time_masks,
        spec_time_mask_frames=int(config.spec_time_mask_ms / feature_settings.window_stride_ms),
        spec_freq_masks=config.spec_freq_masks,
        spec_freq_mask_bins=config.spec_freq_mask_bins,
        mixup_alpha=config.mixup_alpha,
    )


@dataclasses.dataclass(frozen=True)
class TrainingAudio:
    """Everything the training pipeline samples from."""

    wanted_audio: np.ndarray  # int16 [n, samples]
    wanted_labels: np.ndarray  # int32 [n]
    unknown_audio: np.ndarray  # int16 [m, samples]
    unknown_label: int
    silence_label: int
    background: np.ndarray  # float32 [noise samples], may be empty
    label_count: int  # classes of the model (length of the one-hot targets)


def _to_float(audio_int16: tf.Tensor) -> tf.Tensor:
    return tf.cast(audio_int16, tf.float32) / 32768.0


def _seed(seed: tf.Tensor, role: int) -> tf.Tensor:
    return tf.random.experimental.stateless_fold_in(seed, role)


def _uniform(shape, seed: tf.Tensor, role: int, low: float, high: float) -> tf.Tensor:
    return tf.random.stateless_uniform(shape, _seed(seed, role), low, high)


def change_speed(audio: tf.Tensor, factors: tf.Tensor) -> tf.Tensor:
    """Each clip of [batch, samples] played `factor` times faster: its
    duration divided and its pitch multiplied by the factor, centred on the
    clip's middle, zeros where a slowed clip reads past its ends.

    Linear interpolation: a factor above 1 folds content above 8 kHz / factor
    back to above 8 kHz·(2 - factor) (6.8 kHz at 1.15), where speech has
    little energy and above the Mfcc op's 4 kHz upper edge.
    """
    samples = tf.shape(audio)[1]
    centre = tf.cast(samples - 1, tf.float32) / 2
    positions = centre + (tf.range(samples, dtype=tf.float32)[None, :] - centre) * factors[:, None]
    lower = tf.floor(positions)
    fraction = positions - lower
    lower = tf.cast(lower, tf.int32)
    padded = tf.pad(audio, [[0, 0], [1, 1]])  # index 0 and samples + 1 are the zeros outside the clip

    def at(index):
        return tf.gather(padded, tf.clip_by_value(index + 1, 0, samples + 1), batch_dims=1)

    return at(lower) * (1.0 - fraction) + at(lower + 1) * fraction


def _noise_scale_for_snr(audio: tf.Tensor, noise: tf.Tensor, snr_db: tf.Tensor) -> tf.Tensor:
    """Per clip, the factor that puts `noise` `snr_db` below the clip's mean power."""
    speech_power = tf.reduce_mean(tf.square(audio), axis=1)
    noise_power = tf.reduce_mean(tf.square(noise), axis=1)
    return tf.sqrt(tf.math.divide_no_nan(speech_power, noise_power * tf.pow(10.0, snr_db / 10.0)))


def augment(
    audio: tf.Tensor, labels: tf.Tensor, background: tf.Tensor, settings: AugmentSettings, seed: tf.Tensor
) -> tf.Tensor:
    """Speed, time shift, silence, background noise and gain for a batch
    [batch, samples]; `seed` ([2] integers) decides every random draw."""
    batch = tf.shape(audio)[0]
    samples = tf.shape(audio)[1]
    if settings.speed_perturbation > 0:
        change = settings.speed_perturbation
        audio = change_speed(audio, 1.0 + _uniform([batch], seed, _SPEED, -change, change))
    shift = settings.time_shift_samples
    if shift > 0:
        offsets = tf.random.stateless_uniform([batch], _seed(seed, _SHIFT), -shift, shift + 1, dtype=tf.int32)
        padded = tf.pad(audio, [[0, 0], [shift, shift]])
        # A positive offset delays the word (zeros in front), as in the recipe.
        positions = (shift - offsets)[:, None] + tf.range(samples)[None, :]
        audio = tf.gather(padded, positions, batch_dims=1)
    is_silence = tf.equal(labels, settings.silence_label)
    audio = tf.where(is_silence[:, None], tf.zeros_like(audio), audio)
    noise_length = tf.shape(background)[0]
    if background.shape[0] is None or background.shape[0] > 0:
        starts = tf.random.stateless_uniform(
            [batch], _seed(seed, _NOISE_START), 0, tf.maximum(noise_length - samples, 1), dtype=tf.int32
        )
        noise = tf.gather(background, starts[:, None] + tf.range(samples)[None, :])
        with_noise = _uniform([batch], seed, _NOISE_ON, 0.0, 1.0) < settings.background_frequency
        if settings.background_snr_db:
            low, high = settings.background_snr_db
            volume = _noise_scale_for_snr(audio, noise, _uniform([batch], seed, _NOISE_LEVEL, low, high))
        else:
            volume = _uniform([batch], seed, _NOISE_LEVEL, 0.0, settings.background_volume)
        volume = tf.where(with_noise, volume, 0.0)
        # Silence clips are pure noise at any volume, so the model learns quiet rooms too.
        volume = tf.where(is_silence, _uniform([batch], seed, _SILENCE_LEVEL, 0.0, 1.0), volume)
        audio = audio + volume[:, None] * noise
    if settings.gain_db > 0:
        gain_db = _uniform([batch], seed, _GAIN, -settings.gain_db, settings.gain_db)
        audio = audio * tf.pow(10.0, gain_db / 20.0)[:, None]
    return tf.clip_by_value(audio, -1.0, 1.0)


def _mask_ranges(batch, length, count: int, max_width: int, seed: tf.Tensor) -> tf.Tensor:
    """[batch, length] booleans: `count` bands per row, each of a width drawn
    from 0..max_width and placed uniformly inside the row."""
    width_seed, start_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    widths = tf.random.stateless_uniform([batch, count], width_seed, 0, max_width + 1, dtype=tf.int32)
    widths = tf.minimum(widths, length)
    room = tf.cast(length - widths + 1, tf.float32)
    starts = tf.cast(tf.floor(tf.random.stateless_uniform([batch, count], start_seed) * room), tf.int32)
    positions = tf.range(length)[None, None, :]
    inside = (positions >= starts[..., None]) & (positions < (starts + widths)[..., None])
    return tf.reduce_any(inside, axis=1)


def spec_augment(features: tf.Tensor, settings: AugmentSettings, seed: tf.Tensor) -> tf.Tensor:
    """SpecAugment's time and frequency masks (Park et al. 2019) on features
    [batch, frames, bins, 1]. A masked cell takes its clip's mean over time of
    the same bin: what zero is after SpecAugment's per-utterance mean
    normalisation, where a literal 0 would be out of range for raw MFCC or log-mel."""
    shape = tf.shape(features)
    batch, frames, bins = shape[0], shape[1], shape[2]
    masked = tf.zeros([batch, frames, bins], tf.bool)
    if settings.spec_time_masks > 0 and settings.spec_time_mask_frames > 0:
        in_time = _mask_ranges(batch, frames, settings.spec_time_masks, settings.spec_time_mask_frames,
                               _seed(seed, _TIME_MASKS))
        masked = masked | in_time[:, :, None]
    if settings.spec_freq_masks > 0 and settings.spec_freq_mask_bins > 0:
        in_bins = _mask_ranges(batch, bins, settings.spec_freq_masks, settings.spec_freq_mask_bins,
                               _seed(seed, _FREQ_MASKS))
        masked = masked | in_bins[:, None, :]
    mean_frame = tf.reduce_mean(features, axis=1, keepdims=True)
    return tf.where(masked[..., None], mean_frame, features)


def mixup(features: tf.Tensor, targets: tf.Tensor, alpha: float, seed: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Mixup (Zhang et al. 2018) within the batch: each row becomes
    w·itself + (1 - w)·a random partner row, features and targets alike,
    with w ~ Beta(alpha, alpha) per row."""
    batch = tf.shape(features)[0]
    first, second, order = tf.unstack(tf.random.experimental.stateless_split(_seed(seed, _MIXUP), 3))
    gamma_first = tf.random.stateless_gamma([batch], first, alpha)
    gamma_second = tf.random.stateless_gamma([batch], second, alpha)
    total = gamma_first + gamma_second
    weight = tf.where(total > 0, gamma_first / tf.where(total > 0, total, 1.0), 1.0)  # Beta(alpha, alpha)
    partner = tf.argsort(tf.random.stateless_uniform([batch], order))
    mixed_targets = weight[:, None] * targets + (1.0 - weight[:, None]) * tf.gather(targets, partner)
    row_weight = tf.reshape(weight, [-1, 1, 1, 1])
    mixed_features = row_weight * features + (1.0 - row_weight) * tf.gather(features, partner)
    return mixed_features, mixed_targets


def augmented_batch(
    audio: tf.Tensor,
    labels: tf.Tensor,
    background: tf.Tensor,
    feature_settings: FeatureSettings,
    settings: AugmentSettings,
    label_count: int,
    seed: tf.Tensor,
) -> tuple[tf.Tensor, tf.Tensor]:
    """One training batch from float audio [batch, samples] and integer labels:
    (features [batch, frames, bins, 1], probability targets [batch, label_count])."""
    audio = augment(audio, labels, background, settings, seed)
    warp = None
    if settings.pitch_perturbation > 0:
        change = settings.pitch_perturbation
        warp = 1.0 + _uniform([tf.shape(audio)[0]], seed, _WARP, -change, change)
    features = compute_features(audio, feature_settings, frequency_warp=warp)
    features = spec_augment(features, settings, seed)
    targets = tf.one_hot(labels, label_count, dtype=tf.float32)
    if settings.mixup_alpha > 0:
        features, targets = mixup(features, targets, settings.mixup_alpha, seed)
    return features, targets


@dataclasses.dataclass(frozen=True)
class ShardSource:
    """Training clips streamed from shards on disk (speechclas.shards): what a dataset larger
    than memory trains from. Only `shuffle_buffer` clips per stream are held at once."""

    files: tuple[str, ...]  # the training split's shard files
    file_labels: tuple[frozenset[str], ...]  # the label folders each file holds
    labels: tuple[str, ...]  # the classes, as data.labels_for orders them
    unknown_label: int
    silence_label: int
    has_unknown: bool  # whether any clip of the files is of another word
    background: np.ndarray  # float32 [noise samples], may be empty
    desired_samples: int
    shuffle_buffer: int

    @property
    def label_count(self) -> int:
        return len(self.labels)


@dataclasses.dataclass(frozen=True)
class InputShard:
    """Which part of the data one input pipeline reads (tf.distribute.InputContext's fields)."""

    count: int = 1
    index: int = 0

    @classmethod
    def of(cls, context) -> InputShard:
        return cls() if context is None else cls(context.num_input_pipelines, context.input_pipeline_id)


def class_table(labels: tuple[str, ...], unknown_label: int) -> tf.lookup.StaticHashTable:
    """Folder name -> class index; folders that are not wanted words are _unknown_."""
    words = list(labels[2:])
    return tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(tf.constant(words or [""], tf.string),
                                            tf.constant(list(range(2, 2 + len(words))) or [unknown_label], tf.int32)),
        default_value=unknown_label,
    )


def by_file(data: ShardSource, part: InputShard) -> bool:
    """Whether each of several input pipelines reads its own files (tf.data's auto-shard by
    file): only when every pipeline's files hold wanted words and, where there are any,
    unknown ones. Otherwise each reads every file and keeps every count-th record."""
    if part.count == 1 or len(data.files) < part.count:
        return False
    wanted = set(data.labels[2:])
    for index in range(part.count):
        labels = set().union(*data.file_labels[index :: part.count])
        if not labels & wanted or (data.has_unknown and not labels - wanted):
            return False
    return True


def _shard_records(files: tuple[str, ...], part: InputShard, seed: int, own_files: bool) -> tf.data.Dataset:
    """One pass over the serialized records of `files`, read interleaved: this pipeline's files,
    shuffled anew every pass, or every count-th record of all of them, in the files' own order
    (already random), the same for every pipeline, so no two pipelines share a record."""
    names = tf.data.Dataset.from_tensor_slices(list(files))
    if part.count > 1 and own_files:
        names = names.shard(part.count, part.index)
    own = -(-len(files) // part.count) if own_files else len(files)
    if own_files or part.count == 1:
        names = names.shuffle(max(own, 1), seed=seed, reshuffle_each_iteration=True)
    records = names.interleave(
        tf.data.TFRecordDataset, cycle_length=max(1, min(own, 16)), block_length=1,
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if part.count > 1 and not own_files:
        records = records.shard(part.count, part.index)
    return records


def _stream_elements(data: ShardSource, silence_percentage: float, unknown_percentage: float, seed: int,
                     part: InputShard) -> tf.data.Dataset:
    """(int16 audio, label) of the shards: wanted words, unknown words and silence at their shares,
    each kind through its own shuffle buffer."""
    table = class_table(data.labels, data.unknown_label)
    own_files = by_file(data, part)

    def kind(wanted: bool, kind_seed: int) -> tf.data.Dataset:
        def keep(serialized):
            is_unknown = tf.equal(table.lookup(shards.parse_fields(serialized)["label"]), data.unknown_label)
            return tf.logical_not(is_unknown) if wanted else is_unknown

        def decode(serialized):
            record = shards.parse(serialized, data.desired_samples)
            return record["audio"], table.lookup(record["label"])

        # Filtered one pass at a time, then repeated: a pass with no record of this kind ends
        # the kind (sample_from_datasets goes on without it) instead of searching forever.
        return (_shard_records(data.files, part, kind_seed, own_files).filter(keep).repeat()
                .shuffle(data.shuffle_buffer, seed=kind_seed).map(decode, num_parallel_calls=tf.data.AUTOTUNE))

    silence = (tf.zeros([data.desired_samples], tf.int16), tf.constant(data.silence_label, tf.int32))
    return _sample_kinds(kind(True, seed), kind(False, seed + 1) if data.has_unknown else None,
                         tf.data.Dataset.from_tensors(silence), unknown_percentage, silence_percentage, seed)


def _sample_kinds(wanted: tf.data.Dataset, unknown: tf.data.Dataset | None, silence: tf.data.Dataset,
                  unknown_percentage: float, silence_percentage: float, seed: int) -> tf.data.Dataset:
    """Wanted words, unknown words (None: there are none) and silence (one element, repeated)
    drawn at 100 : unknown_percentage : silence_percentage, seeded."""
    sources, weights = [wanted], [100.0]
    if unknown is not None and unknown_percentage > 0:
        sources.append(unknown)
        weights.append(unknown_percentage)
    if silence_percentage > 0:
        sources.append(silence.repeat())
        weights.append(silence_percentage)
    total = sum(weights)
    return tf.data.Dataset.sample_from_datasets(sources, weights=[w / total for w in weights], seed=seed)


def _memory_elements(data: TrainingAudio, silence_percentage: float, unknown_percentage: float, seed: int):
    """Row indices of clips held in memory, sampled as _stream_elements samples shards, and the
    function that looks a batch of them up: (int16 audio, labels)."""
    all_audio = np.concatenate(
        [data.wanted_audio, data.unknown_audio, np.zeros((1, data.wanted_audio.shape[1]), np.int16)]
    )
    all_labels = np.concatenate(
        [
            data.wanted_labels.astype(np.int32),
            np.full(len(data.unknown_audio), data.unknown_label, np.int32),
            np.array([data.silence_label], np.int32),
        ]
    )
    n_wanted, n_unknown = len(data.wanted_audio), len(data.unknown_audio)
    wanted = tf.data.Dataset.range(n_wanted).repeat().shuffle(min(n_wanted, 10000), seed=seed)
    unknown = None
    if n_unknown:
        unknown = tf.data.Dataset.range(n_wanted, n_wanted + n_unknown).repeat().shuffle(
            min(n_unknown, 10000), seed=seed + 1)
    silence = tf.data.Dataset.from_tensors(tf.constant(n_wanted + n_unknown, tf.int64))
    indices = _sample_kinds(wanted, unknown, silence, unknown_percentage, silence_percentage, seed)
    audio_table = tf.constant(all_audio)
    label_table = tf.constant(all_labels)
    return indices, lambda rows: (tf.gather(audio_table, rows), tf.gather(label_table, rows))


def training_dataset(
    data: TrainingAudio | ShardSource,
    feature_settings: FeatureSettings,
    augment_settings: AugmentSettings,
    batch_size: int,
    silence_percentage: float,
    unknown_percentage: float,
    seed: int,
    part: InputShard = InputShard(),
    augment_in_pipeline: bool = True,
) -> tf.data.Dataset:
    """An endless dataset of (features [batch, time, features, 1], targets
    [batch, label_count]): one-hot, or mixed by mixup. The same seed gives
    the same batches.

    `part`: which input pipeline of several this is (tf.distribute); each
    draws its own batches. Without `augment_in_pipeline` it answers
    (int16 audio [batch, samples], labels, seed [2]) and the train step
    augments and computes the features itself (`augmented_batch`), on its device.
    """
    pipeline_seed = seed + 7919 * part.index
    if isinstance(data, ShardSource):
        elements = _stream_elements(data, silence_percentage, unknown_percentage, pipeline_seed, part)
        look_up = None
    else:  # a batch of rows is gathered at once
        elements, look_up = _memory_elements(data, silence_percentage, unknown_percentage, pipeline_seed)
    background = tf.constant(data.background.astype(np.float32))

    def make_batch(batch_number, batch):
        audio, labels = batch if look_up is None else look_up(batch)
        batch_seed = tf.stack([tf.constant(seed, tf.int64), batch_number * part.count + part.index])
        if not augment_in_pipeline:
            return audio, labels, batch_seed
        return augmented_batch(
            _to_float(audio), labels, background, feature_settings, augment_settings, data.label_count, batch_seed
        )

    return (
        elements.batch(batch_size, drop_remainder=True)
        .enumerate()
        .map(make_batch, num_parallel_calls=tf.data.AUTOTUNE)
        .prefetch(tf.data.AUTOTUNE)
    )


@dataclasses.dataclass(frozen=True)
class ShardEvaluation:
    """A fixed evaluation set of one split read from its shards, as data.evaluation_examples
    chooses one in memory: every wanted clip, a seeded share of the unknown clips (chosen by a
    keyed hash of the path, so the same clips each pass) and `silence_count` rows of seeded noise."""

    files: tuple[str, ...]
    labels: tuple[str, ...]
    unknown_label: int
    silence_label: int
    desired_samples: int
    unknown_share: float  # of the split's unknown clips, 0 to 1
    silence_count: int
    background: np.ndarray  # float32
    seed: int
    expected_size: int  # clips it holds, the hash's choice of unknown clips counted at its mean


def evaluation_elements(source: ShardEvaluation) -> tf.data.Dataset:
    """(int16 audio, label) of a ShardEvaluation, in the shards' order, then the silence rows."""
    table = class_table(source.labels, source.unknown_label)
    buckets = 1 << 30

    def keep(serialized):
        record = shards.parse_fields(serialized, ("label", "path"))
        is_unknown = tf.equal(table.lookup(record["label"]), source.unknown_label)
        chosen = tf.strings.to_hash_bucket_strong(record["path"], buckets, key=[source.seed, 0]) < int(
            source.unknown_share * buckets)
        return tf.logical_or(tf.logical_not(is_unknown), chosen)

    def decode(serialized):
        record = shards.parse(serialized, source.desired_samples)
        return record["audio"], table.lookup(record["label"])

    clips = tf.data.TFRecordDataset(list(source.files)).filter(keep).map(decode)
    if source.silence_count == 0:
        return clips
    background = tf.constant(source.background.astype(np.float32))
    samples = source.desired_samples
    room = len(source.background) - samples + 1

    def noise(row):
        row_seed = tf.stack([tf.constant(source.seed, tf.int64), row])
        if room <= 0:
            return tf.zeros([samples], tf.int16), tf.constant(source.silence_label, tf.int32)
        start = tf.random.stateless_uniform([], row_seed, 0, room, dtype=tf.int32)
        volume = tf.random.stateless_uniform([], _seed(row_seed, 1))
        window = tf.clip_by_value(background[start : start + samples] * volume, -1.0, 1.0)
        return tf.cast(tf.round(window * 32767.0), tf.int16), tf.constant(source.silence_label, tf.int32)

    return clips.concatenate(tf.data.Dataset.range(source.silence_count).map(noise))


def evaluation_batches(elements: tf.data.Dataset, feature_settings: FeatureSettings, batch_size: int,
                       cache: bool = True) -> tf.data.Dataset:
    """Batches of (features, labels) of (int16 audio, label) elements: no augmentation. With
    `cache` the features, which never change, are kept from the first pass (16 KB a clip for the
    defaults), so every later evaluation only runs the model."""

    def make_batch(audio, batch_labels):
        return compute_features(_to_float(audio), feature_settings), batch_labels

    batches = elements.batch(batch_size).map(make_batch, num_parallel_calls=tf.data.AUTOTUNE)
    return (batches.cache() if cache else batches).prefetch(tf.data.AUTOTUNE)


def evaluation_dataset(
    audio_int16: np.ndarray, labels: np.ndarray, feature_settings: FeatureSettings, batch_size: int
) -> tf.data.Dataset:
    """One pass over fixed clips held in memory (evaluation_batches, cached)."""
    elements = tf.data.Dataset.from_tensor_slices((audio_int16, labels.astype(np.int32)))
    return evaluation_batches(elements, feature_settings, batch_size)


def take_clips(elements: tf.data.Dataset, limit: int) -> tuple[np.ndarray, np.ndarray]:
    """At most `limit` (int16 audio, label) elements as arrays [n, samples] and [n]: the bounded
    sample of a split that streaming evaluation and the exports' accuracies score."""
    audio, labels = [], []
    for clip, label in elements.take(limit).batch(1024):
        audio.append(clip.numpy())
        labels.append(label.numpy())
    if not audio:
        return np.zeros((0, 0), np.int16), np.zeros((0,), np.int32)
    return np.concatenate(audio), np.concatenate(labels).astype(np.int32)
