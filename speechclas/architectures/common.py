"""What every architecture shares: the input layer and batch-norm momentum."""

from __future__ import annotations

import keras

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
