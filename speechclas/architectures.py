"""Small-footprint keyword-spotting networks, chosen by name from one table.

Each builder takes the input shape (time, features, 1), the number of
classes and the dropout rate and returns a Keras model that outputs logits.
Dropout layers are active only when the model is called with training=True.
"""

from __future__ import annotations

from collections.abc import Callable

import keras
from keras import layers

# Keras' default 0.99 averages over ~100 steps; runs here are short (a few
# thousand steps with a fast optimizer), and stale statistics make the
# inference-mode accuracy lag far behind the training-mode accuracy.
BN_MOMENTUM = 0.9


def _inputs(input_shape):
    return keras.Input(shape=input_shape, name="fingerprint")


def build_conv(input_shape, label_count: int, dropout_rate: float) -> keras.Model:
    """cnn-trad-fpool3 (Sainath & Parada 2015) as in speech_commands: two
    convolutions, max pooling, a linear classifier. The default; accurate
    but the heaviest in multiplies."""
    inputs = _inputs(input_shape)
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
    inputs = _inputs(input_shape)
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
    inputs = _inputs(input_shape)
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
    inputs = _inputs(input_shape)
    x = layers.Flatten()(inputs)
    outputs = layers.Dense(label_count, name="logits")(x)
    return keras.Model(inputs, outputs, name="single_fc")


def build_tiny_conv(input_shape, label_count: int, dropout_rate: float) -> keras.Model:
    """One strided convolution with 8 filters: small enough for microcontrollers."""
    inputs = _inputs(input_shape)
    x = layers.Conv2D(8, (10, 8), strides=(2, 2), padding="same", activation="relu", name="conv1")(inputs)
    x = layers.Dropout(dropout_rate)(x)
    x = layers.Flatten()(x)
    outputs = layers.Dense(label_count, name="logits")(x)
    return keras.Model(inputs, outputs, name="tiny_conv")


def build_tiny_embedding_conv(input_shape, label_count: int, dropout_rate: float) -> keras.Model:
    """tiny_conv with a second, widely strided convolution: an embedding
    of a few values before the classifier."""
    inputs = _inputs(input_shape)
    x = layers.Conv2D(8, (10, 8), strides=(2, 2), padding="same", activation="relu", name="conv1")(inputs)
    x = layers.Dropout(dropout_rate)(x)
    x = layers.Conv2D(8, (10, 8), strides=(8, 8), padding="same", activation="relu", name="conv2")(x)
    x = layers.Dropout(dropout_rate)(x)
    x = layers.Flatten()(x)
    outputs = layers.Dense(label_count, name="logits")(x)
    return keras.Model(inputs, outputs, name="tiny_embedding_conv")


def build_ds_cnn(input_shape, label_count: int, dropout_rate: float) -> keras.Model:
    """DS-CNN (Zhang et al. 2017, "Hello Edge"), the small variant: a strided
    convolution, four depthwise-separable blocks with batch normalisation,
    global average pooling. Best accuracy per multiply of this table.

    The paper feeds 49x10 MFCCs; the recipe's 98x40 have eight times as many
    cells, so the first separable block also strides 2x2, which keeps the
    multiplies near the paper's budget (about 7 M per clip instead of 21 M).
    As in the paper, batch normalisation is the only regulariser: dropout on
    the 64 pooled features of so small a network slows short trainings
    markedly, so `dropout_rate` does not apply.
    """
    filters = 64
    inputs = _inputs(input_shape)
    x = layers.Conv2D(filters, (10, 4), strides=(2, 2), padding="same", use_bias=False, name="conv1")(inputs)
    x = layers.BatchNormalization(momentum=BN_MOMENTUM, name="conv1_bn")(x)
    x = layers.ReLU()(x)
    for block in range(1, 5):
        strides = (2, 2) if block == 1 else (1, 1)
        x = layers.DepthwiseConv2D((3, 3), strides=strides, padding="same", use_bias=False, name=f"dw{block}")(x)
        x = layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"dw{block}_bn")(x)
        x = layers.ReLU()(x)
        x = layers.Conv2D(filters, (1, 1), use_bias=False, name=f"pw{block}")(x)
        x = layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"pw{block}_bn")(x)
        x = layers.ReLU()(x)
    x = layers.GlobalAveragePooling2D(name="time_pool")(x)
    outputs = layers.Dense(label_count, name="logits")(x)
    return keras.Model(inputs, outputs, name="ds_cnn")


ARCHITECTURES: dict[str, Callable[..., keras.Model]] = {
    "conv": build_conv,
    "low_latency_conv": build_low_latency_conv,
    "low_latency_svdf": build_low_latency_svdf,
    "single_fc": build_single_fc,
    "tiny_conv": build_tiny_conv,
    "tiny_embedding_conv": build_tiny_embedding_conv,
    "ds_cnn": build_ds_cnn,
}


def build_model(name: str, input_shape, label_count: int, dropout_rate: float) -> keras.Model:
    try:
        builder = ARCHITECTURES[name]
    except KeyError:
        raise ValueError(f"unknown model_architecture {name!r}; choose one of {sorted(ARCHITECTURES)}") from None
    return builder(tuple(input_shape), label_count, dropout_rate)
