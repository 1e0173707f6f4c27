"""Batched tf.data pipelines: augmentation and features on the fly.

Clips are held in memory as int16 (see data.load_clips). The training
pipeline samples wanted words, unknown words and silence at the configured
rates, then for a whole batch at once applies a random time shift, mixes in
background noise and computes the features. Evaluation pipelines only
compute features, so validation and test inputs never change.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf

from speechclas.features import FeatureSettings, compute_features


@dataclasses.dataclass(frozen=True)
class AugmentSettings:
    time_shift_samples: int
    background_volume: float
    background_frequency: float
    silence_label: int


@dataclasses.dataclass(frozen=True)
class TrainingAudio:
    """Everything the training pipeline samples from."""

    wanted_audio: np.ndarray  # int16 [n, samples]
    wanted_labels: np.ndarray  # int32 [n]
    unknown_audio: np.ndarray  # int16 [m, samples]
    unknown_label: int
    silence_label: int
    background: np.ndarray  # float32 [noise samples], may be empty


def _to_float(audio_int16: tf.Tensor) -> tf.Tensor:
    return tf.cast(audio_int16, tf.float32) / 32768.0


def augment(audio: tf.Tensor, labels: tf.Tensor, background: tf.Tensor, settings: AugmentSettings) -> tf.Tensor:
    """Time shift, silence and background noise for a batch [batch, samples]."""
    batch = tf.shape(audio)[0]
    samples = tf.shape(audio)[1]
    shift = settings.time_shift_samples
    if shift > 0:
        offsets = tf.random.uniform([batch], -shift, shift + 1, dtype=tf.int32)
        padded = tf.pad(audio, [[0, 0], [shift, shift]])
        # A positive offset delays the word (zeros in front), as in the recipe.
        positions = (shift - offsets)[:, None] + tf.range(samples)[None, :]
        audio = tf.gather(padded, positions, batch_dims=1)
    is_silence = tf.equal(labels, settings.silence_label)
    audio = tf.where(is_silence[:, None], tf.zeros_like(audio), audio)
    noise_length = tf.shape(background)[0]
    if background.shape[0] is None or background.shape[0] > 0:
        starts = tf.random.uniform([batch], 0, tf.maximum(noise_length - samples, 1), dtype=tf.int32)
        noise = tf.gather(background, starts[:, None] + tf.range(samples)[None, :])
        with_noise = tf.random.uniform([batch]) < settings.background_frequency
        volume = tf.where(with_noise, tf.random.uniform([batch], 0.0, settings.background_volume), 0.0)
        # Silence clips are pure noise at any volume, so the model learns quiet rooms too.
        volume = tf.where(is_silence, tf.random.uniform([batch], 0.0, 1.0), volume)
        audio = audio + volume[:, None] * noise
    return tf.clip_by_value(audio, -1.0, 1.0)


def training_dataset(
    data: TrainingAudio,
    feature_settings: FeatureSettings,
    augment_settings: AugmentSettings,
    batch_size: int,
    silence_percentage: float,
    unknown_percentage: float,
    seed: int,
) -> tf.data.Dataset:
    """An endless dataset of (features [batch, time, features, 1], labels [batch])."""
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
    sources = [tf.data.Dataset.range(n_wanted).repeat().shuffle(min(n_wanted, 10000), seed=seed)]
    weights = [100.0]
    if n_unknown and unknown_percentage > 0:
        unknown = tf.data.Dataset.range(n_wanted, n_wanted + n_unknown).repeat()
        sources.append(unknown.shuffle(min(n_unknown, 10000), seed=seed + 1))
        weights.append(unknown_percentage)
    if silence_percentage > 0:
        sources.append(tf.data.Dataset.from_tensors(tf.constant(n_wanted + n_unknown, tf.int64)).repeat())
        weights.append(silence_percentage)
    total = sum(weights)
    indices = tf.data.Dataset.sample_from_datasets(sources, weights=[w / total for w in weights], seed=seed)

    audio_table = tf.constant(all_audio)
    label_table = tf.constant(all_labels)
    background = tf.constant(data.background.astype(np.float32))

    def make_batch(batch_indices):
        labels = tf.gather(label_table, batch_indices)
        audio = _to_float(tf.gather(audio_table, batch_indices))
        audio = augment(audio, labels, background, augment_settings)
        return compute_features(audio, feature_settings), labels

    return (
        indices.batch(batch_size, drop_remainder=True)
        .map(make_batch, num_parallel_calls=tf.data.AUTOTUNE)
        .prefetch(tf.data.AUTOTUNE)
    )


def evaluation_dataset(
    audio_int16: np.ndarray, labels: np.ndarray, feature_settings: FeatureSettings, batch_size: int
) -> tf.data.Dataset:
    """One pass over fixed clips, features only: no augmentation. The features
    never change, so they are computed on the first pass and cached (16 KB a
    clip), and every later evaluation only runs the model."""

    def make_batch(audio, batch_labels):
        return compute_features(_to_float(audio), feature_settings), batch_labels

    return (
        tf.data.Dataset.from_tensor_slices((audio_int16, labels.astype(np.int32)))
        .batch(batch_size)
        .map(make_batch, num_parallel_calls=tf.data.AUTOTUNE)
        .cache()
        .prefetch(tf.data.AUTOTUNE)
    )
