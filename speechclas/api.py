"""DEEPaaS V2 entry point (``deepaas.v2.model: speechclas = speechclas.api``): glue only.

The work is done by `speechclas.predict` and `speechclas.train`; this module
declares the arguments, delegates, logs, and turns errors into HTTP answers.
How DEEPaaS 2.6 runs it decides the shape:

- ``predict``, ``train`` and ``warm`` run in DEEPaaS's pool of ``--workers``
  spawned processes, which import this module and receive our functions
  pickled by reference. What a worker loads can therefore only outlive one
  call in module state: `_state` (see `_ProcessState`).
- ``get_metadata``, ``get_*_args`` and the argument validators run in the main
  process, before a request is handed to a worker: a bad argument is refused
  there with DEEPaaS's 422, without occupying a worker.
- Whatever ``predict`` raises in the worker is pickled back and re-raised in
  DEEPaaS's request handler. A plain exception becomes a bare 500; an aiohttp
  ``HTTPException`` would be answered as is, but aiohttp's own cannot be
  unpickled, which kills the pool's result thread and hangs every later
  request (DEEPaaS #174, #123). `_HTTPError` survives the trip, so the 4xx
  of a bad input reaches the client with its message.
- A training is started from the same pool but runs in a child process of
  the worker (`speechclas.trainproc`), so an out-of-memory kill ends the
  training, not the worker. What ``train`` raises becomes the ``message`` of
  its ``error`` status, so it is turned into one plain picklable exception.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import logging
import os
from pathlib import Path
from typing import Any

import marshmallow
from aiohttp import web
from marshmallow import ValidationError, fields, validate

from speechclas.audio import AudioError
from speechclas.batch import looks_like_archive, predict_archive
from speechclas.config import (
    ConfigError,
    ParamSpec,
    coerce_value,
    default_config_path,
    load_config,
    load_param_specs,
    project_dir,
)
from speechclas.confine import OPERATOR_PARAMETERS, api_training_config, check_api_training, check_argument
from speechclas.detect import ScorerCache, detect_request
from speechclas.fetch import FetchError
from speechclas.limits import Limits, setting
from speechclas.predict import (
    DEFAULT_TOP_K,
    InputError,
    PredictorCache,
    predict_request,
)
from speechclas.rundir import RunDir, RunNotFoundError, ServedRunCache
from speechclas.trainproc import TrainingProcessError, error_message, running_trainings, train_in_process

logger = logging.getLogger(__name__)

MAX_TOP_K = 100
_PACKAGE = "speechclas"


class _ProcessState:
    """What one process keeps between DEEPaaS calls, each piece keyed so that it follows the
    disk: the loaded runs, the served run's choice (`rundir.ServedRunCache`), and the models
    folder of etc/config.yaml (parsing it costs more than a prediction, so it is read again
    only when the file changes). Empty until first used."""

    def __init__(self) -> None:
        self.predictors = PredictorCache()
        self.scorers = ScorerCache()
        self.served_runs = ServedRunCache()
        self._models_dir: tuple[tuple[str, int], Path] | None = None

    def models_dir(self, limits: Limits) -> Path:
        """Where runs are served from and API trainings write: the operator's
        ``SPEECHCLAS_MODELS_DIR`` if set, else ``models_dir`` of etc/config.yaml."""
        config_path = default_config_path()
        stamp = (str(config_path), config_path.stat().st_mtime_ns)
        if self._models_dir is None or self._models_dir[0] != stamp:
            self._models_dir = (stamp, load_config(path=config_path).path("models_dir"))
        return limits.resolved_models_dir(self._models_dir[1])

    def served_run(self, limits: Limits) -> tuple[RunDir, str]:
        """The run answering requests that name none, and why (`rundir.served_run`)."""
        return self.served_runs.get(self.models_dir(limits), limits.run)


# The module's one piece of mutable state: DEEPaaS runs our functions in worker processes
# that keep nothing between calls but what a module holds (see the module doc).
_state = _ProcessState()


class _HTTPError:
    """An aiohttp HTTP error with a JSON ``{"message": ...}`` body that survives
    pickling between a DEEPaaS worker and the server (see the module doc)."""

    def __init__(self, message: str):
        super().__init__(text=json.dumps({"message": message}), content_type="application/json")
        self.message = message

    def __reduce__(self):
        return type(self), (self.message,)


class BadRequest(_HTTPError, web.HTTPBadRequest):
    pass


class NotFound(_HTTPError, web.HTTPNotFound):
    pass


class PredictionFailed(_HTTPError, web.HTTPInternalServerError):
    pass


class TrainingFailed(RuntimeError):
    """A training that stopped; DEEPaaS shows the message in the training status."""


def _ensure_worker_logging() -> None:
    # DEEPaaS configures logging in its main process only; spawned workers start bare.
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@contextlib.contextmanager
def _http_errors():
    """Translate what a client can cause into 4xx, anything else into a 500 with a message."""
    try:
        yield
    except RunNotFoundError as exc:
        logger.info("Prediction refused (404): %s", exc)
        raise NotFound(str(exc)) from None
    except (InputError, AudioError, FetchError) as exc:
        logger.info("Prediction refused (400): %s", exc)
        raise BadRequest(str(exc)) from None
    except Exception as exc:
        logger.exception("Prediction failed")
        raise PredictionFailed(f"prediction failed ({type(exc).__name__}): {exc}") from None


# --- metadata and warm-up ---------------------------------------------------


def _served_model() -> dict[str, Any] | None:
    """Run served by default, why it is (the operator's pin, models/api or the newest
    finished run), its labels and audio settings, read from disk. None: no run yet."""
    limits = Limits.from_env()
    try:
        run, reason = _state.served_run(limits)
        return {"run": run.name, "reason": reason, "labels": run.labels(),
                "settings": run.configuration().get("model_settings", {})}  # fmt: skip
    except RunNotFoundError as exc:
        return {"run": None, "reason": None, "error": str(exc)} if limits.run else None
    except (OSError, ValueError) as exc:
        logger.warning("Cannot describe the served model: %s", exc)
        return None


def _run_to_use(requested: str | None, limits: Limits) -> str:
    """The run a prediction names, else the served one (a pin that cannot be served is a 404 naming the pin)."""
    return requested or _state.served_run(limits)[0].name


def _running_trainings() -> list[dict[str, Any]]:
    try:
        return running_trainings()
    except OSError as exc:
        logger.warning("Cannot list the running trainings: %s", exc)
        return []


def get_metadata() -> dict[str, Any]:
    """The package, the served model (``model``) and the API trainings running now (``trainings``).

    ``trainings`` lists this server's trainings, every worker's: DEEPaaS answers this in its main
    process, and each training reports to a progress file that names the worker and its server
    (`speechclas.trainproc.TrainingProgress`); another deepaas-run on the machine lists its own. Each:
    ``run`` (null until its run folder exists), ``phase`` (preparing: indexing the data and, for
    text_only, the engines saying the words; training; evaluating: after the last step, the final
    evaluation and exports), ``step`` of ``total``, ``started`` (ISO 8601), ``elapsed_s`` and
    ``wanted_words``. A training leaves the list as it ends, just before its status (GET
    train/<uuid>, which DEEPaaS keeps) stops being running; DEEPaaS does not tell ``train`` its uuid,
    so a client matches its training by ``wanted_words`` and start.
    """
    meta = importlib.metadata.metadata(_PACKAGE)
    summary = meta.get("Summary", "")
    return {
        "name": meta["Name"],
        "version": meta["Version"],
        "summary": summary,
        "description": summary,
        "author": meta.get("Author", ""),
        "author-email": meta.get("Author-email", ""),
        "license": meta.get("License", ""),
        "url": meta.get("Home-page", ""),
        "model": _served_model(),
        "trainings": _running_trainings(),
    }


def warm() -> None:
    """Load the served model in this worker; without one the service still starts (and can train)."""
    _ensure_worker_logging()
    try:
        run, reason = _state.served_run(Limits.from_env())
        _state.predictors.get(run)
    except RunNotFoundError as exc:
        logger.info("No model to load yet: %s", exc)
        return
    except Exception:
        logger.exception("Could not load the served model; predictions will report the error")
        return
    logger.info("Serving run %s (%s)", run.name, reason)


# --- prediction ---------------------------------------------------------------


class _Label(marshmallow.Schema):
    label = fields.Str(required=True)
    probability = fields.Float(required=True)


class _Window(marshmallow.Schema):
    start_s = fields.Float(required=True, metadata={"description": "Start of the scored window in the clip (s)"})
    end_s = fields.Float(required=True, metadata={"description": "End of the scored audio in the clip (s)"})
    selection = fields.Str(
        required=True,
        validate=validate.OneOf(["whole", "padded", "loudest"]),
        metadata={"description": "whole clip, padded (shorter than the window) or loudest window (longer)"},
    )


class ClipPredictionResponse(marshmallow.Schema):
    """The answer for one clip (`speechclas.predict.predict_request`)."""

    status = fields.Str(required=True, validate=validate.Equal("ok"))
    predictions = fields.List(
        fields.Nested(_Label), required=True, metadata={"description": "Top labels, most probable first"}
    )
    labels = fields.List(fields.Str(), required=True, metadata={"description": "The labels of predictions, in order"})
    probabilities = fields.List(
        fields.Float(), required=True, metadata={"description": "Their probabilities, in the same order"}
    )
    run = fields.Str(required=True, metadata={"description": "Run (models/ folder) that answered"})
    duration_s = fields.Float(required=True, metadata={"description": "Duration of the input (s)"})
    sample_rate = fields.Int(required=True, metadata={"description": "Sample rate of the input (Hz)"})
    channels = fields.Int(required=True, metadata={"description": "Channels of the input (mixed to mono)"})
    window = fields.Nested(_Window, required=True)


class _FileAnswer(marshmallow.Schema):
    file = fields.Str(required=True, metadata={"description": "Path inside the archive"})
    label = fields.Str(allow_none=True, metadata={"description": "True class, from the folder name (null: none)"})
    predictions = fields.List(fields.Nested(_Label))
    error = fields.Str(metadata={"description": "Why this file could not be scored (then no predictions)"})
    duration_s = fields.Float()
    sample_rate = fields.Int()
    channels = fields.Int()
    window = fields.Nested(_Window)


class ArchivePredictionResponse(marshmallow.Schema):
    """The answer to an uploaded .zip/.tar.gz of clips (`speechclas.batch.predict_archive`)."""

    status = fields.Str(required=True, validate=validate.Equal("ok"))
    run = fields.Str(required=True)
    files = fields.List(fields.Nested(_FileAnswer), required=True)
    summary = fields.Dict(keys=fields.Str(), values=fields.Int(), required=True)
    metrics = fields.Dict(metadata={"description": "Accuracy, per-class metrics, confusion matrix (labelled clips)"})


class _Detection(marshmallow.Schema):
    label = fields.Str(required=True)
    start_s = fields.Float(required=True, metadata={"description": "Start of the window that fired (s)"})
    end_s = fields.Float(required=True, metadata={"description": "End of that window: when the keyword was heard (s)"})
    score = fields.Float(required=True, metadata={"description": "Smoothed score of the label"})


class _DetectSettings(marshmallow.Schema):
    hop_ms = fields.Float(required=True)
    average_window_ms = fields.Float(required=True)
    threshold = fields.Float(required=True)
    suppression_ms = fields.Float(required=True)
    minimum_count = fields.Int(required=True)


class DetectionResponse(marshmallow.Schema):
    """The answer of ``mode=detect`` (`speechclas.detect.detect_request`)."""

    status = fields.Str(required=True, validate=validate.Equal("ok"))
    run = fields.Str(required=True)
    duration_s = fields.Float(required=True, metadata={"description": "Duration of the recording (s)"})
    settings = fields.Nested(_DetectSettings, required=True)
    detections = fields.List(fields.Nested(_Detection), required=True, metadata={"description": "In time order"})
    labels = fields.List(fields.Str(), required=True, metadata={"description": "The detections' labels, in order"})
    probabilities = fields.List(fields.Float(), required=True, metadata={"description": "Their scores"})


# Each answer's shape, told by a field only it has; a clip's otherwise. Instances are reused: they
# hold no state between loads, and building one costs more than validating an answer with it.
_ANSWER_SHAPES = (("files", ArchivePredictionResponse()), ("detections", DetectionResponse()))
_CLIP_ANSWER = ClipPredictionResponse()


class ModelPredictionResponse(marshmallow.Schema):
    """Every predict answer, under the name DEEPaaS gives a model's response schema.

    swagger.json names a schema by its class. The AI4OS platform's Gradio UI
    (ai4os/deepaas_ui) reads ``definitions.ModelPredictionResponse`` and, when
    it has ``labels`` and ``probabilities``, shows them as a classification
    (Label) widget. The fields document all shapes, so few are required;
    `load`, which DEEPaaS calls on every answer, validates an answer against
    its own shape: a clip's (`ClipPredictionResponse`), an archive's or a
    detection's (``mode=detect``, whose ``labels`` and ``probabilities`` are
    the detected keywords and their scores, so the widget shows them too).
    """

    status = fields.Str(required=True, validate=validate.Equal("ok"))
    run = fields.Str(required=True, metadata={"description": "Run (models/ folder) that answered"})
    predictions = fields.List(fields.Nested(_Label), metadata={"description": "Top labels, most probable first"})
    labels = fields.List(fields.Str(), metadata={"description": "The labels of predictions, in order"})
    probabilities = fields.List(fields.Float(), metadata={"description": "Their probabilities, in the same order"})
    duration_s = fields.Float(metadata={"description": "Duration of the input (s)"})
    sample_rate = fields.Int(metadata={"description": "Sample rate of the input (Hz)"})
    channels = fields.Int(metadata={"description": "Channels of the input (mixed to mono)"})
    window = fields.Nested(_Window)
    files = fields.List(fields.Nested(_FileAnswer), metadata={"description": "Archive uploads only: per file"})
    summary = fields.Dict(metadata={"description": "Archive uploads only: files, failed, unlabelled"})
    metrics = fields.Dict(metadata={"description": "Archive uploads only, when clips sit in label folders"})
    settings = fields.Nested(_DetectSettings, metadata={"description": "mode=detect only"})
    detections = fields.List(fields.Nested(_Detection), metadata={"description": "mode=detect only, in time order"})

    def load(self, data, **kwargs):
        if isinstance(data, dict):
            for field, shape in _ANSWER_SHAPES:
                if field in data:
                    return shape.load(data, **kwargs)
        return _CLIP_ANSWER.load(data, **kwargs)


schema = ModelPredictionResponse


def _upload_check(max_bytes: int):
    """Validator of the ``data`` field: a real file upload no larger than `max_bytes`."""

    def check(value) -> None:
        if not isinstance(value, web.FileField):
            raise ValidationError("'data' must be an uploaded file (multipart form, e.g. curl -F data=@clip.wav)")
        size = value.file.seek(0, os.SEEK_END)
        value.file.seek(0)
        if size > max_bytes:
            raise ValidationError(
                f"the file {value.filename!r} is {size} bytes; the largest accepted is {max_bytes} bytes"
            )

    return check


def get_predict_args() -> dict[str, fields.Field]:
    return {
        "data": fields.Raw(
            # The largest upload of any mode; a clip's own bound is checked once the mode is known.
            validate=_upload_check(Limits.from_env().max_upload_bytes()),
            metadata={
                "type": "file",
                "location": "form",
                "description": "Audio file to classify (wav of any bit depth, rate and channel count; "
                "flac and ogg too), or a .zip/.tar.gz of such files, answered per file; with mode=detect a "
                "recording of any length. Send this or 'urls'.",
            },
        ),
        "urls": fields.Str(
            validate=validate.URL(
                schemes={"http", "https"}, require_tld=False, error="'urls' must be an http(s) URL whose host is a name or a plain IPv4/IPv6 address, got {input!r}"
            ),
            metadata={"description": "URL of an audio file to download and classify. Send this or 'data'."},
        ),
        "run": fields.Str(
            metadata={
                "description": "Model to use: a run folder in models/ (YYYY-MM-DD_HHMMSS) or 'api'. "
                "Default: models/api if present, else the newest finished run."
            }
        ),
        "top_k": fields.Int(
            load_default=DEFAULT_TOP_K,
            validate=validate.Range(min=1, max=MAX_TOP_K),
            metadata={"description": "Number of labels to return, most probable first."},
        ),
        "mode": fields.Str(
            load_default="clip",
            validate=validate.OneOf(["clip", "detect"]),
            metadata={
                "enum": ["clip", "detect"],
                "description": "clip: the top labels of one clip (its loudest window). detect: every keyword "
                "of a long recording with its time (label, start_s, end_s, score).",
            },
        ),
        "threshold": fields.Float(
            validate=validate.Range(min=0.0, max=1.0),
            metadata={"description": "mode=detect: smoothed score a detection needs. Default: the run's "
                      "calibrated threshold, else 0.7."},  # fmt: skip
        ),
        "hop_ms": fields.Float(
            validate=validate.Range(min=1.0, max=10_000.0),
            metadata={"description": "mode=detect: time between two scored windows, a multiple of the model's "
                      "frame stride. Default: two strides (20 ms)."},  # fmt: skip
        ),
    }


def _check_clip_upload(upload, limits: Limits) -> None:
    """A clip or archive upload within ``max_audio_bytes`` (the field's validator allowed the larger detect bound)."""
    size = Path(upload.filename).stat().st_size
    if size > limits.max_audio_bytes:
        raise InputError(
            f"the file {upload.original_filename!r} is {size} bytes; the largest accepted is {limits.max_audio_bytes} "
            f"bytes (operator setting {setting('max_audio_bytes').env}; mode=detect accepts up to "
            f"{limits.detect_max_audio_bytes})"
        )


def _detect(args, upload, limits: Limits) -> dict[str, Any]:
    if upload is not None and not args.get("urls") and looks_like_archive(Path(upload.filename), upload.original_filename):
        raise InputError("mode=detect takes one recording, not an archive")
    result = detect_request(
        _state.scorers,
        _state.models_dir(limits),
        file=Path(upload.filename) if upload is not None else None,
        file_name=upload.original_filename if upload is not None else None,
        url=args.get("urls"),
        run=_run_to_use(args.get("run"), limits),
        threshold=args.get("threshold"),
        hop_ms=args.get("hop_ms"),
        limits=limits,
    )
    # The AI4OS UI's Label widget reads these two lists of every answer.
    detections = result["detections"]
    return {"status": "ok", **result, "labels": [d["label"] for d in detections],
            "probabilities": [d["score"] for d in detections]}


def predict(**args) -> dict[str, Any]:
    _ensure_worker_logging()
    upload = args.get("data")
    try:
        with _http_errors():
            limits = Limits.from_env()
            if args.get("mode") == "detect":
                return _detect(args, upload, limits)
            if upload is not None:
                _check_clip_upload(upload, limits)
            models_dir = _state.models_dir(limits)
            run = _run_to_use(args.get("run"), limits)
            top_k = args.get("top_k", DEFAULT_TOP_K)
            if upload is not None and not args.get("urls") and looks_like_archive(
                Path(upload.filename), upload.original_filename
            ):
                result = predict_archive(_state.predictors, models_dir, Path(upload.filename),
                                         archive_name=upload.original_filename, run=run, top_k=top_k,
                                         max_files=limits.max_archive_members,
                                         max_unpacked_bytes=limits.max_archive_unpacked_bytes, limits=limits)  # fmt: skip
                return {"status": "ok", **result}
            result = predict_request(
                _state.predictors,
                models_dir,
                file=Path(upload.filename) if upload is not None else None,
                file_name=upload.original_filename if upload is not None else None,
                url=args.get("urls"),
                run=run,
                top_k=top_k,
                limits=limits,
            )
    finally:
        if upload is not None:  # DEEPaaS copies each upload to a temp file it never removes
            Path(upload.filename).unlink(missing_ok=True)
    # Debug: at info, writing it costs about 0.3 ms a request; the server's access log has every request.
    logger.debug("Predicted with run %s: %s", result["run"], result["predictions"][0])
    return {"status": "ok", **result}


# --- training -----------------------------------------------------------------

_SWAGGER_TYPES = {"str": "string", "int": "integer", "float": "number", "bool": "boolean"}


class ConfigArgument(fields.Field):
    """One etc/config.yaml parameter as a train argument.

    Values are converted by `config.coerce_value`, so the API refuses what
    the CLI refuses, and held to the operator's bounds on API trainings
    (`speechclas.confine`), with messages that name the parameter. Once every
    value is good, the first argument given also checks the rules over
    several parameters (as many learning rates as stages, feature size,
    memory), so those are refused before dispatch too.
    """

    def __init__(self, spec: ParamSpec, specs: dict[str, ParamSpec]):
        is_list = spec.type.startswith("list[")
        metadata: dict[str, Any] = {
            "description": spec.help + (" Comma-separated." if is_list else ""),
            "type": "string" if is_list else _SWAGGER_TYPES[spec.type],
            "doc_default": ",".join(str(item) for item in spec.default) if is_list else spec.default,
        }
        if spec.choices is not None and not is_list:
            metadata["enum"] = list(spec.choices)
        if spec.range is not None and not is_list:
            metadata["minimum"], metadata["maximum"] = spec.range
        super().__init__(metadata=metadata)
        self.spec = spec
        self.specs = specs

    def _deserialize(self, value, attr, data, **kwargs):
        try:
            converted = coerce_value(self.spec, value)
            check_argument(self.spec.name, converted, Limits.from_env(), project_dir())
        except ConfigError as exc:
            raise ValidationError(str(exc)) from None
        given = [name for name in self.specs if name in data]
        if given[0] == self.spec.name:
            _check_together(data, self.specs)
        return list(converted) if isinstance(converted, tuple) else converted


def _check_together(data, specs: dict[str, ParamSpec]) -> None:
    """The rules over several parameters (stages, feature size, memory), reported with the first argument."""
    limits, base_dir = Limits.from_env(), project_dir()
    valid = {}
    for name, raw in data.items():
        if name not in specs:
            continue
        try:
            valid[name] = coerce_value(specs[name], raw)
            check_argument(name, valid[name], limits, base_dir)
        except ConfigError:  # reported by its own field; the others are judged once every value is good
            return
    try:
        check_api_training(load_config(valid, specs=specs), limits, base_dir, checked=valid.keys())
    except ConfigError as exc:
        raise ValidationError(str(exc)) from None


def get_train_args() -> dict[str, fields.Field]:
    """Every parameter of etc/config.yaml but the operator's (`confine.OPERATOR_PARAMETERS`).

    Those are declared dump-only: Swagger does not offer them, and one sent
    anyway is refused with a 422 ("Unknown field.") where webargs would
    silently drop an undeclared name and start the training.
    """
    specs = load_param_specs()
    args: dict[str, fields.Field] = {
        name: ConfigArgument(spec, specs) for name, spec in specs.items() if name not in OPERATOR_PARAMETERS
    }
    args.update({name: fields.Raw(dump_only=True) for name in OPERATOR_PARAMETERS})
    return args


def train(**args) -> dict[str, Any]:
    """Train with the defaults of etc/config.yaml and the given arguments in a process of
    its own (`speechclas.trainproc`), into the served models folder; answers the run's summary.

    If that process is killed (out of memory, kill -9) the status says so and this
    worker goes on serving; if DEEPaaS kills this worker (cancel), the training dies with it.
    While it runs, its phase and step are listed by `get_metadata` (``trainings``).
    """
    _ensure_worker_logging()
    try:
        limits = Limits.from_env()
        config = api_training_config(load_config(args), limits, project_dir())  # checked again, in the worker
        logger.info("Training requested through the API with %s", args or "the defaults")
        return train_in_process(config, limits)
    except TrainingProcessError as exc:
        logger.error("Training failed: %s", exc)
        raise TrainingFailed(str(exc)) from None
    except Exception as exc:
        logger.exception("Training failed")
        raise TrainingFailed(error_message(exc)) from None
