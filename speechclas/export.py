"""Inference functions (audio in, softmax out), their exports, and model.json.

Feature extraction is inside the exports for servers and phones, so they take
raw audio: the frozen ``model.pb`` takes a whole wav file's bytes as
``wav_data:0`` (or decoded samples as ``decoded_sample_data:0``) and answers
``labels_softmax:0``, as TF's label_wav.py and the Android demo expect; the
float TFLite model takes one clip of float samples; the SavedModel serves
both, and features. ``model_int8.tflite``, for microcontrollers, takes int8
features (a device computes them with its own frontend) and answers int8
probabilities. ``model.json`` describes them all, as the converters and the
interpreter report them, with the feature settings and labels.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterable
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from ai_edge_litert.interpreter import Interpreter
from tensorflow.lite.experimental.microfrontend.python.ops import (  # noqa: F401
    audio_microfrontend_op,  # registers AudioMicrofrontend: loading a preprocess=micro SavedModel or model.pb needs it
)
from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

from speechclas.architectures.common import TIME_POOL_LAYER
from speechclas.features import (
    MICRO_FEATURE_SCALE,
    FeatureSettings,
    compute_features,
    frames_are_independent,
    logmel_options,
    micro_frontend_options,
    pcen_options,
)
from speechclas.normalization import normalization_mode
from speechclas.rundir import RunDir

logger = logging.getLogger(__name__)

WAV_INPUT = "wav_data"
DECODED_INPUT = "decoded_sample_data"
SOFTMAX_OUTPUT = "labels_softmax"
AUDIO_SIGNATURE = "audio"
FEATURES_SIGNATURE = "features"
# Detection in long audio (speechclas.detect): features of a stream once, then windows of them.
STREAM_FEATURES_SIGNATURE = "stream_features"
# Detection's shared trunk, for a network whose output is head(mean over time of trunk(features)):
# the trunk's output columns of a whole stream once, then the head on each window's mean column.
STREAM_COLUMNS_SIGNATURE = "stream_columns"
POOLED_SIGNATURE = "pooled"
MODEL_JSON_FORMAT = 1


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
        self.from_features = tf.function(
            self._from_features,
            input_signature=[tf.TensorSpec([None, *settings.input_shape], tf.float32, name=FEATURES_SIGNATURE)],
        )
        # Detection's signatures slice a stream's frames into windows: only for frames computed
        # each from its own samples (not pcen, whose smoother starts at each clip's first frame).
        self.streams = frames_are_independent(settings)
        if self.streams:
            self.stream_features = tf.function(
                self._stream_features, input_signature=[tf.TensorSpec([None], tf.float32, name="samples")]
            )
        self.split = split_at_time_pool(model, settings) if self.streams else None
        if self.split is not None:
            width = settings.input_shape[1]
            self.stream_columns = tf.function(
                self._stream_columns, input_signature=[tf.TensorSpec([None, None, width], tf.float32, name="frames")]
            )
            self.pooled = tf.function(
                self._pooled, input_signature=[tf.TensorSpec([None, self.split.width], tf.float32, name="pooled")]
            )

    def _probabilities(self, audio: tf.Tensor) -> tf.Tensor:
        return self._from_features(compute_features(audio, self.settings))[SOFTMAX_OUTPUT]

    def _from_features(self, features):
        """[batch, time, features, 1] as compute_features makes them to probabilities."""
        return {SOFTMAX_OUTPUT: tf.nn.softmax(self.model(features, training=False), name=SOFTMAX_OUTPUT)}

    def _from_audio(self, audio):
        """[batch, desired_samples] float samples in [-1, 1] to probabilities."""
        return {SOFTMAX_OUTPUT: self._probabilities(audio)}

    def _stream_features(self, samples):
        """Feature frames [frames, bins] of any length of audio (at least one frame's samples).

        Frames are computed one by one, so a window of a stream's frames equals
        the features of that window's audio: detection computes them once.
        """
        return {"frames": compute_features(samples[None, :], self.settings)[0, :, :, 0]}

    def _stream_columns(self, frames):
        """[pieces, frames, bins] feature frames to the trunk's output columns [pieces, columns, width],
        each reduced by time_pool on its own, and the trunk's time stride (frames per column)."""
        trunk = self.split.trunk([frames[..., None]], training=False)
        shape = tf.shape(trunk)
        # Each column alone through time_pool: a mean over time of a one-column piece is the column.
        alone = tf.reshape(trunk, tf.concat([[shape[0] * shape[1], 1], shape[2:]], axis=0))
        columns = self.split.time_pool(alone)
        return {"columns": tf.reshape(columns, [shape[0], shape[1], self.split.width]),
                "time_stride": tf.constant(self.split.time_stride, tf.int32)}  # fmt: skip

    def _pooled(self, pooled):
        """time_pool's output (a window's mean column) [batch, width] to probabilities."""
        return {SOFTMAX_OUTPUT: tf.nn.softmax(self.split.head(pooled, training=False), name=SOFTMAX_OUTPUT)}

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


@dataclasses.dataclass(frozen=True)
class TimePoolSplit:
    """A network cut at its `time_pool` layer: trunk (taking any number of frames), time_pool, head."""

    trunk: keras.Model
    time_pool: keras.layers.Layer
    head: keras.Model
    time_stride: int  # input frames per trunk output column
    width: int  # time_pool's output size


def split_at_time_pool(model: keras.Model, settings: FeatureSettings) -> TimePoolSplit | None:
    """The network cut at its layer named `time_pool` (a mean over time, maybe over other axes
    too, of the trunk's output); None without one.

    The trunk is re-applied to an input of any length (its layers are shared, not copied).
    Its time stride is measured: the columns that 5040 more frames add (5040 is a
    multiple of every stride up to 10, and of 16).
    """
    try:
        time_pool = model.get_layer(TIME_POOL_LAYER)
    except ValueError:
        return None
    frames, width, channels = settings.input_shape
    try:
        window_trunk = keras.Model(model.inputs, time_pool.input)
        trunk = keras.models.clone_model(window_trunk, input_tensors=[keras.Input((None, width, channels))],
                                         clone_function=lambda layer: layer)  # fmt: skip
        head = keras.Model(time_pool.output, model.output)
        columns = [int(trunk([np.zeros((1, length, width, channels), np.float32)]).shape[1])
                   for length in (frames, frames + 5040)]  # fmt: skip
    except (ValueError, TypeError, tf.errors.InvalidArgumentError) as error:  # a layer bound to the window's length
        logger.warning("%s's trunk does not take a stream of any length (%s): no shared-trunk signatures",
                       model.name, error)  # fmt: skip
        return None
    if columns[1] == columns[0] or 5040 % (columns[1] - columns[0]):
        logger.warning("Cannot measure the time stride of %s's trunk (%s columns): no shared-trunk signatures",
                       model.name, columns)  # fmt: skip
        return None
    return TimePoolSplit(trunk, time_pool, head, 5040 // (columns[1] - columns[0]), int(time_pool.output.shape[-1]))


def export_saved_model(module: InferenceModule, out_dir: Path) -> None:
    """SavedModel for TF Serving: serving_default takes wav bytes, `audio` float samples,
    `features` what compute_features makes; `stream_features` and `features` split the two
    for detection in long audio, and for a network with a `time_pool` layer, `stream_columns`
    and `pooled` split `features` in two (detection's shared trunk). Features whose frames
    are not independent (pcen) have no stream signatures: detection scores each window's audio."""
    signatures = {
        "serving_default": module.from_wav.get_concrete_function(),
        AUDIO_SIGNATURE: module.from_audio.get_concrete_function(),
        FEATURES_SIGNATURE: module.from_features.get_concrete_function(),
    }
    if module.streams:
        signatures[STREAM_FEATURES_SIGNATURE] = module.stream_features.get_concrete_function()
    if module.split is not None:
        signatures[STREAM_COLUMNS_SIGNATURE] = module.stream_columns.get_concrete_function()
        signatures[POOLED_SIGNATURE] = module.pooled.get_concrete_function()
    tf.saved_model.save(module, str(out_dir), signatures=signatures)


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


def tflite_takes_features(settings: FeatureSettings) -> bool:
    """Whether model.tflite takes features rather than samples (preprocess=micro).

    The converter cannot place the micro frontend in a model LiteRT runs:
    AudioMicrofrontend is neither a TFLite builtin, nor a custom op that
    LiteRT's op resolver registers, nor a select-TF (flex) op. The other
    features can: AudioSpectrogram and Mfcc are custom ops LiteRT registers,
    log-mel adds a FULLY_CONNECTED (the mel matrix) and a LOG, PCEN the mel
    matrix, TRANSPOSE, a FULLY_CONNECTED (its smoother), POW, DIV, ADD, SQRT,
    SUB and MUL, and feature
    normalisation MEAN, SQUARED_DIFFERENCE, RSQRT, SUB and MUL, all builtins.
    """
    return settings.preprocess == "micro"


def _one_example_function(module: InferenceModule, takes_features: bool):
    """The probabilities function for one example, variables frozen (the
    converter would otherwise keep resource variables the runtime does not
    initialise)."""
    if takes_features:
        spec = tf.TensorSpec([1, *module.settings.input_shape], tf.float32, name=FEATURES_SIGNATURE)
        function = module._from_features
    else:
        spec = tf.TensorSpec([1, module.settings.desired_samples], tf.float32, name=AUDIO_SIGNATURE)
        function = module._from_audio
    return convert_variables_to_constants_v2(tf.function(function).get_concrete_function(spec))


def export_tflite(module: InferenceModule, path: Path) -> None:
    """Float TFLite model taking one clip of float samples [1, desired_samples]
    (with preprocess=micro, features: see tflite_takes_features).

    AudioSpectrogram and Mfcc become TFLite custom ops that the standard op
    resolver (LiteRT's Interpreter, the Android and C++ runtimes) registers.
    """
    frozen = _one_example_function(module, tflite_takes_features(module.settings))
    converter = tf.lite.TFLiteConverter.from_concrete_functions([frozen], module)
    converter.allow_custom_ops = True
    path.write_bytes(converter.convert())


def export_int8_tflite(module: InferenceModule, path: Path, representative_features: np.ndarray) -> None:
    """Full-integer TFLite model for microcontrollers: int8 features in
    [1, time, features, 1], int8 softmax probabilities out.

    Activations are calibrated on `representative_features` (training
    features, as compute_features makes them); only int8 builtin ops are
    allowed, so the conversion fails rather than leave a float op behind.
    """
    if len(representative_features) == 0:
        raise ValueError("the int8 export needs representative features to calibrate on")
    frozen = _one_example_function(module, takes_features=True)
    converter = tf.lite.TFLiteConverter.from_concrete_functions([frozen], module)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: _calibration_examples(representative_features)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.int8
    converter.inference_output_type = tf.int8
    path.write_bytes(converter.convert())


def _calibration_examples(features: np.ndarray) -> Iterable[list[np.ndarray]]:
    for example in features:
        yield [example[None].astype(np.float32)]


def export_all(module: InferenceModule, run: RunDir, representative_features: np.ndarray) -> dict[str, str]:
    """Write every export and model.json into the run's ckpts/; answers their paths."""
    paths = {
        "saved_model": run.saved_model_dir,
        "frozen_graph": run.frozen_graph_path,
        "tflite": run.tflite_path,
        "int8_tflite": run.int8_tflite_path,
        "model_json": run.model_json_path,
    }
    export_saved_model(module, run.saved_model_dir)
    export_frozen_graph(module, run.frozen_graph_path)
    export_tflite(module, run.tflite_path)
    export_int8_tflite(module, run.int8_tflite_path, representative_features)
    description = describe_exports(run, module.settings, normalization_mode(module.model))
    run.model_json_path.write_text(json.dumps(description, indent=2) + "\n")
    logger.info("Exported the model to %s", run.ckpts)
    return {key: str(value) for key, value in paths.items()}


def _shape(shape) -> list[int | None]:
    """A shape as JSON: null where any size goes."""
    return [None if size is None or size < 0 else int(size) for size in shape]


def _tf_tensor(name: str, spec) -> dict:
    return {"name": name, "shape": _shape(spec.shape.as_list()), "dtype": spec.dtype.name}


def _tflite_tensor(detail: dict) -> dict:
    entry = {"name": detail["name"], "shape": _shape(detail["shape"]), "dtype": np.dtype(detail["dtype"]).name}
    scale, zero_point = detail["quantization"]
    if scale:
        entry["quantization"] = {"scale": float(scale), "zero_point": int(zero_point)}
    return entry


def describe_tflite(path: Path) -> dict:
    """Inputs, outputs and signatures as LiteRT's interpreter reports them."""
    interpreter = Interpreter(model_path=str(path))
    return {
        "inputs": [_tflite_tensor(detail) for detail in interpreter.get_input_details()],
        "outputs": [_tflite_tensor(detail) for detail in interpreter.get_output_details()],
        "signatures": interpreter.get_signature_list(),
    }


def describe_saved_model(path: Path, settings: FeatureSettings) -> dict:
    """Each signature's inputs and outputs as the loaded SavedModel reports them; with the
    shared-trunk signatures, `shared_trunk`: the trunk's time stride (frames per column)
    and the columns of one window, as `stream_columns` answers them."""
    loaded = tf.saved_model.load(str(path))
    signatures = {}
    for name, function in loaded.signatures.items():
        inputs = function.structured_input_signature[1]
        signatures[name] = {
            "inputs": [_tf_tensor(key, spec) for key, spec in sorted(inputs.items())],
            "outputs": [_tf_tensor(key, spec) for key, spec in sorted(function.structured_outputs.items())],
        }
    description = {"signatures": signatures}
    if STREAM_COLUMNS_SIGNATURE in loaded.signatures:
        frames, width, _ = settings.input_shape
        probe = loaded.signatures[STREAM_COLUMNS_SIGNATURE](frames=tf.zeros([1, frames, width]))
        description["shared_trunk"] = {"time_stride": int(probe["time_stride"]),
                                       "window_columns": int(probe["columns"].shape[1])}  # fmt: skip
    return description


def describe_frozen_graph(path: Path) -> dict:
    """The named input and output tensors of model.pb, as the imported graph reports them."""
    graph_def = tf.compat.v1.GraphDef()
    graph_def.ParseFromString(Path(path).read_bytes())
    graph = tf.Graph()
    with graph.as_default():
        tf.compat.v1.import_graph_def(graph_def, name="")

    def tensor(name):
        found = graph.get_tensor_by_name(name)
        return {"name": name, "shape": _shape(found.shape.as_list()), "dtype": found.dtype.name}

    return {
        "inputs": [tensor(f"{WAV_INPUT}:0")],
        "alternative_inputs": [tensor(f"{DECODED_INPUT}:0"), tensor(f"{DECODED_INPUT}:1")],
        "outputs": [tensor(f"{SOFTMAX_OUTPUT}:0")],
    }


def describe_exports(run: RunDir, settings: FeatureSettings, feature_normalization: str = "none") -> dict:
    """model.json: what a run's exports take and answer, read back from the written files.

    `feature_normalization` runs inside every export (speechclas.normalization):
    an export that takes features takes them before normalisation.
    """
    features = {
        **dataclasses.asdict(settings),
        "frames": settings.spectrogram_length,
        "feature_normalization": feature_normalization,
    }
    if settings.preprocess == "logmel":
        features["logmel"] = logmel_options(settings)
    if settings.preprocess == "pcen":
        features["pcen"] = pcen_options(settings)
    if settings.preprocess == "micro":
        features["micro_frontend"] = {**micro_frontend_options(settings), "feature_scale": MICRO_FEATURE_SCALE}
    tflite_input = "features" if tflite_takes_features(settings) else "audio"
    return {
        "format": MODEL_JSON_FORMAT,
        "labels": run.labels(),
        "features": features,
        "exports": {
            run.saved_model_dir.name: {
                "file": run.saved_model_dir.name,
                "format": "saved_model",
                "answers": "probabilities",
                **describe_saved_model(run.saved_model_dir, settings),
            },
            run.frozen_graph_path.name: {
                "file": run.frozen_graph_path.name,
                "format": "frozen_graph",
                "takes": "wav",
                "answers": "probabilities",
                **describe_frozen_graph(run.frozen_graph_path),
            },
            run.tflite_path.name: {
                "file": run.tflite_path.name,
                "format": "tflite",
                "takes": tflite_input,
                "answers": "probabilities",
                **describe_tflite(run.tflite_path),
            },
            run.int8_tflite_path.name: {
                "file": run.int8_tflite_path.name,
                "format": "tflite",
                "takes": "features",
                "answers": "probabilities",
                **describe_tflite(run.int8_tflite_path),
            },
        },
    }


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


class TFLiteRunner:
    """One TFLite model in LiteRT's interpreter, loaded once: one example in,
    float scores out. An int8 input is quantised and an int8 output
    dequantised with the model's own scale and zero point."""

    def __init__(self, tflite_path: Path):
        self.interpreter = Interpreter(model_path=str(tflite_path))
        self.interpreter.allocate_tensors()
        self.input = self.interpreter.get_input_details()[0]
        self.output = self.interpreter.get_output_details()[0]

    def __call__(self, example: np.ndarray) -> np.ndarray:
        values = np.asarray(example, np.float32).reshape(self.input["shape"])
        if self.input["dtype"] == np.int8:
            values = quantize(values, *self.input["quantization"])
        self.interpreter.set_tensor(self.input["index"], values)
        self.interpreter.invoke()
        scores = self.interpreter.get_tensor(self.output["index"])[0]
        if self.output["dtype"] == np.int8:
            scale, zero_point = self.output["quantization"]
            return (scores.astype(np.float32) - zero_point) * scale
        return scores


def quantize(values: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    """Float values to int8 as a TFLite int8 input expects them."""
    return np.clip(np.round(values / scale) + zero_point, -128, 127).astype(np.int8)


def run_tflite(tflite_path: Path, example: np.ndarray) -> np.ndarray:
    """Score one example (a clip of float samples, or features for a model
    that takes them) with a TFLite model."""
    return TFLiteRunner(tflite_path)(example)
