"""The architecture table: every network builds for the recipe's input and for
small ones, widths scale, sub-spectral normalisation normalises per band, and
config.yaml and README list the same names."""

import re
from pathlib import Path

import keras
import numpy as np
import pytest

from speechclas import architectures
from speechclas.architectures.bc_resnet import FrequencyStridedDepthwiseConv2D, SubSpectralNorm
from speechclas.config import load_param_specs

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SHAPE = (98, 40, 1)  # 1 s, 10 ms stride, 40 MFCCs
LABELS = 12
WIDTH_SCALED = [name for name, entry in architectures.ARCHITECTURES.items() if entry.scales_with_width]
# preprocess=micro with a 20 ms stride; preprocess=average (257 FFT bins in 43 averages); a 100 ms clip
OTHER_SHAPES = [(49, 40, 1), (98, 43, 1), (8, 8, 1)]
# only for the new networks, which must take any input features.py can make
TINY_SHAPES = [(1, 1, 1), (3, 2, 1), (13, 7, 1), (8, 80, 1)]


def trainable_count(model: keras.Model) -> int:
    return sum(int(np.prod(weight.shape)) for weight in model.trainable_weights)


def assert_logits_for(model: keras.Model, shape) -> None:
    features = np.random.default_rng(0).normal(size=(2, *shape)).astype("float32")
    for training in (True, False):
        logits = np.asarray(model(features, training=training))
        assert logits.shape == (2, LABELS)
        assert np.isfinite(logits).all()


@pytest.mark.parametrize("name", list(architectures.ARCHITECTURES))
def test_every_architecture_builds_for_the_recipe_and_smaller_inputs(name):
    for shape in [DEFAULT_SHAPE, *OTHER_SHAPES, *(TINY_SHAPES if name in WIDTH_SCALED else [])]:
        model = architectures.build_model(name, shape, LABELS, dropout_rate=0.5)
        assert model.input_shape == (None, *shape)
        assert_logits_for(model, shape)


@pytest.mark.parametrize("name", WIDTH_SCALED + ["ds_cnn"])
def test_time_pool_feeds_a_head_that_acts_on_the_pooled_vector(name):
    """Detection runs the layers before `time_pool` over a stream once: they must take any
    number of frames, and the logits must be the head applied to the pooled vector."""
    model = architectures.build_model(name, (None, 40, 1), LABELS, dropout_rate=0.5)
    features = np.random.default_rng(1).normal(size=(3, 98, 40, 1)).astype("float32")
    trunk = keras.Model(model.input, model.get_layer("time_pool").input)
    frames = np.asarray(trunk(features, training=False))
    assert frames.shape[0] == 3 and frames.ndim == 4
    pooled = frames.mean(axis=(1, 2))
    head = model.layers[model.layers.index(model.get_layer("time_pool")) + 1:]
    assert [layer.name for layer in head] == ["logits"]
    np.testing.assert_allclose(np.asarray(head[0](pooled)), np.asarray(model(features, training=False)), atol=1e-5)
    longer = np.concatenate([features, features], axis=1)
    assert np.asarray(trunk(longer, training=False)).shape[1] > frames.shape[1]


def test_bc_resnet_1_has_the_papers_parameter_count_and_widths_scale_it():
    # Kim et al. 2021, BC-ResNet-1 9.2k parameters (12 classes), -1.5 17.1k, -2 27.3k, -3 54.2k, -6 188k, -8 321k.
    paper = {1.0: 9_200, 1.5: 17_100, 2.0: 27_300, 3.0: 54_200, 6.0: 188_000, 8.0: 321_000}
    for width, expected in paper.items():
        model = architectures.build_model("bc_resnet", DEFAULT_SHAPE, LABELS, 0.5, width=width)
        assert abs(trainable_count(model) - expected) < 0.02 * expected, (width, trainable_count(model))


def test_tc_resnet8_has_the_papers_parameter_counts():
    # Choi et al. 2019, Table 1: TC-ResNet8 66k, TC-ResNet8-1.5 145k.
    for width, expected in {1.0: 66_000, 1.5: 145_000}.items():
        model = architectures.build_model("tc_resnet8", DEFAULT_SHAPE, LABELS, 0.5, width=width)
        assert abs(trainable_count(model) - expected) < 0.03 * expected, (width, trainable_count(model))


@pytest.mark.parametrize("name", WIDTH_SCALED)
def test_width_scales_the_parameters(name):
    counts = [architectures.build_model(name, DEFAULT_SHAPE, LABELS, 0.5, width=width).count_params()
              for width in (0.25, 0.5, 1.0, 2.0)]
    assert counts == sorted(counts) and len(set(counts)) == len(counts)
    assert counts[-1] > 2 * counts[2]  # more than linear in the width: 1x1 convolutions are quadratic


