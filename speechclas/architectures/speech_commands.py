"""The networks of TF's speech_commands example (Warden 2018; Sainath &
Parada 2015 for conv and low_latency_conv), built with Keras layers.

Dropout layers are active only when the model is called with training=True.
"""

from __future__ import annotations

import keras
from keras import layers

from speechclas.architectures.common import fingerprint_input


def build_conv(input_shape, label_count: int, dropout_rate: float) -> keras.Model:
    """cnn-trad-fpool3 (Sainath & Parada 2015) as in speech_commands: two
    convolutions, max pooling, a linear classifier. The default; accurate
    but the heaviest in multiplies."""
    inputs = fingerprint_input(input_shape)
    x = layers.Conv2D(64, (20, 8), padding="same", activation="relu", name="conv1")(inputs)
    x = layers.Dropout(dropout_rate)(x)
    x = layers.MaxPool2D((2, 2), strides=(2, 2), padding="same")(x)
    x = layers.Conv2D(64, (10, 4), padding="same", activation="relu", name="conv2")(x)
    x = layers.Dropout(dropout_rate)(x)
    x = layers.Flatten()(x)
    outputs = layers.Dense(label_count, name="logits")(x)
    return keras.Model(inputs, outputs, name="conv")


def build_low_latency_conv(input_shape, label_count: int, dropout_rate: float) -> keras.Model:
    """cnn-one-fstride4: one convolution spanning all time frames, then
    fully connected layers; few multiplies, fewer parameters sharing."""
    inputs = fingerprint_input(input_shape)
    time_frames = input_shape[0]
    x = layers.Conv2D(186, (time_frames, 8), strides=(1, 1), padding="valid", activation="relu", name="conv1")(inputs)
    x = layers.Dropout(dropout_rate)(x)
    x = layers.Flatten()(x)
    x = layers.Dense(128, name="fc1")(x)
    x = layers.Dropout(dropout_rate)(x)
    x = layers.Dense(128, name="fc2")(x)
    x = layers.Dropout(dropout_rate)(x)
    outputs = layers.Dense(label_count, name="logits")(x)
    return keras.Model(inputs, outputs, name="low_latency_conv")


def build_low_latency_svdf(input_shape, label_count: int, dropout_rate: float) -> keras.Model:
    """SVDF (rank-2 factorised filters over features, then over time), the
    non-streaming form: a per-frame projection followed by a depthwise filter
    over the whole window; the same weights can run streaming frame by frame."""
    units, rank = 1280, 2
    inputs = fingerprint_input(input_shape)
    time_frames = input_shape[0]
    x = layers.Reshape((time_frames, input_shape[1]))(inputs)
    x = layers.Dense(units * rank, use_bias=False, name="svdf_feature_filter")(x)
    x = layers.DepthwiseConv1D(time_frames, padding="valid", use_bias=False, name="svdf_time_filter")(x)
    x = layers.Reshape((units, rank))(x)
    x = _RankSumBias(name="svdf_rank_sum")(x)
    x = layers.ReLU()(x)
    x = layers.Dropout(dropout_rate)(x)
    x = layers.Dense(256, name="fc1")(x)
    x = layers.Dropout(dropout_rate)(x)
    x = layers.Dense(256, name="fc2")(x)
    x = layers.Dropout(dropout_rate)(x)
    outputs = layers.Dense(label_count, name="logits")(x)
    return keras.Model(inputs, outputs, name="low_latency_svdf")


class _RankSumBias(layers.Layer):
    """Sums the rank filters of each SVDF unit and adds the unit's bias."""

    def build(self, input_shape):
        self.bias = self.add_weight(shape=(input_shape[-2],), initializer="zeros", name="bias")

    def call(self, inputs):
        return keras.ops.sum(inputs, axis=-1) + self.bias


def build_single_fc(input_shape, label_count: int, dropout_rate: float) -> keras.Model:
    """One fully connected layer: a baseline, and a check of the pipeline."""
    inputs = fingerprint_input(input_shape)
    x = layers.Flatten()(inputs)
    outputs = layers.Dense(label_count, name="logits")(x)
    return keras.Model(inputs, outputs, name="single_fc")


def build_tiny_conv(input_shape, label_count: int, dropout_rate: float) -> keras.Model:
    """One strided convolution with 8 filters: small enough for microcontrollers."""
    inputs = fingerprint_input(input_shape)
    x = layers.Conv2D(8, (10, 8), strides=(2, 2), padding="same", activation="relu", name="conv1")(inputs)
    x = layers.Dropout(dropout_rate)(x)
    x = layers.Flatten()(x)
    outputs = layers.Dense(label_count, name="logits")(x)
    return keras.Model(inputs, outputs, name="tiny_conv")


def build_tiny_embedding_conv(input_shape, label_count: int, dropout_rate: float) -> keras.Model:
    """tiny_conv with a second, widely strided convolution: an embedding
    of a few values before the classifier."""
    inputs = fingerprint_input(input_shape)
    x = layers.Conv2D(8, (10, 8), strides=(2, 2), padding="same", activation="relu", name="conv1")(inputs)
    x = layers.Dropout(dropout_rate)(x)
    x = layers.Conv2D(8, (10, 8), strides=(8, 8), padding="same", activation="relu", name="conv2")(x)
    x = layers.Dropout(dropout_rate)(x)
    x = layers.Flatten()(x)
    outputs = layers.Dense(label_count, name="logits")(x)
    return keras.Model(inputs, outputs, name="tiny_embedding_conv")
