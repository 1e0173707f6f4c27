"""BC-ResNet (Kim et al. 2021, "Broadcasted Residual Learning for Efficient
Keyword Spotting") with sub-spectral normalisation.

Features are [time, frequency, channels] here (the paper draws frequency
first): frequency convolutions are (1, k) kernels, temporal ones (k, 1).
A broadcasted residual block runs a 2-D part (frequency-depthwise convolution
and SubSpectralNorm) whose output it keeps, averages it over frequency, runs a
1-D temporal part (dilated depthwise convolution, BN, swish, 1x1 convolution,
dropout) and adds that back to every frequency bin (a broadcast), plus the
block's input unless the block changes the channel count (a transition block).
"""

from __future__ import annotations

import keras
import numpy as np
from keras import layers

from speechclas.architectures.common import BN_MOMENTUM, fingerprint_input, scaled_channels, time_pooled_logits

# BC-ResNet-1's channels (the paper's base of 8 times 2, 1, 1.5, 2, 2.5, 4),
# each multiplied by the width.
STEM_CHANNELS = 16
STAGE_CHANNELS = (8, 12, 16, 20)
HEAD_CHANNELS = 32
STAGE_BLOCKS = (2, 2, 4, 4)
STAGE_FREQUENCY_STRIDES = (1, 2, 2, 1)
STAGE_DILATIONS = (1, 2, 4, 8)
SUB_BANDS = 5
# The paper's spatial dropout inside every block; the network is too small for
# the recipe's dropout_rate of 0.5, which does not apply.
BLOCK_DROPOUT = 0.1
HEAD_KERNEL = 5


