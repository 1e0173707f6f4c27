"""Keyword-spotting networks, chosen by name from one table; one module per family.

Each builder takes the input shape (time frames, feature bins, 1), the number
of classes and the dropout rate (the width multiplier too, where the
family scales) and returns a Keras model that outputs logits. Networks that
average over time before their classifier name that pooling layer
`time_pool`, and the layers after it act on the pooled vector only, so
detection can run the rest once over a whole stream.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

import keras

from speechclas.architectures.bc_resnet import build_bc_resnet
from speechclas.architectures.ds_cnn import build_ds_cnn
from speechclas.architectures.matchboxnet import build_matchboxnet
from speechclas.architectures.speech_commands import (
    build_conv,
    build_low_latency_conv,
    build_low_latency_svdf,
    build_single_fc,
    build_tiny_conv,
    build_tiny_embedding_conv,
)
from speechclas.architectures.tc_resnet import build_tc_resnet8

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Architecture:
    """A builder, what it is in one line (README's architecture table), and
    whether it takes the width multiplier (model_width)."""

    build: Callable[..., keras.Model]
    description: str
    scales_with_width: bool = False


ARCHITECTURES: dict[str, Architecture] = {
    "conv": Architecture(build_conv, "cnn-trad-fpool3, Sainath & Parada 2015"),
    "low_latency_conv": Architecture(build_low_latency_conv, "cnn-one-fstride4"),
    "low_latency_svdf": Architecture(build_low_latency_svdf, "rank-2 SVDF, non-streaming form"),
    "single_fc": Architecture(build_single_fc, "one dense layer (a baseline)"),
    "tiny_conv": Architecture(build_tiny_conv, "one strided 8-filter convolution"),
    "tiny_embedding_conv": Architecture(build_tiny_embedding_conv, "tiny_conv with a second strided convolution"),
    "ds_cnn": Architecture(build_ds_cnn, 'DS-CNN-S, Zhang et al. 2017 ("Hello Edge")'),
    "bc_resnet": Architecture(
        build_bc_resnet,
        'BC-ResNet-w with sub-spectral normalisation, Kim et al. 2021 ("Broadcasted Residual Learning")',
        scales_with_width=True,
    ),
    "tc_resnet8": Architecture(
        build_tc_resnet8, 'TC-ResNet8, Choi et al. 2019 ("Temporal Convolution for Real-time KWS")',
        scales_with_width=True,
    ),
    "matchboxnet": Architecture(
        build_matchboxnet, "MatchboxNet 3x1x64, Majumdar & Ginsburg 2020 (time-channel separable 1-D convolutions)",
        scales_with_width=True,
    ),
}


def build_model(name: str, input_shape, label_count: int, dropout_rate: float, width: float = 1.0) -> keras.Model:
    """The named network for this input shape and label count; `width`
    multiplies the channels of the architectures that scale (model_width)."""
    try:
        architecture = ARCHITECTURES[name]
    except KeyError:
        raise ValueError(f"unknown model_architecture {name!r}; choose one of {sorted(ARCHITECTURES)}") from None
    if architecture.scales_with_width:
        return architecture.build(tuple(input_shape), label_count, dropout_rate, width=width)
    if width != 1.0:
        logger.warning("model_width=%g does not apply to %s; building it at its only size", width, name)
    return architecture.build(tuple(input_shape), label_count, dropout_rate)
