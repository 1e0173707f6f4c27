"""Feature normalisation as the first layer of the model, so that every export carries it.

The models must recognise voices and channels they never heard: a quieter
microphone, another speaker's level or a telephone band shifts and tilts
log-spectral features. ``clip`` normalisation (cepstral mean and variance
normalisation) takes each clip's feature bins to zero mean and unit variance
over time, which removes such level and tilt; ``dataset`` normalisation
subtracts the mean and divides by the deviation of each bin over sample
training features, measured once before training and kept as non-trainable
weights (in checkpoints and exports). Both divide by sqrt(variance + epsilon),
a multiply by a reciprocal square root: RSQRT and MUL have int8 TFLite
kernels, DIV does not.

The int8 model takes the features before normalisation, as a device's
frontend computes them; the normalisation runs inside it.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import layers, ops

NORMALIZATION_CHOICES = ("none", "clip", "dataset")
LAYER_NAME = "feature_normalization"
# In squared feature units (log-mel: nats; MFCC: its coefficients): a bin that
# barely moves within a clip (digital silence) is not blown up to unit variance.
VARIANCE_EPSILON = 1e-3


class ClipNormalization(layers.Layer):
    """Each clip's bins to zero mean and unit variance over time (axis 1 of [batch, frames, bins, 1])."""

    def __init__(self, epsilon: float = VARIANCE_EPSILON, **kwargs):
        super().__init__(**kwargs)
        self.epsilon = epsilon

    def call(self, features):
        centred = features - ops.mean(features, axis=1, keepdims=True)
        variance = ops.mean(ops.square(centred), axis=1, keepdims=True)
        return centred * ops.rsqrt(variance + self.epsilon)

    def get_config(self):
        return {**super().get_config(), "epsilon": self.epsilon}


class DatasetNormalization(layers.Layer):
    """Each bin to the zero mean and unit variance it has over the training features.

    `mean` and `variance` are non-trainable weights of shape [bins, 1]: saved in
    checkpoints, restored with them, frozen into every export. `adapt` sets them.
    """

    def __init__(self, epsilon: float = VARIANCE_EPSILON, **kwargs):
        super().__init__(**kwargs)
        self.epsilon = epsilon

    def build(self, input_shape):
        bins = input_shape[-2]
        self.mean = self.add_weight(shape=(bins, 1), initializer="zeros", trainable=False, name="mean")
        self.variance = self.add_weight(shape=(bins, 1), initializer="ones", trainable=False, name="variance")

    def adapt(self, features: np.ndarray) -> None:
        """Per-bin statistics of `features` [examples, frames, bins, 1], over examples and frames."""
        values = np.asarray(features, np.float64)
        if values.ndim != 4 or len(values) == 0:
            raise ValueError(f"dataset normalisation needs features [examples, frames, bins, 1], got {values.shape}")
        self.mean.assign(values.mean(axis=(0, 1)).astype(np.float32))
        self.variance.assign(values.var(axis=(0, 1)).astype(np.float32))

    def call(self, features):
        return (features - self.mean) * ops.rsqrt(self.variance + self.epsilon)

    def get_config(self):
        return {**super().get_config(), "epsilon": self.epsilon}


def with_feature_normalization(
    model: keras.Model, mode: str, training_features: np.ndarray | None = None
) -> keras.Model:
    """`model` with the normalisation `mode` as its first layer; its input stays [frames, bins, 1].

    ``none`` answers `model` itself, so checkpoints of runs without normalisation
    restore. Otherwise the answer reuses `model`'s layers (same objects, same
    names, so e.g. ``time_pool`` is still found by name) behind one layer named
    ``feature_normalization``. ``dataset`` measures its statistics on
    `training_features`; without them (a model rebuilt to restore a checkpoint)
    they stay zero mean and unit variance until the checkpoint restores them.
    """
    if mode == "none":
        return model
    if mode == "clip":
        normalizer = ClipNormalization(name=LAYER_NAME)
    elif mode == "dataset":
        normalizer = DatasetNormalization(name=LAYER_NAME)
        normalizer.build(model.input_shape)
        if training_features is not None:
            normalizer.adapt(training_features)
    else:
        raise ValueError(f"unknown feature_normalization {mode!r}; choose one of {list(NORMALIZATION_CHOICES)}")
    inputs = keras.Input(shape=model.input_shape[1:], name=model.inputs[0].name)
    normalized = normalizer(inputs)

    def call_layer(layer, *args, **kwargs):
        args = tuple(normalized if arg is inputs else arg for arg in args)
        return layer(*args, **kwargs)

    return keras.models.clone_model(model, input_tensors=inputs, clone_function=lambda layer: layer,
                                    call_function=call_layer)


def normalization_mode(model: keras.Model) -> str:
    """The feature normalisation a model built by `with_feature_normalization` carries."""
    for layer in model.layers:
        if isinstance(layer, ClipNormalization):
            return "clip"
        if isinstance(layer, DatasetNormalization):
            return "dataset"
    return "none"
