"""The ``models/<YYYY-MM-DD_HHMMSS>/`` folder of one training, and finding runs.

A run is finished only when its DONE marker exists; the marker is written
last, so a cancelled or crashed run is never served.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import re
import time
from pathlib import Path
from typing import Any

from speechclas.limits import setting

TIMESTAMP_FORMAT = "%Y-%m-%d_%H%M%S"
DONE_MARKER = "DONE"
API_RUN = "api"
# Why `served_run` chose a run, as the metadata shows it.
PINNED_REASON = "pinned"
API_REASON = "models/api"
NEWEST_REASON = "newest finished run"
_RUN_NAME = re.compile(r"^\d{4}-\d{2}-\d{2}_\d{6}(_\d+)?$")


class RunNotFoundError(LookupError):
    """No finished run matches the request."""


@dataclasses.dataclass(frozen=True)
class RunDir:
    root: Path

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def ckpts(self) -> Path:
        return self.root / "ckpts"

    @property
    def conf(self) -> Path:
        return self.root / "conf"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def stats(self) -> Path:
        return self.root / "stats"

    @property
    def dataset_files(self) -> Path:
        return self.root / "dataset_files"

    @property
    def predictions(self) -> Path:
        return self.root / "predictions"

    @property
    def labels_path(self) -> Path:
        return self.ckpts / "labels.txt"

    @property
    def frozen_graph_path(self) -> Path:
        return self.ckpts / "model.pb"

    @property
    def tflite_path(self) -> Path:
        return self.ckpts / "model.tflite"

    @property
    def int8_tflite_path(self) -> Path:
        return self.ckpts / "model_int8.tflite"

    @property
    def saved_model_dir(self) -> Path:
        return self.ckpts / "saved_model"

    @property
    def model_json_path(self) -> Path:
        """What every export takes and answers, the feature settings and labels (written by export)."""
        return self.ckpts / "model.json"

    @property
    def conf_path(self) -> Path:
        return self.conf / "conf.json"

    @property
    def data_source_path(self) -> Path:
        """The data folder the run was trained on, and where it came from (datasource.write_record)."""
        return self.conf / "data_source.json"

    @property
    def metrics_path(self) -> Path:
        return self.stats / "metrics.json"

    @property
    def done_path(self) -> Path:
        return self.root / DONE_MARKER

    def is_finished(self) -> bool:
        return self.done_path.is_file()

    def configuration(self) -> dict[str, dict[str, Any]]:
        """conf.json as training wrote it: grouped as in config.yaml."""
        return json.loads(self.conf_path.read_text())

    def settings(self) -> dict[str, Any]:
        """Every parameter of the run's configuration, whatever its group."""
        return {name: value for group in self.configuration().values() for name, value in group.items()}

    def labels(self) -> list[str]:
        return [line for line in self.labels_path.read_text().splitlines() if line]

    def make_folders(self) -> None:
        for folder in (self.ckpts, self.conf, self.logs, self.stats, self.dataset_files):
            folder.mkdir(parents=True, exist_ok=True)

    def mark_finished(self) -> None:
        self.done_path.write_text(dt.datetime.now().isoformat(timespec="seconds") + "\n")


def create_run_dir(models_dir: Path, now: dt.datetime | None = None) -> RunDir:
    """A new, empty, uniquely named run folder (a suffix if two start in one second)."""
    models_dir.mkdir(parents=True, exist_ok=True)
    stamp = (now or dt.datetime.now()).strftime(TIMESTAMP_FORMAT)
    for attempt in range(1000):
        name = stamp if attempt == 0 else f"{stamp}_{attempt}"
        try:
            (models_dir / name).mkdir()
        except FileExistsError:
            continue
        run = RunDir(models_dir / name)
        run.make_folders()
        return run
    raise RuntimeError(f"could not create a run folder in {models_dir}")


def finished_runs(models_dir: Path) -> list[RunDir]:
    """Finished timestamped runs, oldest first."""
    if not models_dir.is_dir():
        return []
    runs = [RunDir(p) for p in models_dir.iterdir() if p.is_dir() and _RUN_NAME.match(p.name)]
    return sorted((r for r in runs if r.is_finished()), key=lambda r: r.name)


