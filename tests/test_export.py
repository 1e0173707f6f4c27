"""Exports for devices: preprocess=micro, the int8 TFLite model, model.json and
the test accuracy of every export, on one short training on the demo data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from ai_edge_litert.interpreter import Interpreter

from speechclas import export
from speechclas.audio import decode_audio, place_in_window
from speechclas.config import load_config
from speechclas.features import compute_features, settings_from_config
from speechclas.predict import Predictor
from speechclas.rundir import RunDir
from speechclas.train import restore_model, train

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "data" / "demo"
EXPORT_NAMES = {"saved_model", "model.pb", "model.tflite", "model_int8.tflite"}


def micro_config(models_dir: Path):
    """ds_cnn on the micro frontend, 300 steps. 40 % of the speakers are
    held out for the test, so the split has 156 clips and one clip weighs
    0.6 points (at the default 10 % it has 36, and one clip that quantisation
    flips is nearly 3 points). ds_cnn, the architecture meant for
    microcontrollers: its int8 accuracy equalled float's on 5 seeds, where
    tiny_conv's fell by 0 to 3 clips (up to 1.9 points), too near the bound."""
    return load_config({
        "data_dir": str(DEMO), "models_dir": str(models_dir), "model_architecture": "ds_cnn",
        "preprocess": "micro", "window_stride_ms": 20,
        "how_many_training_steps": "250,50", "learning_rate": "0.003,0.0005", "batch_size": 50,
        "validation_percentage": 10, "testing_percentage": 40,
        "eval_step_interval": 300, "save_step_interval": 300,
    })


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory):
    config = micro_config(tmp_path_factory.mktemp("micro") / "models")
    return config, train(config, progress=False)


def assert_model_json_matches_the_interpreter(run: RunDir) -> dict:
    """Every TFLite entry of model.json is what LiteRT's interpreter reports."""
    description = json.loads(run.model_json_path.read_text())
    assert set(description["exports"]) == EXPORT_NAMES
    for name in ("model.tflite", "model_int8.tflite"):
        entry = description["exports"][name]
        interpreter = Interpreter(model_path=str(run.ckpts / entry["file"]))
        for described, details in ((entry["inputs"], interpreter.get_input_details()),
                                   (entry["outputs"], interpreter.get_output_details())):
            assert len(described) == len(details) == 1
            assert described[0]["name"] == details[0]["name"]
            assert described[0]["shape"] == details[0]["shape"].tolist()
            assert described[0]["dtype"] == np.dtype(details[0]["dtype"]).name
            scale, zero_point = details[0]["quantization"]
            if name == "model_int8.tflite":
                assert described[0]["dtype"] == "int8"
                assert described[0]["quantization"] == {"scale": pytest.approx(scale), "zero_point": zero_point}
            else:
                assert "quantization" not in described[0]
        assert entry["signatures"] == interpreter.get_signature_list()
    features = description["features"]
    int8_input = description["exports"]["model_int8.tflite"]["inputs"][0]
    assert int8_input["shape"] == [1, features["frames"], features["fingerprint_width"], 1]
    assert description["exports"]["model_int8.tflite"]["outputs"][0]["shape"] == [1, len(description["labels"])]
    assert description["labels"] == run.labels()
    return description


def test_micro_trains_and_every_export_is_described(micro_run):
    config, result = micro_run
    run = result.run
    assert run.is_finished() and run.int8_tflite_path.is_file()
    description = assert_model_json_matches_the_interpreter(run)
    features = description["features"]
    assert features["preprocess"] == "micro"
    assert (features["frames"], features["fingerprint_width"]) == (49, 40)
    assert features["micro_frontend"]["window_size"] == 30 and features["micro_frontend"]["window_step"] == 20
    # The micro frontend cannot go into a model LiteRT runs: model.tflite takes features too.
    assert description["exports"]["model.tflite"]["takes"] == "features"
    assert description["exports"]["model.tflite"]["inputs"][0]["dtype"] == "float32"
    signatures = description["exports"]["saved_model"]["signatures"]
    # ds_cnn has a time_pool layer: detection's shared trunk has its two signatures.
    assert set(signatures) == {"serving_default", "audio", "features", "stream_features", "stream_columns", "pooled"}
    assert signatures["stream_columns"]["inputs"] == [{"name": "frames", "shape": [None, None, 40], "dtype": "float32"}]
    assert description["exports"]["saved_model"]["shared_trunk"] == {"time_stride": 4, "window_columns": 13}
    assert signatures["audio"]["inputs"] == [{"name": "audio", "shape": [None, 16000], "dtype": "float32"}]


