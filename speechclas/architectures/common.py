"""What every architecture shares: the input layer, batch-norm momentum, the pooled classifier."""

from __future__ import annotations

import keras
from keras import layers

# The layer detection's shared trunk cuts a network at (speechclas.export.split_at_time_pool).
TIME_POOL_LAYER = "time_pool"

# Keras' default 0.99 averages over ~100 steps; runs here are short (a few
# thousand steps with a fast optimizer), and stale statistics make the
# inference-mode accuracy lag far behind the training-mode accuracy.
BN_MOMENTUM = 0.9


def fingerprint_input(input_shape) -> keras.KerasTensor:
    """The model input, [time frames, feature bins, 1], named as the exports expect."""
    return keras.Input(shape=input_shape, name="fingerprint")


def scaled_channels(channels: int, width: float) -> int:
    """A channel count times the width multiplier (model_width), at least 1."""
    return max(1, round(channels * width))


def time_pooled_logits(x: keras.KerasTensor, label_count: int) -> keras.KerasTensor:
    """Mean over time (and the other axes) named TIME_POOL_LAYER, then a linear classifier:
    the head(mean(trunk)) form that lets detection run the trunk once over a stream."""
    pooled = layers.GlobalAveragePooling2D(name=TIME_POOL_LAYER)(x)
    return layers.Dense(label_count, name="logits")(pooled)
