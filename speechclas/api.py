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
)
from speechclas.detect import ScorerCache, detect_request
from speechclas.fetch import FetchError
from speechclas.limits import Limits, setting
from speechclas.predict import (
    DEFAULT_TOP_K,
    InputError,
    PredictorCache,
    predict_request,
)
from speechclas.rundir import RunNotFoundError, served_run
from speechclas.trainproc import TrainingProcessError, error_message, train_in_process

logger = logging.getLogger(__name__)

MAX_TOP_K = 100
_PACKAGE = "speechclas"


class _ProcessState:
    """What one process keeps between DEEPaaS calls: the loaded runs, and the
    models folder of etc/config.yaml (parsing it costs more than a prediction,
    so it is read again only when the file changes). Empty until first used."""

    def __init__(self) -> None:
        self.predictors = PredictorCache()
        self.scorers = ScorerCache()
        self._models_dir: tuple[tuple[str, int], Path] | None = None

    def models_dir(self) -> Path:
        """Where runs are served from and API trainings write: the operator's
        ``SPEECHCLAS_MODELS_DIR`` if set, else ``models_dir`` of etc/config.yaml."""
        config_path = default_config_path()
        stamp = (str(config_path), config_path.stat().st_mtime_ns)
        if self._models_dir is None or self._models_dir[0] != stamp:
            self._models_dir = (stamp, load_config(path=config_path).path("models_dir"))
        return Limits.from_env().resolved_models_dir(self._models_dir[1])


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
    pinned = Limits.from_env().run
    try:
        run, reason = served_run(_state.models_dir(), pinned)
        return {"run": run.name, "reason": reason, "labels": run.labels(),
                "settings": run.configuration().get("model_settings", {})}  # fmt: skip
    except RunNotFoundError as exc:
        return {"run": None, "reason": None, "error": str(exc)} if pinned else None
    except (OSError, ValueError) as exc:
        logger.warning("Cannot describe the served model: %s", exc)
        return None


def _run_to_use(requested: str | None) -> str | None:
    """The run a prediction names, else the operator's pinned one (checked here, so that
    a pin that cannot be served is a 404 naming the pin), else None: the default."""
    if requested:
        return requested
    pinned = Limits.from_env().run
    if not pinned:
        return None
    return served_run(_state.models_dir(), pinned)[0].name


def get_metadata() -> dict[str, Any]:
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
    }


def warm() -> None:
    """Load the served model in this worker; without one the service still starts (and can train)."""
    _ensure_worker_logging()
    try:
        run, reason = served_run(_state.models_dir(), Limits.from_env().run)
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


class PredictionResponse(marshmallow.Schema):
    status = fields.Str(required=True, validate=validate.Equal("ok"))
    predictions = fields.List(
        fields.Nested(_Label), required=True, metadata={"description": "Top labels, most probable first"}
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


class PredictResponse(PredictionResponse):
    """One clip's answer, for an archive upload an ArchivePredictionResponse, for mode=detect a DetectionResponse."""

    files = fields.List(fields.Nested(_FileAnswer), metadata={"description": "Archive uploads only: per file"})
    summary = fields.Dict(metadata={"description": "Archive uploads only: files, failed, unlabelled"})
    metrics = fields.Dict(metadata={"description": "Archive uploads only, when clips sit in label folders"})
    settings = fields.Nested(_DetectSettings, metadata={"description": "mode=detect only"})
    detections = fields.List(fields.Nested(_Detection), metadata={"description": "mode=detect only: in time order"})

    def load(self, data, **kwargs):
        if isinstance(data, dict) and "detections" in data:
            return DetectionResponse().load(data, **kwargs)
        if isinstance(data, dict) and "files" in data:
            return ArchivePredictionResponse().load(data, **kwargs)
        return PredictionResponse().load(data, **kwargs)


schema = PredictResponse


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
                schemes={"http", "https"}, require_tld=False, error="'urls' must be an http(s) URL, got {input!r}"
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
        _state.models_dir(),
        file=Path(upload.filename) if upload is not None else None,
        file_name=upload.original_filename if upload is not None else None,
        url=args.get("urls"),
        run=_run_to_use(args.get("run")),
        threshold=args.get("threshold"),
        hop_ms=args.get("hop_ms"),
        limits=limits,
    )
    return {"status": "ok", **result}


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
            if upload is not None and not args.get("urls") and looks_like_archive(
                Path(upload.filename), upload.original_filename
            ):
                result = predict_archive(
                    _state.predictors,
                    _state.models_dir(),
                    Path(upload.filename),
                    archive_name=upload.original_filename,
                    run=_run_to_use(args.get("run")),
                    top_k=args.get("top_k", DEFAULT_TOP_K),
                    max_files=limits.max_archive_members,
                    limits=limits,
                )
                return {"status": "ok", **result}
            result = predict_request(
                _state.predictors,
                _state.models_dir(),
                file=Path(upload.filename) if upload is not None else None,
                file_name=upload.original_filename if upload is not None else None,
                url=args.get("urls"),
                run=_run_to_use(args.get("run")),
                top_k=args.get("top_k", DEFAULT_TOP_K),
                limits=limits,
            )
    finally:
        if upload is not None:  # DEEPaaS copies each upload to a temp file it never removes
            Path(upload.filename).unlink(missing_ok=True)
    logger.info("Predicted with run %s: %s", result["run"], result["predictions"][0])
    return {"status": "ok", **result}


# --- training -----------------------------------------------------------------

_SWAGGER_TYPES = {"str": "string", "int": "integer", "float": "number", "bool": "boolean"}


class ConfigArgument(fields.Field):
    """One etc/config.yaml parameter as a train argument.

    Values are converted by `config.coerce_value`, so the API refuses exactly
    what the CLI refuses, with messages that name the parameter. The first
    argument given also checks the rules that tie parameters together (as
    many learning rates as stages...), so those are refused before dispatch too.
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
        except ConfigError as exc:
            raise ValidationError(str(exc)) from None
        given = [name for name in self.specs if name in data]
        if given[0] == self.spec.name:
            _check_together(data, self.specs)
        return list(converted) if isinstance(converted, tuple) else converted


def _check_together(data, specs: dict[str, ParamSpec]) -> None:
    valid = {}
    for name, raw in data.items():
        if name not in specs:
            continue
        with contextlib.suppress(ConfigError):  # a bad single value is reported by its own field
            valid[name] = coerce_value(specs[name], raw)
    try:
        load_config(valid, specs=specs)
    except ConfigError as exc:
        raise ValidationError(str(exc)) from None


def get_train_args() -> dict[str, fields.Field]:
    specs = load_param_specs()
    return {name: ConfigArgument(spec, specs) for name, spec in specs.items()}


def train(**args) -> dict[str, Any]:
    """Train with the defaults of etc/config.yaml and the given arguments in a process of
    its own (`speechclas.trainproc`), into the served models folder; answers the run's summary.

    If that process is killed (out of memory, kill -9) the status says so and this
    worker goes on serving; if DEEPaaS kills this worker (cancel), the training dies with it.
    """
    _ensure_worker_logging()
    try:
        config = load_config({**args, "models_dir": str(_state.models_dir())})
        logger.info("Training requested through the API with %s", args or "the defaults")
        return train_in_process(config, Limits.from_env())
    except TrainingProcessError as exc:
        logger.error("Training failed: %s", exc)
        raise TrainingFailed(str(exc)) from None
    except Exception as exc:
        logger.exception("Training failed")
        raise TrainingFailed(error_message(exc)) from None