def test_int8_accuracy_is_within_two_points_of_float(micro_run):
    config, result = micro_run
    exports = json.loads(result.run.metrics_path.read_text())["exports"]
    assert set(exports) == EXPORT_NAMES
    for entry in exports.values():
        assert 0 <= entry["test_accuracy"] <= 1 and entry["bytes"] > 0
    test_accuracy = result.metrics["testing"]["accuracy"]
    # Measured 0.85 to 0.87 (5 seeds); chance is 1/12. The float exports score the model itself.
    assert test_accuracy > 0.4
    for name in ("saved_model", "model.pb", "model.tflite"):
        assert exports[name]["test_accuracy"] == pytest.approx(test_accuracy, abs=0.01), name
    assert abs(exports["model_int8.tflite"]["test_accuracy"] - exports["model.tflite"]["test_accuracy"]) <= 0.02
    # int8 weights: 47 KB against 98 KB for float (the flatbuffer adds a fixed part).
    assert exports["model_int8.tflite"]["bytes"] < 0.6 * exports["model.tflite"]["bytes"]


def test_micro_exports_agree_with_the_trained_model(micro_run):
    config, result = micro_run
    run = result.run
    settings = settings_from_config(config)
    wav_bytes = sorted((DEMO / "yes").iterdir())[0].read_bytes()
    samples = place_in_window(decode_audio(wav_bytes, settings.sample_rate).samples, settings.desired_samples)[0]
    features = compute_features(tf.constant(samples[None, :]), settings)
    reference = tf.nn.softmax(restore_model(run, config)(features, training=False)).numpy()[0]

    saved = tf.saved_model.load(str(run.saved_model_dir))
    from_wav = saved.signatures["serving_default"](wav_data=tf.constant(wav_bytes))["labels_softmax"].numpy()[0]
    from_audio = saved.signatures["audio"](audio=tf.constant(samples[None, :]))["labels_softmax"].numpy()[0]
    frozen = export.run_frozen_graph(run.frozen_graph_path, wav_bytes)
    tflite = export.run_tflite(run.tflite_path, features.numpy())
    for probabilities in (from_wav, from_audio, frozen, tflite):
        np.testing.assert_allclose(probabilities, reference, atol=1e-4)
    # int8 probabilities come in steps of 1/256.
    int8 = export.run_tflite(run.int8_tflite_path, features.numpy())
    np.testing.assert_allclose(int8, reference, atol=0.05)
    served = Predictor.load(run).probabilities(samples)
    np.testing.assert_allclose(served, reference, atol=1e-4)


def test_micro_takes_whole_milliseconds(tmp_path):
    config = load_config({"preprocess": "micro", "window_size_ms": 25.5, "data_dir": str(DEMO),
                          "models_dir": str(tmp_path)})
    with pytest.raises(ValueError, match="whole milliseconds"):
        settings_from_config(config)


