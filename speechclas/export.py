"""Inference functions (audio in, softmax out) and their exports.

Feature extraction is inside every export, so a deployed model takes raw
audio: the frozen ``model.pb`` takes a whole wav file's bytes as
``wav_data:0`` (or decoded samples as ``decoded_sample_data:0``) and answers
``labels_softmax:0``, as TF's label_wav.py and the Android demo expect; the
TFLite model takes one clip of float samples; the SavedModel serves both.
"""

from __future__ import annotations

import logging
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

from speechclas.features import FeatureSettings, compute_features

logger = logging.getLogger(__name__)

WAV_INPUT = "wav_data"
DECODED_INPUT = "decoded_sample_data"
SOFTMAX_OUTPUT = "labels_softmax"
AUDIO_SIGNATURE = "audio"
# Detection in long audio (speechclas.detect): features of a stream once, then windows of them.
STREAM_FEATURES_SIGNATURE = "stream_features"
FEATURES_SIGNATURE = "features"


class InferenceModule(tf.Module):
    """The trained network with its feature extraction in front."""

    def __init__(self, model: keras.Model, settings: FeatureSettings):
        super().__init__(name="speechclas")
        self.model = model
        self.settings = settings
        samples = settings.desired_samples
        self.from_audio = tf.function(
            self._from_audio, input_signature=[tf.TensorSpec([None, samples], tf.float32, name="audio")]
        )
        self.from_wav = tf.function(self._from_wav, input_signature=[tf.TensorSpec([], tf.string, name=WAV_INPUT)])
        frames, bins = settings.spectrogram_length, settings.fingerprint_width
        self.from_features = tf.function(
            self._from_features, input_signature=[tf.TensorSpec([None, frames, bins], tf.float32, name="features")]
        )
        self.stream_features = tf.function(
            self._stream_features, input_signature=[tf.TensorSpec([None], tf.float32, name="samples")]
        )

    def _probabilities(self, audio: tf.Tensor) -> tf.Tensor:
        logits = self.model(compute_features(audio, self.settings), training=False)
        return tf.nn.softmax(logits, name=SOFTMAX_OUTPUT)

    def _from_audio(self, audio):
        """[batch, desired_samples] float samples in [-1, 1] to probabilities."""
        return {SOFTMAX_OUTPUT: self._probabilities(audio)}

    def _from_features(self, features):
        """[batch, frames, bins] features (windows of `_stream_features`) to probabilities."""
        logits = self.model(tf.expand_dims(features, -1), training=False)
        return {SOFTMAX_OUTPUT: tf.nn.softmax(logits, name=SOFTMAX_OUTPUT)}

    def _stream_features(self, samples):
        """Feature frames [frames, bins] of any length of audio (at least one frame's samples).

        Frames are computed one by one, so a window of a stream's frames equals
        the features of that window's audio: detection computes them once.
        """
        return {"frames": compute_features(samples[None, :], self.settings)[0, :, :, 0]}

    def _from_wav(self, wav_data):
        """One 16-bit PCM wav file's bytes to probabilities [1, labels].

        A shorter clip is centred in the window, as training and the server
        place it (audio.place_in_window); a longer one is cut at the end.
        """
        decoded = tf.audio.decode_wav(wav_data, desired_channels=1, name=DECODED_INPUT)
        return {SOFTMAX_OUTPUT: self._probabilities(self._centre(decoded.audio[:, 0])[None, :])}

    def _centre(self, samples):
        length = self.settings.desired_samples
        samples = samples[:length]
        missing = length - tf.shape(samples)[0]
        return tf.reshape(tf.pad(samples, [[missing // 2, missing - missing // 2]]), [length])


def export_saved_model(module: InferenceModule, out_dir: Path) -> None:
    """SavedModel for TF Serving: serving_default takes wav bytes, `audio` float samples;
    `stream_features` and `features` split the two for detection in long audio."""
    tf.saved_model.save(
        module,
        str(out_dir),
        signatures={
            "serving_default": module.from_wav.get_concrete_function(),
            AUDIO_SIGNATURE: module.from_audio.get_concrete_function(),
            STREAM_FEATURES_SIGNATURE: module.stream_features.get_concrete_function(),
            FEATURES_SIGNATURE: module.from_features.get_concrete_function(),
        },
    )


def frozen_graph_def(module: InferenceModule) -> tf.compat.v1.GraphDef:
    """The wav-bytes function with its variables folded into constants."""
    frozen = convert_variables_to_constants_v2(module.from_wav.get_concrete_function())
    graph_def = frozen.graph.as_graph_def()
    names = {node.name for node in graph_def.node}
    for required in (WAV_INPUT, DECODED_INPUT, SOFTMAX_OUTPUT):
        if required not in names:
            raise RuntimeError(f"frozen graph lacks the node {required!r}")
    return graph_def


def export_frozen_graph(module: InferenceModule, path: Path) -> None:
    path.write_bytes(frozen_graph_def(module).SerializeToString())


def export_tflite(module: InferenceModule, path: Path) -> None:
    """TFLite model taking one clip of float samples [1, desired_samples].

    The function is frozen first (the converter would otherwise keep the
    weights as resource variables that the runtime does not initialise).
    AudioSpectrogram and Mfcc become TFLite custom ops that the standard op
    resolver (tf.lite.Interpreter, the Android and C++ runtimes) registers.
    """
    concrete = tf.function(module._from_audio).get_concrete_function(
        tf.TensorSpec([1, module.settings.desired_samples], tf.float32, name="audio")
    )
    frozen = convert_variables_to_constants_v2(concrete)
    converter = tf.lite.TFLiteConverter.from_concrete_functions([frozen], module)
    converter.allow_custom_ops = True
    path.write_bytes(converter.convert())


def export_all(module: InferenceModule, ckpts_dir: Path) -> dict[str, str]:
    """Write every export into ckpts/; answers their paths."""
    paths = {
        "saved_model": ckpts_dir / "saved_model",
        "frozen_graph": ckpts_dir / "model.pb",
        "tflite": ckpts_dir / "model.tflite",
    }
    export_saved_model(module, paths["saved_model"])
    export_frozen_graph(module, paths["frozen_graph"])
    export_tflite(module, paths["tflite"])
    logger.info("Exported the model to %s", ckpts_dir)
    return {key: str(value) for key, value in paths.items()}


def run_frozen_graph(graph_path: Path, wav_bytes: bytes) -> np.ndarray:
    """Score a wav with the frozen graph the way TF's label_wav.py does."""
    graph_def = tf.compat.v1.GraphDef()
    graph_def.ParseFromString(Path(graph_path).read_bytes())
    graph = tf.Graph()
    with graph.as_default():
        tf.compat.v1.import_graph_def(graph_def, name="")
    with tf.compat.v1.Session(graph=graph) as session:
        output = graph.get_tensor_by_name(f"{SOFTMAX_OUTPUT}:0")
        return session.run(output, {f"{WAV_INPUT}:0": wav_bytes})[0]


def run_tflite(tflite_path: Path, samples: np.ndarray) -> np.ndarray:
    """Score one clip of float samples with the TFLite model."""
    interpreter = tf.lite.Interpreter(model_path=str(tflite_path))
    input_detail = interpreter.get_input_details()[0]
    interpreter.resize_tensor_input(input_detail["index"], [1, samples.size])
    interpreter.allocate_tensors()
    interpreter.set_tensor(input_detail["index"], samples.reshape(1, -1).astype(np.float32))
    interpreter.invoke()
    return interpreter.get_tensor(interpreter.get_output_details()[0]["index"])[0]
