"""Batch prediction: many clips with one run, their statistics, and uploaded archives.

``speechclas-predict`` over a folder (``<label>/<clip>.wav`` or loose clips)
or a split list (``test.txt``: one ``<label>/<file>`` per line) scores every
clip with one loaded `Predictor` and writes

- ``models/<run>/predictions/<name>.json``: every file's top-k or its error,
- ``models/<run>/stats/<name>_metrics.json`` and ``<name>_confusion_matrix.png``:
  the same metrics training reports, computed from those predictions,

so a notebook can show them later. A file that cannot be scored, whatever
the reason, is reported in its own entry and the batch goes on. The API's
predict answers an uploaded ``.zip``/``.tar.gz`` of clips the same way, per
file, without writing anything; archives inside it are not unpacked.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import math
import re
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from tqdm import tqdm

from speechclas.archive import ArchiveError, TooManyFiles, _dataset_root, extract_archive
from speechclas.audio import AudioError, decode_audio
from speechclas.data import AUDIO_SUFFIXES, BACKGROUND_NOISE_DIR, UNKNOWN_LABEL, DataError, read_split_list
from speechclas.datasource import run_data_dir
from speechclas.limits import Limits, setting
from speechclas.predict import DEFAULT_TOP_K, InputError, Predictor, PredictorCache
from speechclas.rundir import RunDir, find_run

logger = logging.getLogger(__name__)

# An uploaded archive is unpacked in the request: keep it small enough for one request.
# Its number of files is an operator setting (Limits.max_archive_members).
ARCHIVE_SUFFIXES = (".zip", ".tar.gz", ".tgz", ".tar")
_IGNORED = re.compile(r"^(\..*|__MACOSX)$")
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")
# Members of an uploaded archive that are archives themselves: reported, never unpacked.
NESTED_ARCHIVE_SUFFIXES = (*ARCHIVE_SUFFIXES, ".tar.bz2", ".tar.xz", ".gz", ".bz2", ".xz", ".7z", ".rar")
NESTED_ARCHIVE_ERROR = "not audio (nested archives are not unpacked)"


class ArchiveRefused(InputError):
    """An uploaded archive that may not be unpacked or holds no clips (a 400 at the API)."""


@dataclasses.dataclass(frozen=True)
class BatchItem:
    """One clip to score: where it is, how to report it, and its true word if known."""

    path: Path
    name: str  # relative, with forward slashes, as reported
    word: str | None  # the folder it came from; None when the clip is not in a label folder
    error: str | None = None  # known before scoring: reported as is, the file is not read


@dataclasses.dataclass(frozen=True)
class BatchResult:
    run: RunDir
    name: str
    predictions_path: Path
    metrics_path: Path | None  # None when no clip had a known label
    summary: dict[str, Any]

    def describe(self) -> dict[str, Any]:
        """What a person wants to see when the batch is done, JSON-ready."""
        return {"run": self.run.name, "predictions": str(self.predictions_path),
                "metrics": str(self.metrics_path) if self.metrics_path else None, **self.summary}


# --- what to score ----------------------------------------------------------------


def _is_hidden(relative: PurePosixPath) -> bool:
    return any(_IGNORED.match(part) for part in relative.parts)


def items_from_folder(folder: Path, nested_archives: bool = False) -> list[BatchItem]:
    """Every audio file under `folder`; a clip in a sub-folder is labelled by that folder's name.

    ``_background_noise_`` and hidden or ``__MACOSX`` entries are skipped: they are not clips.
    With `nested_archives`, archives (.zip, .tar.gz...) are listed too, with an error entry:
    an uploaded archive's member that is an archive is reported, not unpacked.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder} is not a folder")
    items = []
    for path in sorted(folder.rglob("*")):
        relative = PurePosixPath(path.relative_to(folder).as_posix())
        if not path.is_file() or _is_hidden(relative) or BACKGROUND_NOISE_DIR in relative.parts:
            continue
        is_archive = nested_archives and path.name.lower().endswith(NESTED_ARCHIVE_SUFFIXES)
        if path.suffix.lower() not in AUDIO_SUFFIXES and not is_archive:
            continue
        word = relative.parts[-2] if len(relative.parts) > 1 else None
        items.append(BatchItem(path=path, name=str(relative), word=word,
                               error=NESTED_ARCHIVE_ERROR if is_archive else None))
    return items


def items_from_split_list(list_path: Path, data_dir: Path) -> list[BatchItem]:
    """The clips of a split list (`data.read_split_list`), relative to `data_dir`.

    A line that does not name a clip inside `data_dir` is kept as an item
    whose path does not exist, so it is reported per file like any bad clip.
    """
    try:
        entries = read_split_list(list_path)
    except DataError as exc:
        raise InputError(str(exc)) from None
    items = []
    for entry in entries:
        if entry.example is None:
            items.append(BatchItem(path=data_dir / "__outside__" / str(len(items)), name=entry.text, word=None))
        else:
            items.append(BatchItem(path=data_dir / entry.example.path, name=entry.text, word=entry.example.word))
    return items


