"""DS-CNN (Zhang et al. 2017, "Hello Edge: Keyword Spotting on Microcontrollers")."""

from __future__ import annotations

import keras
from keras import layers

from speechclas.architectures.common import BN_MOMENTUM, fingerprint_input, time_pooled_logits


def build_ds_cnn(input_shape, label_count: int, dropout_rate: float) -> keras.Model:
    """DS-CNN (Zhang et al. 2017, "Hello Edge"), the small variant: a strided
    convolution, four depthwise-separable blocks with batch normalisation,
    global average pooling (`time_pool`). Best accuracy per multiply of this table.

    The paper feeds 49x10 MFCCs; the recipe's 98x40 have eight times as many
    cells, so the first separable block also strides 2x2, which keeps the
    multiplies near the paper's budget (about 7 M per clip instead of 21 M).
    As in the paper, batch normalisation is the only regulariser: dropout on
    the 64 pooled features of so small a network slows short trainings
    markedly, so `dropout_rate` does not apply.
    """
    filters = 64
    inputs = fingerprint_input(input_shape)
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
    outputs = time_pooled_logits(x, label_count)
    return keras.Model(inputs, outputs, name="ds_cnn")