def readme_int8_example() -> str:
    """The Python block of README's int8 example (between its markers)."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("<!-- int8-example:begin -->")[1].split("<!-- int8-example:end -->")[0]
    return section.split("```python\n")[1].split("```")[0]


def test_the_readme_int8_example_gives_the_int8_models_answer(micro_run, capsys):
    """README's example (model.json, the micro frontend op, quantise, LiteRT,
    dequantise), run on a trained micro run, answers what the int8 model
    answers on the features training computes, and the float model's label."""
    config, result = micro_run
    run = result.run
    wav = sorted((DEMO / "yes").iterdir())[0]
    code = readme_int8_example()
    assert code.count('"models/RUN/ckpts"') == 1 and code.count('"yes.wav"') == 1
    code = code.replace('"models/RUN/ckpts"', repr(str(run.ckpts))).replace('"yes.wav"', repr(str(wav)))
    namespace: dict = {}
    exec(compile(code, "README.md int8 example", "exec"), namespace)

    settings = settings_from_config(config)
    samples = place_in_window(decode_audio(wav.read_bytes(), settings.sample_rate).samples, settings.desired_samples)[0]
    features = compute_features(tf.constant(samples[None, :]), settings).numpy()
    int8 = export.run_tflite(run.int8_tflite_path, features)
    output_scale = json.loads(run.model_json_path.read_text())["exports"]["model_int8.tflite"]["outputs"][0][
        "quantization"]["scale"]
    np.testing.assert_allclose(namespace["probabilities"], int8, atol=output_scale * 1.01)
    float_probabilities = export.run_tflite(run.tflite_path, features)
    assert namespace["probabilities"].argmax() == float_probabilities.argmax()
    assert capsys.readouterr().out.split()[0] == run.labels()[int8.argmax()]


def test_pcen_exports_give_the_keras_models_probabilities(tmp_path):
    """preprocess=pcen inside every export (its smoother is one MatMul on a clip's
    frames): SavedModel, model.pb and the float TFLite model, which takes samples,
    answer what the Keras model answers on compute_features; model.json has the PCEN
    settings. No stream signatures (a pcen window is not a slice of a stream's frames):
    detection scores each window's audio. An untrained ds_cnn on 49 x 16 features: only agreement counts."""
    from speechclas import detect
    from speechclas.architectures import build_model
    from speechclas.features import feature_settings, pcen_options

    settings = feature_settings(16000, 1000, 30.0, 20.0, 16, "pcen")
    labels = ["_silence_", "_unknown_", "yes", "no"]
    keras_model = build_model("ds_cnn", settings.input_shape, len(labels), 0.0)
    run = RunDir(tmp_path / "run")
    run.make_folders()
    run.labels_path.write_text("\n".join(labels) + "\n")
    wavs = sorted((DEMO / "yes").iterdir())[:2]
    clips = np.stack([place_in_window(decode_audio(wav.read_bytes(), settings.sample_rate).samples,
                                      settings.desired_samples)[0] for wav in wavs])  # fmt: skip
    features = compute_features(tf.constant(clips), settings)
    export.export_all(export.InferenceModule(keras_model, settings), run, features.numpy())
    reference = tf.nn.softmax(keras_model(features, training=False)).numpy()

    description = json.loads(run.model_json_path.read_text())
    assert description["features"]["pcen"] == pcen_options(settings)
    assert description["exports"]["model.tflite"]["takes"] == "audio"
    assert set(description["exports"]["saved_model"]["signatures"]) == {"serving_default", "audio", "features"}
    saved = tf.saved_model.load(str(run.saved_model_dir))
    from_audio = saved.signatures["audio"](audio=tf.constant(clips))["labels_softmax"].numpy()
    np.testing.assert_allclose(from_audio, reference, atol=1e-5)
    for wav, clip, expected in zip(wavs, clips, reference, strict=True):
        from_wav = saved.signatures["serving_default"](wav_data=tf.constant(wav.read_bytes()))["labels_softmax"]
        frozen = export.run_frozen_graph(run.frozen_graph_path, wav.read_bytes())
        tflite = export.run_tflite(run.tflite_path, clip[None, :])
        for probabilities in (from_wav.numpy()[0], frozen, tflite):
            np.testing.assert_allclose(probabilities, expected, atol=1e-4)

    stream = np.concatenate([clips[0], clips[1]])  # two windows at a 1 s hop
    hop = detect.DetectSettings(hop_ms=1000.0)
    for scorer in (detect.load_scorer(run), detect.keras_scorer(keras_model, settings, labels)):
        assert isinstance(scorer, detect.AudioScorer)
        _, scored = detect.stream_scores(scorer, [stream], hop)
        np.testing.assert_allclose(scored, reference, atol=1e-5)