def test_width_is_ignored_with_a_warning_by_the_networks_of_one_size(caplog):
    with caplog.at_level("WARNING", logger="speechclas.architectures"):
        wide = architectures.build_model("ds_cnn", DEFAULT_SHAPE, LABELS, 0.5, width=2.0)
    assert wide.count_params() == architectures.build_model("ds_cnn", DEFAULT_SHAPE, LABELS, 0.5).count_params()
    assert "model_width=2 does not apply to ds_cnn" in caplog.text


def test_unknown_architecture_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="unknown model_architecture 'resnet50'.*bc_resnet"):
        architectures.build_model("resnet50", DEFAULT_SHAPE, LABELS, 0.5)


def per_band_reference(features: np.ndarray, bands: list[slice], epsilon: float) -> np.ndarray:
    out = np.empty_like(features)
    for band in bands:
        values = features[:, :, band, :]
        mean = values.mean(axis=(0, 1, 2), keepdims=True)
        variance = values.var(axis=(0, 1, 2), keepdims=True)
        out[:, :, band, :] = (values - mean) / np.sqrt(variance + epsilon)
    return out


@pytest.mark.parametrize("bins, bands", [
    (10, [slice(0, 2), slice(2, 4), slice(4, 6), slice(6, 8), slice(8, 10)]),
    (7, [slice(0, 2), slice(2, 3), slice(3, 5), slice(5, 6), slice(6, 7)]),  # 5 bands do not divide 7
    (3, [slice(0, 1), slice(1, 2), slice(2, 3)]),  # fewer bins than bands: one band per bin
])
def test_sub_spectral_norm_normalises_each_band_on_its_own(bins, bands):
    rng = np.random.default_rng(2)
    # Each bin and channel has its own offset and spread, so statistics over the whole
    # frequency axis (plain batch norm) would leave the bands far from zero mean and unit variance.
    offsets = rng.uniform(-20, 20, size=(1, 1, bins, 2))
    spreads = rng.uniform(0.5, 5, size=(1, 1, bins, 2))
    features = (offsets + spreads * rng.normal(size=(4, 6, bins, 2))).astype("float32")
    layer = SubSpectralNorm(momentum=0.5)
    trained = np.asarray(layer(features, training=True))
    np.testing.assert_allclose(trained, per_band_reference(features, bands, layer.epsilon), atol=1e-4)
    assert np.asarray(layer.moving_mean).shape == (len(bands), 2)
    for _ in range(30):  # the moving statistics converge to this batch's
        layer(features, training=True)
    np.testing.assert_allclose(np.asarray(layer(features, training=False)), trained, atol=1e-3)


def test_config_choices_are_the_architecture_table():
    choices = load_param_specs()["model_architecture"].choices
    assert list(choices) == list(architectures.ARCHITECTURES)


def test_readme_table_lists_every_architecture_with_its_description_and_parameters():
    """README's table in Training: `| `name` | description | parameters |` with the
    parameter count for the default 98x40 MFCC input and 12 classes, width 1."""
    readme = (ROOT / "README.md").read_text()
    readme = readme[readme.index("Architectures (`model_architecture`)"):]
    readme = readme[:readme.index("\n### ")]
    rows = {
        match["name"]: (match["what"], int(match["count"].replace(",", "")))
        for match in re.finditer(r"^\| `(?P<name>\w+)`[^|]*\| (?P<what>[^|]+) \| (?P<count>[\d,]+) \|$", readme, re.M)
    }
    assert set(rows) >= set(architectures.ARCHITECTURES)
    for name, entry in architectures.ARCHITECTURES.items():
        parameters = architectures.build_model(name, DEFAULT_SHAPE, LABELS, 0.5).count_params()
        assert rows[name] == (entry.description, parameters), name


@pytest.mark.parametrize("bins, stride", [(40, 2), (21, 2), (5, 2), (20, 1)])
def test_frequency_strided_depthwise_is_tensorflows_same_padded_strided_convolution(bins, stride):
    """bc_resnet strides along frequency only; TensorFlow's CPU depthwise kernel refuses unequal strides
    without oneDNN, so the layer computes every position and keeps every stride-th. Reference: TensorFlow's
    own "same" strided convolution with the stride on both axes (a (1, 3) kernel needs no time padding),
    whose rows are every stride-th of the layer's."""
    import tensorflow as tf

    features = np.random.default_rng(3).normal(size=(2, 7, bins, 3)).astype("float32")
    layer = FrequencyStridedDepthwiseConv2D(3, stride)
    out = np.asarray(layer(features))
    expected = tf.nn.depthwise_conv2d(features, layer.kernel, strides=[1, stride, stride, 1], padding="SAME").numpy()
    assert out.shape == (2, 7, -(-bins // stride), 3)
    np.testing.assert_allclose(out[:, ::stride], expected, atol=1e-5)
