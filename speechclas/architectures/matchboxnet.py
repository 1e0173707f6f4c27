"""MatchboxNet (Majumdar & Ginsburg 2020, "MatchboxNet: 1D Time-Channel
Separable Convolutional Neural Network Architecture for Speech Commands
Recognition"), the 3x1x64 variant.

As in TC-ResNet, the feature bins are the channels of a [time, 1, bins] image;
every convolution is a 1-D time-channel separable one: a depthwise k x 1
filter over time, then a 1x1 convolution across channels.
"""

from __future__ import annotations

import keras
from keras import layers

from speechclas.architectures.common import BN_MOMENTUM, fingerprint_input, scaled_channels, time_pooled_logits

PROLOGUE = (128, 11)  # channels, kernel
BLOCKS = ((64, 13), (64, 15), (64, 17))  # B=3 residual blocks of R=1 sub-block, C=64
EPILOGUE = (128, 29, 2)  # channels, kernel, dilation
FINAL_CHANNELS = 128


def _separable(x, channels: int, kernel: int, name: str, dilation: int = 1):
    """Time-channel separable convolution with batch normalisation."""
    x = layers.DepthwiseConv2D((kernel, 1), dilation_rate=(dilation, 1), padding="same", use_bias=False,
                               name=f"{name}_dw")(x)
    x = layers.Conv2D(channels, 1, use_bias=False, name=f"{name}_pw")(x)
    return layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"{name}_bn")(x)


def _residual_block(x, channels: int, kernel: int, name: str):
    """One sub-block; its residual is a 1x1 convolution and BN of the block's input, added before the ReLU."""
    y = _separable(x, channels, kernel, name)
    shortcut = layers.Conv2D(channels, 1, use_bias=False, name=f"{name}_residual")(x)
    shortcut = layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"{name}_residual_bn")(shortcut)
    x = layers.Add(name=f"{name}_add")([y, shortcut])
    return layers.ReLU(name=f"{name}_relu")(x)


def build_matchboxnet(input_shape, label_count: int, dropout_rate: float, width: float = 1.0) -> keras.Model:
    """MatchboxNet 3x1x64 (channels times the width): a prologue (separable,
    kernel 11, 128 channels), three residual blocks (kernels 13, 15, 17, 64
    channels), an epilogue (separable, kernel 29 dilated 2, 128 channels; a
    1x1 convolution, 128 channels), each with BN and ReLU, then global average
    pooling over time (`time_pool`) and a linear classifier. The paper's
    dropout is 0, so `dropout_rate` does not apply.
    """
    inputs = fingerprint_input(input_shape)
    # [time, bins, 1] -> [time, 1, bins]: the same values in the same order.
    x = layers.Reshape((-1, 1, input_shape[1]), name="bins_as_channels")(inputs)
    channels, kernel = PROLOGUE
    x = _separable(x, scaled_channels(channels, width), kernel, name="prologue")
    x = layers.ReLU(name="prologue_relu")(x)
    for block, (channels, kernel) in enumerate(BLOCKS, start=1):
        x = _residual_block(x, scaled_channels(channels, width), kernel, name=f"block{block}")
    channels, kernel, dilation = EPILOGUE
    x = _separable(x, scaled_channels(channels, width), kernel, name="epilogue1", dilation=dilation)
    x = layers.ReLU(name="epilogue1_relu")(x)
    x = layers.Conv2D(scaled_channels(FINAL_CHANNELS, width), 1, use_bias=False, name="epilogue2")(x)
    x = layers.BatchNormalization(momentum=BN_MOMENTUM, name="epilogue2_bn")(x)
    x = layers.ReLU(name="epilogue2_relu")(x)
    outputs = time_pooled_logits(x, label_count)
    return keras.Model(inputs, outputs, name="matchboxnet")
