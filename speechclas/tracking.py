"""MLflow tracking of trainings, the AI4OS platform's tracker (optional: ``pip install .[mlflow]``).

With ``MLFLOW_TRACKING_URI`` set, a training logs its resolved configuration,
its evaluations, its final metrics and its exports to MLflow, and registers
the exports as a new version of a registered model. Tracking is a record
beside the run folder, not part of the training: a failure of MLflow (server
down, bad URI, mlflow not installed) is logged as a warning, tracking stops
for that training, and the training goes on. mlflow is imported only when
tracking is on, so serving and plain trainings never load it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from speechclas.config import Config
from speechclas.rundir import RunDir

logger = logging.getLogger(__name__)

TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"  # MLflow's own variables
EXPERIMENT_ENV = "MLFLOW_EXPERIMENT_NAME"
DEFAULT_EXPERIMENT = "speechclas"
MODEL_ARTIFACT_DIR = "ckpts"  # the registered version points at the run's ckpts/ artifacts


@dataclasses.dataclass(frozen=True)
class TrackingSettings:
    tracking_uri: str
    model_name: str  # the registered model (operator setting SPEECHCLAS_MLFLOW_MODEL_NAME)
    experiment_name: str = DEFAULT_EXPERIMENT

    @classmethod
    def from_env(cls, environ: Mapping[str, str], model_name: str) -> TrackingSettings | None:
        """The settings in `environ`, or None (tracking off) when MLFLOW_TRACKING_URI is unset or blank."""
        uri = environ.get(TRACKING_URI_ENV, "").strip()
        if not uri:
            return None
        experiment = environ.get(EXPERIMENT_ENV, "").strip() or DEFAULT_EXPERIMENT
        return cls(tracking_uri=uri, experiment_name=experiment, model_name=model_name)


def tracker_from_env(environ: Mapping[str, str], model_name: str) -> Tracker:
    """The tracker a training started now should use (for the CLI and API edges)."""
    settings = TrackingSettings.from_env(environ, model_name)
    return MlflowTracker(settings) if settings else Tracker()


def run_artifacts(run: RunDir) -> list[tuple[Path, str]]:
    """(file, artifact folder) of what a run uploads, the files that exist, in the run folder's layout."""
    candidates = [
        (run.metrics_path, "stats"),
        (run.stats / "confusion_matrix_test.png", "stats"),
        (run.conf_path, "conf"),
        (run.labels_path, MODEL_ARTIFACT_DIR),
        (run.tflite_path, MODEL_ARTIFACT_DIR),
        (run.int8_tflite_path, MODEL_ARTIFACT_DIR),
        (run.model_json_path, MODEL_ARTIFACT_DIR),
    ]
    return [(path, folder) for path, folder in candidates if path.is_file()]


def flat_params(config: Config) -> dict[str, str]:
    """The resolved configuration as MLflow params: one per parameter, lists comma-separated."""
    params = {}
    for group in config.to_dict().values():
        for name, value in group.items():
            params[name] = ",".join(str(item) for item in value) if isinstance(value, list) else str(value)
    return params


def final_metrics(run_metrics: Mapping[str, Any]) -> dict[str, float]:
    """The numbers of stats/metrics.json worth a chart: accuracies, duration, size, and each export's."""
    values = {
        "final_train_accuracy": run_metrics["training"]["accuracy"],
        "final_validation_accuracy": run_metrics["validation"]["accuracy"],
        "test_accuracy": run_metrics["testing"]["accuracy"],
        "duration_s": run_metrics["duration_s"],
        "parameter_count": run_metrics["parameter_count"],
    }
    for export_name, entry in (run_metrics.get("exports") or {}).items():
        for key, value in entry.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                values[f"exports/{export_name}/{key}"] = value
    return {name: float(value) for name, value in values.items()}


class Tracker:
    """No tracking: what a training uses when MLFLOW_TRACKING_URI is not set.

    `train` calls `start` once the run folder exists, `log_evaluation` at
    each evaluation, then `finish` after the run is marked finished or
    `end` with the status if the training raised.
    """

    def start(self, run: RunDir, config: Config) -> None:
        pass

    def log_evaluation(self, entry: Mapping[str, float]) -> None:
        pass

    def finish(self, run: RunDir) -> None:
        pass

    def end(self, status: str) -> None:
        pass


