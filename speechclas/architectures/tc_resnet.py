"""TC-ResNet (Choi et al. 2019, "Temporal Convolution for Real-time Keyword
Spotting on Mobile Devices").

The feature bins become the channels of a one-pixel-wide image, [time, 1,
bins], so every convolution is temporal (k x 1) and sees the whole spectrum of
each frame: few multiplies, and fast on a phone's or laptop's CPU.
"""

from __future__ import annotations

import keras
from keras import layers

from speechclas.architectures.common import BN_MOMENTUM, fingerprint_input, scaled_channels, time_pooled_logits

FIRST_CHANNELS = 16
BLOCK_CHANNELS = (24, 32, 48)  # TC-ResNet8: three residual blocks
FIRST_KERNEL = 3
BLOCK_KERNEL = 9


def _residual_block(x, channels: int, name: str):
    """Two 9x1 convolutions, the first strided 2 in time; the shortcut is a
    strided 1x1 convolution, as the channel count changes in every block."""
    y = layers.Conv2D(channels, (BLOCK_KERNEL, 1), strides=(2, 1), padding="same", use_bias=False,
                      name=f"{name}_conv1")(x)
    y = layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"{name}_bn1")(y)
    y = layers.ReLU(name=f"{name}_relu1")(y)
    y = layers.Conv2D(channels, (BLOCK_KERNEL, 1), padding="same", use_bias=False, name=f"{name}_conv2")(y)
    y = layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"{name}_bn2")(y)
    shortcut = layers.Conv2D(channels, 1, strides=(2, 1), use_bias=False, name=f"{name}_shortcut")(x)
    shortcut = layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"{name}_shortcut_bn")(shortcut)
    shortcut = layers.ReLU(name=f"{name}_shortcut_relu")(shortcut)
    x = layers.Add(name=f"{name}_add")([y, shortcut])
    return layers.ReLU(name=f"{name}_relu")(x)


def build_tc_resnet8(input_shape, label_count: int, dropout_rate: float, width: float = 1.0) -> keras.Model:
    """TC-ResNet8-`width` (the paper's TC-ResNet8 at 1, TC-ResNet8-1.5 at 1.5):
    a 3x1 convolution with 16 channels, three stride-2 residual blocks of 24,
    32 and 48 channels (all times the width), global average pooling over
    time (`time_pool`), a linear classifier. Batch normalisation is the
    regulariser; `dropout_rate` does not apply.
    """
    inputs = fingerprint_input(input_shape)
    # [time, bins, 1] -> [time, 1, bins]: the same values in the same order.
    x = layers.Reshape((-1, 1, input_shape[1]), name="bins_as_channels")(inputs)
    x = layers.Conv2D(scaled_channels(FIRST_CHANNELS, width), (FIRST_KERNEL, 1), padding="same", use_bias=False,
                      name="conv1")(x)
    x = layers.BatchNormalization(momentum=BN_MOMENTUM, name="conv1_bn")(x)
    x = layers.ReLU(name="conv1_relu")(x)
    for block, channels in enumerate(BLOCK_CHANNELS, start=1):
        x = _residual_block(x, scaled_channels(channels, width), name=f"block{block}")
    outputs = time_pooled_logits(x, label_count)
    return keras.Model(inputs, outputs, name="tc_resnet8")