def batch_name(source: Path) -> str:
    """A file name for a batch from its source: ``test`` for test.txt, the folder name otherwise."""
    stem = source.stem if source.suffix.lower() == ".txt" else source.name
    return _SAFE_NAME.sub("_", stem).strip("._") or "batch"


# --- scoring and statistics ---------------------------------------------------------


def true_label(word: str | None, labels: Sequence[str]) -> str | None:
    """The class a clip of folder `word` belongs to: the word if the model knows it, else _unknown_."""
    if word is None:
        return None
    return word if word in labels else UNKNOWN_LABEL


def predict_items(
    predictor: Predictor,
    items: Iterable[BatchItem],
    top_k: int = DEFAULT_TOP_K,
    progress: bool = True,
    limits: Limits | None = None,
) -> list[dict[str, Any]]:
    """Score each clip within the audio `limits`. Whatever goes wrong with one clip (not audio,
    over a limit, unreadable, a TensorFlow error, scores that are not numbers) becomes that clip's
    ``error`` entry; the batch goes on."""
    items = list(items)
    records = []
    for item in tqdm(items, desc="Predicting", unit="clip", disable=not progress):
        record: dict[str, Any] = {"file": item.name, "label": true_label(item.word, predictor.labels)}
        try:
            records.append({**record, **_score(predictor, item, top_k, limits)})
        except Exception as exc:  # one clip's failure, whatever it is, must not fail the others
            if isinstance(exc, (AudioError, _NotScored)):
                logger.warning("Skipped %s: %s", item.name, exc)
                message = str(exc)
            else:
                logger.warning("Skipped %s", item.name, exc_info=True)
                message = f"the file {item.name!r} could not be scored ({type(exc).__name__}): {exc}"
            records.append({**record, "error": message})
    return records


class _NotScored(ValueError):
    """A clip that decoded but whose answer cannot be given (reported as its error)."""


def _score(predictor: Predictor, item: BatchItem, top_k: int, limits: Limits | None) -> dict[str, Any]:
    if item.error is not None:
        raise _NotScored(item.error)
    audio = decode_audio(item.path, predictor.settings.sample_rate, name=f"the file {item.name!r}", limits=limits)
    answer = predictor.predict(audio, top_k)
    answer.pop("run")
    if not all(math.isfinite(p["probability"]) for p in answer["predictions"]):
        raise _NotScored(f"the model's scores for the file {item.name!r} are not finite numbers")
    return answer


def batch_statistics(records: Sequence[dict[str, Any]], labels: Sequence[str]) -> dict[str, Any]:
    """metrics.classification_metrics over the scored clips with a known label, plus what was left out."""
    from speechclas.metrics import classification_metrics  # scikit-learn: not in DEEPaaS's main process

    scored = [r for r in records if "error" not in r and r.get("label") is not None]
    index = {label: i for i, label in enumerate(labels)}
    truth = [index[r["label"]] for r in scored]
    predicted = [index[r["predictions"][0]["label"]] for r in scored]
    return {
        **classification_metrics(truth, predicted, labels),
        "files": len(records),
        "failed": sum("error" in r for r in records),
        "unlabelled": sum("error" not in r and r.get("label") is None for r in records),
    }


def predictions_path(run: RunDir, name: str) -> Path:
    return run.predictions / f"{name}.json"


def stats_paths(run: RunDir, name: str) -> tuple[Path, Path]:
    """Where a batch's metrics and its confusion-matrix picture go."""
    return run.stats / f"{name}_metrics.json", run.stats / f"{name}_confusion_matrix.png"


