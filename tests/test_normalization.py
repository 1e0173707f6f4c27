"""Feature normalisation inside the model: clip (mean and variance over time) and dataset
(training statistics in the weights), on real log-mel features, through training and every export."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from speechclas import architectures, export
from speechclas.audio import decode_audio, fix_length, place_in_window
from speechclas.config import load_param_specs
from speechclas.detect import load_scorer
from speechclas.features import compute_features, feature_settings, settings_from_config
from speechclas.normalization import (
    LAYER_NAME,
    NORMALIZATION_CHOICES,
    DatasetNormalization,
    normalization_mode,
    with_feature_normalization,
)
from speechclas.predict import Predictor
from speechclas.train import restore_model, train
from tests import test_train
from tests.test_export import assert_model_json_matches_the_interpreter

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "data" / "demo"
RATE = 16000


def logmel_settings():
    return feature_settings(RATE, 1000, 30.0, 10.0, 40, "logmel")


def noisy_demo_clips(count: int = 4) -> np.ndarray:
    """Demo words centred in one second with the demo background noise under them, as training
    mixes it: every frame has a noise floor, as a real recording has (no digital silence)."""
    noise = decode_audio(min((DEMO / "_background_noise_").glob("*.wav")), RATE).samples
    clips = []
    for number, word in enumerate(("yes", "no", "up", "down")[:count]):
        speech = fix_length(decode_audio(min((DEMO / word).glob("*.wav")), RATE).samples, RATE)
        clips.append(speech + 0.05 * noise[number * RATE : (number + 1) * RATE])
    return np.stack(clips).astype(np.float32)


def features_of(audio: np.ndarray) -> np.ndarray:
    return compute_features(tf.constant(audio), logmel_settings()).numpy()


def ds_cnn(mode: str, training_features=None):
    model = architectures.build_model("ds_cnn", logmel_settings().input_shape, 4, 0.5)
    return with_feature_normalization(model, mode, training_features)


def normalized(model, features: np.ndarray) -> np.ndarray:
    """The output of the model's normalisation layer."""
    return model.get_layer(LAYER_NAME)(tf.constant(features)).numpy()


def test_choices_agree_with_config_yaml():
    spec = load_param_specs()["feature_normalization"]
    assert spec.choices == NORMALIZATION_CHOICES and spec.default == "none"


def test_none_is_the_model_itself_and_other_modes_keep_its_layer_names():
    model = architectures.build_model("ds_cnn", logmel_settings().input_shape, 4, 0.5)
    assert with_feature_normalization(model, "none") is model
    names = [layer.name for layer in model.layers]
    for mode in ("clip", "dataset"):
        wrapped = with_feature_normalization(model, mode)
        assert [layer.name for layer in wrapped.layers] == [names[0], LAYER_NAME, *names[1:]]
        assert wrapped.input_shape == model.input_shape and wrapped.output_shape == model.output_shape
        assert normalization_mode(wrapped) == mode
    assert normalization_mode(model) == "none"
    with pytest.raises(ValueError, match="feature_normalization"):
        with_feature_normalization(model, "speaker")


def test_clip_normalisation_gives_each_bin_zero_mean_and_unit_variance_over_time():
    features = features_of(noisy_demo_clips())
    result = normalized(ds_cnn("clip"), features)
    np.testing.assert_allclose(result.mean(axis=1), 0, atol=1e-4)
    # sqrt(variance + 1e-3) divides: a bin of variance v ends at v / (v + 1e-3), here above 0.99.
    np.testing.assert_allclose(result.var(axis=1), 1, atol=1e-2)
    assert features.var(axis=1).min() > 0.1  # the raw bins were far from it


def test_clip_normalisation_makes_the_model_deaf_to_gain():
    """Four times louder adds log(16) to every log-mel cell; clip normalisation removes it."""
    audio = noisy_demo_clips()
    quiet, loud = features_of(audio), features_of(4 * audio)
    np.testing.assert_allclose(loud - quiet, np.log(16), atol=0.02)
    model = ds_cnn("clip")
    # Not exactly: the log's 1e-6 offset weighs a little in the faintest (highest) bands.
    np.testing.assert_allclose(normalized(model, loud), normalized(model, quiet), atol=1e-2)
    # A network whose answer moves with its input (an untrained ds_cnn answers about 0 to all);
    # seeded, as one random initialisation in six moved it by less than 0.1.
    tf.keras.utils.set_random_seed(1)  # moves the answer by 0.79; clip normalisation leaves 2e-4
    linear = architectures.build_model("single_fc", logmel_settings().input_shape, 4, 0.5)
    plain = tf.nn.softmax(linear(loud)) - tf.nn.softmax(linear(quiet))
    with_clip = with_feature_normalization(linear, "clip")
    normalised = tf.nn.softmax(with_clip(loud)) - tf.nn.softmax(with_clip(quiet))
    assert np.abs(plain).max() > 0.1
    np.testing.assert_allclose(normalised, 0, atol=2e-3)