def find_run(models_dir: Path, name: str | None = None) -> RunDir:
    """The run named, else the default one of `served_run` (no pin)."""
    if not name:
        return served_run(models_dir)[0]
    if name != API_RUN and not _RUN_NAME.match(name):
        raise RunNotFoundError(f"{name!r} is not a run name (expected YYYY-MM-DD_HHMMSS or 'api')")
    run = RunDir(models_dir / name)
    if not run.root.is_dir():
        raise RunNotFoundError(f"there is no run {name!r}")
    if not run.is_finished():
        raise RunNotFoundError(f"run {name!r} did not finish (cancelled, failed or still training)")
    return run


def served_run(models_dir: Path, pinned: str = "") -> tuple[RunDir, str]:
    """The run that answers requests naming none, and why: the operator's pin
    (`Limits.run`), else ``models/api``, else the newest finished run.

    A pin is never followed by a fallback: if the pinned run cannot be served,
    RunNotFoundError says so, so the operator sees it instead of another model answering.
    """
    if pinned:
        variable = setting("run").env
        try:
            return find_run(models_dir, pinned), f"{PINNED_REASON} by {variable}"
        except RunNotFoundError as exc:
            raise RunNotFoundError(
                f"the served run is pinned by {variable} to {pinned!r}, which cannot be served: {exc}"
            ) from None
    api = RunDir(models_dir / API_RUN)
    if api.is_finished():
        return api, API_REASON
    runs = finished_runs(models_dir)
    if not runs:
        raise RunNotFoundError("no trained model yet: train one first")
    return runs[-1], NEWEST_REASON


class ServedRunCache:
    """`served_run`, remembered while nothing on disk could have changed its answer.

    Choosing lists the models folder and stats every run's marker, on every
    request that names no run. The answer is kept with what would change it:
    the folder's mtime (a run folder added, removed or renamed, models/api
    replaced) and the DONE markers that decided it (the chosen run's, and
    for the newest run models/api's and those of the unfinished runs newer
    than it: a training that finishes writes its marker inside its own
    folder, which the folder's mtime does not show). A folder modified
    within `settle_ns` before the choice is not trusted (a change in the
    same clock tick leaves the mtime as it was) and is listed again next
    time. Not found is never remembered.
    """

    def __init__(self, settle_ns: int = 1_000_000_000):
        self.settle_ns = settle_ns
        self._key: tuple[Path, str, int] | None = None
        self._answer: tuple[RunDir, str] | None = None
        self._markers: tuple[tuple[Path, bool], ...] = ()

    def get(self, models_dir: Path, pinned: str = "") -> tuple[RunDir, str]:
        """What `served_run(models_dir, pinned)` answers now."""
        key = (models_dir, pinned, _mtime_ns(models_dir))
        if key == self._key and all(path.is_file() == exists for path, exists in self._markers):
            return self._answer
        self._key = None
        answer = served_run(models_dir, pinned)
        markers = _deciding_markers(models_dir, *answer)
        if markers is not None and key[2] < time.time_ns() - self.settle_ns:
            self._key, self._answer, self._markers = key, answer, markers
        return answer


def _deciding_markers(models_dir: Path, run: RunDir, reason: str) -> tuple[tuple[Path, bool], ...] | None:
    """The markers whose existence made `run` the served one, each with that existence;
    None if one has already changed since the choice."""
    must_exist = [run.done_path]
    must_not = []
    if reason == NEWEST_REASON:
        must_not.append(RunDir(models_dir / API_RUN).done_path)
        must_not += [RunDir(path).done_path for path in models_dir.iterdir()
                     if _RUN_NAME.match(path.name) and path.name > run.name]  # fmt: skip
    if not all(path.is_file() for path in must_exist) or any(path.is_file() for path in must_not):
        return None
    return tuple((path, True) for path in must_exist) + tuple((path, False) for path in must_not)


def _mtime_ns(folder: Path) -> int:
    try:
        return folder.stat().st_mtime_ns
    except FileNotFoundError:
        return -1