class MlflowTracker(Tracker):
    """Logs one training as one MLflow run through MlflowClient (no global active run).

    The first MLflow error stops tracking for the rest of the training, so a
    dead server costs one timeout (MLflow's retries), not one per evaluation.
    """

    def __init__(self, settings: TrackingSettings):
        self.settings = settings
        self.client = None
        self.run_id: str | None = None
        self.stopped = False

    def start(self, run: RunDir, config: Config) -> None:
        self._attempt("start the run", self._start_run, run, config)

    def log_evaluation(self, entry: Mapping[str, float]) -> None:
        values = {name: value for name, value in entry.items() if name != "step"}
        self._attempt("log an evaluation", self._log_metrics, values, int(entry["step"]))

    def finish(self, run: RunDir) -> None:
        self._attempt("log the final metrics", self._log_final_metrics, run)
        self._attempt("upload the artifacts", self._upload_artifacts, run)
        self._attempt("register the model", self._register, run)
        self.end("FINISHED")

    def end(self, status: str) -> None:
        self._attempt(f"mark the run {status}", self._terminate, status)
        self.stopped = True

    def _attempt(self, action: str, step, *args) -> None:
        """Run one tracking step unless tracking stopped; an error becomes a warning and stops it."""
        if self.stopped:
            return
        try:
            step(*args)
        except ImportError as exc:
            self.stopped = True
            logger.warning("%s is set but MLflow cannot be imported (pip install 'speechclas[mlflow]'): "
                           "this training is not tracked (%s)", TRACKING_URI_ENV, exc)
        except Exception as exc:
            self.stopped = True
            logger.warning("MLflow tracking stopped, the training goes on: could not %s at %s: %s: %s",
                           action, self.settings.tracking_uri, type(exc).__name__, exc)

    def _start_run(self, run: RunDir, config: Config) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient  # the heavy import, only when tracking

        self.client = MlflowClient(tracking_uri=self.settings.tracking_uri)
        tags = {"speechclas.run": run.name, "speechclas.run_dir": str(run.root),
                "speechclas.model_architecture": config.model_architecture}
        mlflow_run = self.client.create_run(self._experiment_id(), run_name=run.name, tags=tags)
        self.run_id = mlflow_run.info.run_id
        params = [Param(name, value) for name, value in flat_params(config).items()]
        self.client.log_batch(self.run_id, params=params)
        logger.info("Tracking run %s in MLflow at %s: experiment %r, run id %s",
                    run.name, self.settings.tracking_uri, self.settings.experiment_name, self.run_id)

    def _experiment_id(self) -> str:
        from mlflow.exceptions import MlflowException

        name = self.settings.experiment_name
        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        try:
            return self.client.create_experiment(name)
        except MlflowException:  # created meanwhile by a training beside this one
            experiment = self.client.get_experiment_by_name(name)
            if experiment is None:
                raise
            return experiment.experiment_id

    def _log_metrics(self, values: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(name, float(value), now, step)
                                                    for name, value in values.items()])

    def _log_final_metrics(self, run: RunDir) -> None:
        run_metrics = json.loads(run.metrics_path.read_text())
        self._log_metrics(final_metrics(run_metrics), run_metrics["steps"])

    def _upload_artifacts(self, run: RunDir) -> None:
        for path, folder in run_artifacts(run):
            self.client.log_artifact(self.run_id, str(path), artifact_path=folder)

    def _register(self, run: RunDir) -> None:
        from mlflow.exceptions import MlflowException

        name = self.settings.model_name
        try:
            self.client.create_registered_model(name, description="speechclas keyword classifiers")
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        source = f"runs:/{self.run_id}/{MODEL_ARTIFACT_DIR}"
        files = ", ".join(path.name for path, folder in run_artifacts(run) if folder == MODEL_ARTIFACT_DIR)
        version = self.client.create_model_version(
            name, source, run_id=self.run_id, tags={"speechclas.run": run.name},
            description=f"speechclas run {run.name}: {files}",
        )
        logger.info("Registered %s version %s in MLflow (%s)", name, version.version, source)

    def _terminate(self, status: str) -> None:
        # MLflow prints the run's URL on stdout, where speechclas-train writes its JSON summary.
        with contextlib.redirect_stdout(sys.stderr):
            self.client.set_terminated(self.run_id, status=status)