class FrequencyStridedDepthwiseConv2D(layers.DepthwiseConv2D):
    """A (1, k) depthwise convolution strided along frequency only, as
    DepthwiseConv2D((1, k), strides=(1, s), padding="same") computes it.

    TensorFlow's CPU depthwise kernel refuses unequal strides unless oneDNN
    runs it (CPUs with AVX-512), so the stride is taken by computing every
    position ("same" padding placed as TensorFlow places it for stride s) and
    keeping every s-th: the same weights and outputs on every CPU, GPU and in
    TFLite (a plain depthwise convolution and a strided slice).
    """

    def __init__(self, kernel_width: int, frequency_stride: int, **kwargs):
        super().__init__((1, kernel_width), padding="valid", use_bias=False, **kwargs)
        self.kernel_width = kernel_width
        self.frequency_stride = frequency_stride

    def _padding(self, bins: int) -> tuple[int, int]:
        """TensorFlow's "same" padding of `bins` for this kernel and stride."""
        out = -(-bins // self.frequency_stride)
        total = max((out - 1) * self.frequency_stride + self.kernel_width - bins, 0)
        return total // 2, total - total // 2

    def call(self, inputs):
        before, after = self._padding(inputs.shape[2])
        padded = keras.ops.pad(inputs, [[0, 0], [0, 0], [before, after], [0, 0]])
        return super().call(padded)[:, :, :: self.frequency_stride, :]

    def compute_output_shape(self, input_shape):
        bins = input_shape[2]
        return (*input_shape[:2], None if bins is None else -(-bins // self.frequency_stride), input_shape[3])

    def get_config(self):
        config = super().get_config()
        for key in ("kernel_size", "strides", "padding", "use_bias"):
            config.pop(key, None)
        return {**config, "kernel_width": self.kernel_width, "frequency_stride": self.frequency_stride}


class SubSpectralNorm(layers.Layer):
    """Batch normalisation with statistics, scale and offset per frequency
    sub-band and channel (Chang et al. 2021, "Subspectral Normalization").

    The frequency axis (axis 2 of [batch, time, frequency, channels]) is cut
    into `sub_bands` contiguous bands of nearly equal size (exactly equal
    when they divide it; at most one band per bin, so any input size works).
    At inference the layer is one multiply and one add by per-bin constants
    folded from the moving statistics, which every export (frozen graph,
    TFLite, int8) takes as it is.
    """

    def __init__(self, sub_bands: int = SUB_BANDS, momentum: float = BN_MOMENTUM, epsilon: float = 1e-3, **kwargs):
        super().__init__(**kwargs)
        self.sub_bands = sub_bands
        self.momentum = momentum
        self.epsilon = epsilon

    def build(self, input_shape):
        bins, channels = input_shape[2], input_shape[3]
        bands = min(self.sub_bands, bins)
        band_of_bin = (np.arange(bins) * bands) // bins
        # [bins, bands]: a bin's row picks its band; its transpose sums bins into bands.
        self.band_matrix = np.eye(bands, dtype="float32")[band_of_bin]
        self.bins_per_band = self.band_matrix.sum(axis=0)[:, None]
        shape = (bands, channels)
        self.gamma = self.add_weight(shape=shape, initializer="ones", name="gamma")
        self.beta = self.add_weight(shape=shape, initializer="zeros", name="beta")
        self.moving_mean = self.add_weight(shape=shape, initializer="zeros", trainable=False, name="moving_mean")
        self.moving_variance = self.add_weight(shape=shape, initializer="ones", trainable=False, name="moving_variance")

    def band_statistics(self, inputs):
        """Mean and (biased) variance of each band and channel over batch, time and the band's bins."""
        ops = keras.ops
        band_matrix = ops.convert_to_tensor(self.band_matrix)
        frames = ops.cast(ops.shape(inputs)[0] * ops.shape(inputs)[1], inputs.dtype)
        count = frames * ops.convert_to_tensor(self.bins_per_band)
        mean = ops.matmul(ops.transpose(band_matrix), ops.sum(inputs, axis=(0, 1))) / count
        centred = inputs - ops.matmul(band_matrix, mean)
        variance = ops.matmul(ops.transpose(band_matrix), ops.sum(ops.square(centred), axis=(0, 1))) / count
        return mean, variance

    def call(self, inputs, training=None):
        ops = keras.ops
        if training:
            mean, variance = self.band_statistics(inputs)
            self.moving_mean.assign(self.momentum * self.moving_mean + (1 - self.momentum) * mean)
            self.moving_variance.assign(self.momentum * self.moving_variance + (1 - self.momentum) * variance)
        else:
            mean, variance = self.moving_mean, self.moving_variance
        scale = self.gamma * ops.rsqrt(variance + self.epsilon)
        offset = self.beta - mean * scale
        band_matrix = ops.convert_to_tensor(self.band_matrix)
        return inputs * ops.matmul(band_matrix, scale) + ops.matmul(band_matrix, offset)

    def get_config(self):
        return {**super().get_config(), "sub_bands": self.sub_bands, "momentum": self.momentum,
                "epsilon": self.epsilon}


def _broadcasted_block(x, channels: int, frequency_stride: int, dilation: int, name: str):
    """One BC-ResBlock; a transition block (the first of a stage: new channel
    count, or a frequency stride) starts with a 1x1 convolution and has no
    identity shortcut."""
    transition = x.shape[-1] != channels or frequency_stride != 1
    shortcut = x
    if transition:
        x = layers.Conv2D(channels, 1, use_bias=False, name=f"{name}_expand")(x)
        x = layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"{name}_expand_bn")(x)
        x = layers.ReLU(name=f"{name}_expand_relu")(x)
    x = FrequencyStridedDepthwiseConv2D(3, frequency_stride, name=f"{name}_freq_dw")(x)
    two_d = SubSpectralNorm(name=f"{name}_ssn")(x)
    x = layers.AveragePooling2D((1, two_d.shape[2]), name=f"{name}_freq_mean")(two_d)
    x = layers.DepthwiseConv2D((3, 1), dilation_rate=(dilation, 1), padding="same", use_bias=False,
                               name=f"{name}_time_dw")(x)
    x = layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"{name}_time_bn")(x)
    x = layers.Activation("swish", name=f"{name}_swish")(x)
    x = layers.Conv2D(channels, 1, use_bias=False, name=f"{name}_pw")(x)
    x = layers.SpatialDropout2D(BLOCK_DROPOUT, name=f"{name}_dropout")(x)
    x = layers.Add(name=f"{name}_broadcast_add")([x, two_d])
    if not transition:
        x = layers.Add(name=f"{name}_residual_add")([x, shortcut])
    return layers.ReLU(name=f"{name}_relu")(x)


def build_bc_resnet(input_shape, label_count: int, dropout_rate: float, width: float = 1.0) -> keras.Model:
    """BC-ResNet-`width` (the paper's BC-ResNet-1, -1.5, -2, -3, -6, -8):
    a 5x5 stem strided 2 in frequency, four stages of 2, 2, 4, 4 broadcasted
    residual blocks (stages 2 and 3 stride 2 in frequency, temporal dilations
    1, 2, 4, 8), and a head: depthwise 5x5 convolution (all of a small
    frequency axis, unpadded), 1x1 convolution, mean over time and frequency
    (`time_pool`), linear classifier.

    Defined on 40 log-mel bins (frequency 40 -> 20 -> 10 -> 5); on other
    sizes the strides use "same" padding and SubSpectralNorm cuts whatever
    is left into at most 5 bands. `dropout_rate` does not apply (the paper's
    0.1 spatial dropout in each block does).
    """
    inputs = fingerprint_input(input_shape)
    stem_channels = scaled_channels(STEM_CHANNELS, width)
    x = layers.Conv2D(stem_channels, 5, strides=(1, 2), padding="same", use_bias=False, name="stem")(inputs)
    x = layers.BatchNormalization(momentum=BN_MOMENTUM, name="stem_bn")(x)
    x = layers.ReLU(name="stem_relu")(x)
    stages = zip(STAGE_CHANNELS, STAGE_BLOCKS, STAGE_FREQUENCY_STRIDES, STAGE_DILATIONS, strict=True)
    for stage, (stage_channels, blocks, frequency_stride, dilation) in enumerate(stages, start=1):
        channels = scaled_channels(stage_channels, width)
        for block in range(blocks):
            x = _broadcasted_block(x, channels, frequency_stride if block == 0 else 1, dilation,
                                   name=f"stage{stage}_block{block + 1}")
    half = HEAD_KERNEL // 2
    x = layers.ZeroPadding2D(((half, half), (0, 0)), name="head_time_pad")(x)
    x = layers.DepthwiseConv2D((HEAD_KERNEL, min(HEAD_KERNEL, x.shape[2])), use_bias=False, name="head_dw")(x)
    x = layers.Conv2D(scaled_channels(HEAD_CHANNELS, width), 1, use_bias=False, name="head_pw")(x)
    x = layers.BatchNormalization(momentum=BN_MOMENTUM, name="head_bn")(x)
    x = layers.ReLU(name="head_relu")(x)
    outputs = time_pooled_logits(x, label_count)
    return keras.Model(inputs, outputs, name="bc_resnet")