def test_dataset_normalisation_keeps_the_training_statistics_through_a_checkpoint(tmp_path):
    training = features_of(noisy_demo_clips())
    model = ds_cnn("dataset", training)
    layer = model.get_layer(LAYER_NAME)
    assert isinstance(layer, DatasetNormalization) and not layer.trainable_weights
    np.testing.assert_allclose(layer.mean.numpy()[:, 0], training.mean(axis=(0, 1, 3)), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(layer.variance.numpy()[:, 0], training.var(axis=(0, 1, 3)), rtol=1e-4)
    result = normalized(model, training)
    np.testing.assert_allclose(result.mean(axis=(0, 1, 3)), 0, atol=1e-4)
    np.testing.assert_allclose(result.var(axis=(0, 1, 3)), 1, atol=1e-2)

    saved = tf.train.Checkpoint(model=model).save(str(tmp_path / "ckpt"))
    rebuilt = ds_cnn("dataset")  # as restore_model builds it: no statistics yet
    assert not np.allclose(rebuilt.get_layer(LAYER_NAME).mean.numpy(), layer.mean.numpy())
    tf.train.Checkpoint(model=rebuilt).restore(saved).assert_existing_objects_matched()
    np.testing.assert_array_equal(rebuilt.get_layer(LAYER_NAME).mean.numpy(), layer.mean.numpy())
    np.testing.assert_array_equal(rebuilt.get_layer(LAYER_NAME).variance.numpy(), layer.variance.numpy())
    np.testing.assert_allclose(rebuilt(training, training=False), model(training, training=False), atol=1e-6)


def assert_exports_agree(run, config, wav_path: Path) -> np.ndarray:
    """SavedModel, frozen graph, float TFLite, the Predictor and detection's scorer within 1e-4
    of the restored Keras model; the int8 model, fed the features before normalisation, within 0.05."""
    settings = settings_from_config(config)
    wav_bytes = wav_path.read_bytes()
    samples = place_in_window(decode_audio(wav_bytes, settings.sample_rate).samples, settings.desired_samples)[0]
    features = compute_features(tf.constant(samples[None, :]), settings).numpy()
    reference = tf.nn.softmax(restore_model(run, config)(features, training=False)).numpy()[0]
    saved = tf.saved_model.load(str(run.saved_model_dir))
    exported = {
        "serving_default": saved.signatures["serving_default"](wav_data=tf.constant(wav_bytes)),
        "audio": saved.signatures["audio"](audio=tf.constant(samples[None, :])),
        "features": saved.signatures["features"](features=tf.constant(features)),
    }
    for name, outputs in exported.items():
        np.testing.assert_allclose(outputs["labels_softmax"].numpy()[0], reference, atol=1e-4, err_msg=name)
    np.testing.assert_allclose(export.run_frozen_graph(run.frozen_graph_path, wav_bytes), reference, atol=1e-4)
    np.testing.assert_allclose(export.run_tflite(run.tflite_path, samples), reference, atol=1e-4)
    np.testing.assert_allclose(Predictor.load(run).probabilities(samples), reference, atol=1e-4)
    scorer = load_scorer(run)  # detection: a stream's frames once, each window normalised inside the model
    np.testing.assert_allclose(scorer.score(scorer.frames(samples)[None])[0], reference, atol=1e-4)
    np.testing.assert_allclose(export.run_tflite(run.int8_tflite_path, features), reference, atol=0.05)
    return reference


@pytest.mark.parametrize("mode", ["clip", "dataset"])
def test_logmel_with_normalisation_trains_and_every_export_agrees(mode, toy_data, tmp_path):
    config = test_train.toy_config(toy_data, tmp_path, model_architecture="ds_cnn", preprocess="logmel",
                                   feature_normalization=mode)
    run = train(config, progress=False).run
    description = assert_model_json_matches_the_interpreter(run)
    assert description["features"]["preprocess"] == "logmel"
    assert description["features"]["feature_normalization"] == mode
    assert description["features"]["logmel"]["upper_edge_hertz"] == 7600.0
    assert description["exports"]["model.tflite"]["takes"] == "audio"
    assert description["exports"]["model_int8.tflite"]["takes"] == "features"
    assert_exports_agree(run, config, sorted((toy_data / "yes").iterdir())[0])
    if mode == "dataset":  # measured on training features before the first step, then kept in the checkpoint
        checkpoint = tf.train.latest_checkpoint(str(run.ckpts))
        stored = {name: tf.train.load_variable(checkpoint, name) for name, _ in tf.train.list_variables(checkpoint)
                  if name.endswith("/mean/.ATTRIBUTES/VARIABLE_VALUE")}
        assert len(stored) == 1
        mean = next(iter(stored.values()))
        assert mean.shape == (40, 1) and np.all(mean < 0) and mean.std() > 0.1  # log-mel of quiet clips
        restored = restore_model(run, config).get_layer(LAYER_NAME)
        np.testing.assert_array_equal(restored.mean.numpy(), mean)
        assert json.loads(run.conf_path.read_text())["model_settings"]["feature_normalization"] == "dataset"