def load_batch(run: RunDir, name: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The stored predictions of a batch and its metrics (None when it had no labelled clip)."""
    predictions = json.loads(predictions_path(run, name).read_text())
    metrics_path, _ = stats_paths(run, name)
    return predictions, json.loads(metrics_path.read_text()) if metrics_path.is_file() else None


def write_batch(
    run: RunDir, name: str, source: Path, root: Path, records: list[dict[str, Any]], labels: Sequence[str]
):
    """Store the predictions (file names relative to `root`) and, when some clips were labelled,
    their statistics; returns both paths and the statistics."""
    run.predictions.mkdir(parents=True, exist_ok=True)
    out = predictions_path(run, name)
    out.write_text(json.dumps({
        "run": run.name,
        "source": str(source),
        "root": str(root),
        "created": dt.datetime.now().isoformat(timespec="seconds"),
        "labels": list(labels),
        "files": records,
    }, indent=1))
    stats = batch_statistics(records, labels)
    if not stats["count"]:
        return out, None, stats
    from speechclas.metrics import save_confusion_png

    metrics_path, picture_path = stats_paths(run, name)
    run.stats.mkdir(parents=True, exist_ok=True)
    metrics_path.write_text(json.dumps({"run": run.name, "source": str(source), **stats}, indent=2))
    save_confusion_png(stats["confusion_matrix"], labels, picture_path,
                       title=f"{run.name} {name}: accuracy {stats['accuracy']:.3f} (N={stats['count']})")
    return out, metrics_path, stats


def run_batch(
    models_dir: Path,
    source: Path,
    *,
    run: str | None = None,
    data_dir: Path | None = None,
    name: str | None = None,
    top_k: int = DEFAULT_TOP_K,
    progress: bool = True,
    predictors: PredictorCache | None = None,
    limits: Limits | None = None,
) -> BatchResult:
    """Score a folder or a split list (``.txt``) with a run and store predictions and statistics.

    A split list's lines are relative to `data_dir`, by default the data the
    run was trained on. Raises InputError or RunNotFoundError when nothing can be scored.
    """
    source = Path(source)
    run_dir = find_run(models_dir, run)
    if source.is_dir():
        root = source
        items = items_from_folder(source)
    elif source.suffix.lower() == ".txt":
        root = Path(data_dir) if data_dir else run_data_dir(run_dir)
        items = items_from_split_list(source, root)
    else:
        raise InputError(f"{source} is neither a folder nor a split list (.txt)")
    if not items:
        raise InputError(f"{source} names no audio files ({', '.join(AUDIO_SUFFIXES)})")
    name = name or batch_name(source)
    if _SAFE_NAME.search(name) or name.startswith("."):
        raise InputError(f"batch name {name!r} may hold only letters, digits, '.', '_' and '-'")
    predictor = (predictors or PredictorCache(max_runs=1)).get(run_dir)
    logger.info("Predicting %d clips of %s with run %s", len(items), source, run_dir.name)
    records = predict_items(predictor, items, top_k, progress, limits)
    out, metrics_path, stats = write_batch(run_dir, name, source, root, records, predictor.labels)
    summary = {key: stats[key] for key in ("files", "failed", "unlabelled", "count", "accuracy")}
    logger.info("Wrote %s (%s)", out, summary)
    return BatchResult(run=run_dir, name=name, predictions_path=out, metrics_path=metrics_path, summary=summary)


# --- uploaded archives (the API) ---------------------------------------------------------


def looks_like_archive(path: Path, file_name: str | None = None) -> bool:
    """Whether an upload is an archive of clips rather than one clip: by its name, else its first bytes."""
    if file_name and file_name.lower().endswith(ARCHIVE_SUFFIXES):
        return True
    with open(path, "rb") as stream:
        head = stream.read(262)
    return head.startswith((b"PK\x03\x04", b"\x1f\x8b")) or head[257:262] == b"ustar"


def predict_archive(
    predictors: PredictorCache,
    models_dir: Path,
    archive: Path,
    *,
    archive_name: str | None = None,
    run: str | None = None,
    top_k: int = DEFAULT_TOP_K,
    max_files: int,
    max_unpacked_bytes: int | None = None,
    limits: Limits | None = None,
) -> dict[str, Any]:
    """Per-file top-k of the clips in an uploaded archive, unpacked safely into a temp folder
    that is always removed; statistics too when the clips sit in label folders.

    `max_files` is the operator's cap (``SPEECHCLAS_MAX_ARCHIVE_MEMBERS``), checked on the
    archive's headers before anything is unpacked, as is `max_unpacked_bytes` (default: the
    operator's ``SPEECHCLAS_MAX_ARCHIVE_UNPACKED_BYTES`` in `limits`). Archives inside the
    archive are listed with an error, not unpacked.
    """
    if max_unpacked_bytes is None:
        max_unpacked_bytes = (limits or Limits.defaults()).max_archive_unpacked_bytes
    run_dir = find_run(models_dir, run)
    archive_name = archive_name or Path(archive).name
    with tempfile.TemporaryDirectory(prefix="speechclas-batch-") as tmp:
        # extract_archive names its errors after the file: give it the uploaded name.
        named = Path(tmp) / (_SAFE_NAME.sub("_", Path(archive_name).name).strip(".") or "upload")
        named.symlink_to(Path(archive).resolve())
        try:
            # Folders count as members too: allow as many as files, and a few more.
            extract_archive(named, Path(tmp) / "clips", max_total_bytes=max_unpacked_bytes,
                            max_members=2 * max_files + 16, max_files=max_files)
        except TooManyFiles as exc:
            raise ArchiveRefused(
                f"the archive was refused: {exc} (the operator's limit {setting('max_archive_members').env})"
            ) from None
        except ArchiveError as exc:
            raise ArchiveRefused(f"the archive was refused: {exc}") from None
        # As for dataset archives, one wrapping top folder is not a label folder.
        items = items_from_folder(_dataset_root(Path(tmp) / "clips"), nested_archives=True)
        if not items:
            raise ArchiveRefused(f"{archive_name} holds no audio files ({', '.join(AUDIO_SUFFIXES)})")
        predictor = predictors.get(run_dir)
        records = predict_items(predictor, items, top_k, progress=False, limits=limits)
    stats = batch_statistics(records, predictor.labels)
    answer: dict[str, Any] = {"run": run_dir.name, "files": records,
                              "summary": {key: stats[key] for key in ("files", "failed", "unlabelled")}}
    if stats["count"]:
        answer["metrics"] = {key: stats[key] for key in ("count", "accuracy", "labels", "per_class",
                                                         "confusion_matrix")}
    logger.info("Predicted archive %s with run %s: %s", archive_name, run_dir.name, answer["summary"])
    return answer
