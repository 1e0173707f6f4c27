"""Detection over many recordings: ``speechclas-detect --manifest FILES.txt --out results.jsonl``.

The manifest names one recording a line (a path, relative to the manifest's
folder, or an http(s) URL fetched under the single-file CLI's URL policy);
blank lines and ``#`` comments are skipped. Every recording gets one JSON line
in the results file, written and flushed as it arrives, so a killed job keeps
what it finished: the answer of `speechclas.detect.detect_request` (run,
duration_s, settings, detections) with its ``file``, or ``{"file", "error"}``
for a file that cannot be read. A bad file never ends the job, nor does a
file that kills its worker (out of memory): it gets an error line and the
other files go on.

A job resumes: a file that already has a line (a result or an error) is
skipped; with `retry_errors` its error line is dropped and the file is
detected again. A line that is not a whole JSON object (the last one of a
job killed mid-write) is dropped and its file redone.

The run and the detection settings are resolved once, here, and every worker
loads that run once. Two engines, one recording per task (the lightest way
to scan a stream, see shared/notes/distributed.md):

- ``pool``: worker processes on this machine, started with ``spawn``
  (TensorFlow is not fork-safe), one TensorFlow thread each so N workers use
  N cores, each with a pipe of its own (a worker killed mid-write cannot
  block the others), so the parent knows which file a dead worker held.
- ``ray``: Ray Data's `map_batches` with an actor per worker (the optional
  extra ``speechclas[ray]``), on the cluster of ``RAY_ADDRESS``, else on a
  local Ray of `jobs` CPUs. Its nodes need speechclas, the models folder and
  the recordings at the same paths as here.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from speechclas.detect import DetectSettings, ScorerCache, default_threshold, detect_request
from speechclas.fetch import redact_url
from speechclas.limits import Limits
from speechclas.predict import feature_sizes
from speechclas.rundir import find_run
from speechclas.trainproc import die_with_parent, error_message

logger = logging.getLogger(__name__)

URL_SCHEMES = ("http", "https")
_STOP_GRACE_S = 30.0  # a pool worker told to end is killed after this
RAY_TASK_RETRIES = 2  # a file's task is tried again this often when its actor dies


class ManifestError(ValueError):
    """A job that cannot start as asked (unreadable manifest or results file, bad --jobs, no Ray or
    no connection to its cluster)."""


class JobStopped(RuntimeError):
    """A job that stopped before its end (a worker died or could not load the run); the lines
    written so far are kept, and the same command goes on from there."""


@dataclasses.dataclass(frozen=True)
class DetectOptions:
    """speechclas-detect's options for every file; None keeps the run's default (as detect_request)."""

    max_seconds: float
    max_seconds_setting: str
    run: str | None = None
    threshold: float | None = None
    hop_ms: float | None = None
    average_window_ms: float | None = None
    suppression_ms: float | None = None


@dataclasses.dataclass(frozen=True)
class DetectJob:
    """What every file of a job is detected with, resolved once by the parent and sent to each worker."""

    models_dir: Path
    run: str  # the run folder's name, as `find_run` chose it
    settings: DetectSettings
    limits: Limits
    max_seconds: float
    max_seconds_setting: str


@dataclasses.dataclass(frozen=True)
class Entry:
    """One recording of the manifest: its line (the key of its result line) and where it is."""

    name: str
    source: str  # an absolute path, or an http(s) URL
    is_url: bool = False
    error: str | None = None  # known from the line alone: reported as is, nothing is read


# --- the job's inputs ------------------------------------------------------------------


def read_manifest(path: Path) -> list[Entry]:
    """The recordings a manifest names, in order, each once; ManifestError if it cannot be read."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ManifestError(f"the manifest {path} is not UTF-8 text (one audio path or URL a line)") from None
    except OSError as exc:
        raise ManifestError(f"cannot read the manifest {path}: {exc.strerror or exc}") from None
    base = Path(path).absolute().parent
    entries, seen = [], set()
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or line in seen:
            continue
        seen.add(line)
        entries.append(manifest_entry(line, base))
    return entries


def manifest_entry(line: str, base: Path) -> Entry:
    """A manifest line as an `Entry`: an http(s) URL, or a path taken from `base` when relative."""
    scheme = urlsplit(line).scheme.lower() if "://" in line else ""
    if scheme in URL_SCHEMES:
        return Entry(line, line, is_url=True)
    if scheme:
        return Entry(line, line, error=f"{redact_url(line)}: only http(s) URLs and file paths can be read, "
                                       f"not {scheme}:// URLs")  # fmt: skip
    path = Path(line).expanduser()
    return Entry(line, str(path if path.is_absolute() else base / path))


def plan_job(models_dir: Path, options: DetectOptions, limits: Limits) -> DetectJob:
    """The run and the settings for every file, as `detect_request` derives them, so that a bad
    option or a missing model is refused before any worker starts (RunNotFoundError, DetectError)."""
    run_dir = find_run(models_dir, options.run)
    features = feature_sizes(run_dir)
    threshold = options.threshold if options.threshold is not None else default_threshold(run_dir)
    settings = DetectSettings.for_features(features, hop_ms=options.hop_ms, threshold=threshold,
                                           average_window_ms=options.average_window_ms,
                                           suppression_ms=options.suppression_ms)  # fmt: skip
    settings.hop_frames(features.window_stride_samples, features.sample_rate)
    return DetectJob(run_dir.root.parent, run_dir.name, settings, limits, options.max_seconds,
                     options.max_seconds_setting)  # fmt: skip


def previous_results(path: Path, retry_errors: bool) -> tuple[set[str], list[str], int]:
    """(files answered, lines to keep, lines dropped) of an earlier job's results file.

    Dropped: a line that is not a whole JSON object naming its ``file`` (the last
    one of a job killed mid-write, which has no newline yet), a second line of
    the same file, and with `retry_errors` the error lines.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return set(), [], 0
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(f"cannot read the results file {path} to resume from it: {exc}") from None
    *complete, partial = text.split("\n")  # json.dumps never writes a raw newline inside a line
    done, kept = set(), []
    for line in complete:
        record = _record(line)
        if record is None or record["file"] in done or (retry_errors and "error" in record):
            continue
        done.add(record["file"])
        kept.append(line)
    dropped = len(complete) - len(kept) + bool(partial)
    if partial:
        logger.warning("%s: its last line is incomplete (a job stopped while writing it); its file is done again",
                       path)  # fmt: skip
    return done, kept, dropped


def _record(line: str) -> dict[str, Any] | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) and isinstance(record.get("file"), str) else None


def _open_results(path: Path, kept: list[str], dropped: int):
    """The results file open for appending; rewritten first (atomically) without its dropped lines."""
    path = Path(path)
    try:
        if dropped:
            temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            temporary.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")
            os.replace(temporary, path)
        return path.open("a", encoding="utf-8")
    except OSError as exc:
        raise ManifestError(f"cannot write the results file {path}: {exc.strerror or exc}") from None


# --- a worker: the run loaded once, one entry at a time ---------------------------------


def limit_tensorflow_threads() -> None:
    """One TensorFlow thread per pool of this process, so N workers share N cores instead of
    each starting a pool as large as the machine. Only before TensorFlow's first op."""
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(1)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError as exc:  # TensorFlow already ran here (a reused process): keep its threads
        logger.warning("TensorFlow's thread counts are already set in process %d: %s", os.getpid(), exc)


class Detector:
    """A worker's model, loaded once when it starts, and detection in one entry at a time."""

    def __init__(self, job: DetectJob):
        limit_tensorflow_threads()
        self.job = job
        self.scorers = ScorerCache(max_runs=1)
        self.scorers.get(find_run(job.models_dir, job.run))  # detect_request finds it loaded

    def __call__(self, entry: Entry) -> dict[str, Any]:
        """The entry's result line, or its error line: never an exception, so one file never ends a job."""
        job, settings = self.job, self.job.settings
        try:
            result = detect_request(
                self.scorers,
                job.models_dir,
                file=None if entry.is_url else Path(entry.source),
                file_name=entry.name,
                url=entry.source if entry.is_url else None,
                run=job.run,
                threshold=settings.threshold,
                hop_ms=settings.hop_ms,
                average_window_ms=settings.average_window_ms,
                suppression_ms=settings.suppression_ms,
                limits=job.limits,
                max_seconds=job.max_seconds,
                max_seconds_setting=job.max_seconds_setting,
            )
        except Exception as exc:  # every failure becomes that file's error line
            if not isinstance(exc, (ValueError, LookupError, OSError)):
                logger.exception("Unexpected error detecting in %s", redact_url(entry.name))
            return {"file": entry.name, "error": error_message(exc)}
        return {"file": entry.name, **result}


# --- engines: entries in, result lines out as they finish --------------------------------


def _pool_worker(job: DetectJob, connection, parent_pid: int) -> None:
    """A spawned worker process: the run loaded once ("ready"), then a line for each entry sent, until None."""
    die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it stops the workers
    try:
        detector = Detector(job)
    except Exception as exc:  # the parent stops the job with this message
        connection.send(("failed", f"a worker could not load run {job.run}: {error_message(exc)}"))
        return
    connection.send(("ready", None))
    for entry in iter(connection.recv, None):
        connection.send(("done", detector(entry)))


class _PoolWorker:
    """A spawned worker process, its pipe, and the entry it is detecting in (one at a time)."""

    def __init__(self, context, job: DetectJob):
        self.connection, child = context.Pipe()
        self.process = context.Process(target=_pool_worker, args=(job, child, os.getpid()), daemon=True,
                                       name="speechclas-detect-worker")  # fmt: skip
        self.process.start()
        child.close()  # the child holds the only other end: its death reads as EOF here
        self.ready = False
        self.entry: Entry | None = None

    def send(self, entries: Iterator[Entry]) -> None:
        self.entry = next(entries, None)
        if self.entry is not None:
            self.connection.send(self.entry)

    def receive(self) -> tuple[str, Any]:
        """The worker's next message, or ("died", how) once it has ended."""
        try:
            return self.connection.recv()
        except (EOFError, OSError):
            self.process.join()
            return "died", _how_it_ended(self.process.exitcode)

    def stop(self, finished: bool) -> None:
        """Finished: told to end and waited for; else (a job stopped early) killed."""
        if finished and self.process.is_alive():
            try:
                self.connection.send(None)
            except OSError:
                pass
            self.process.join(timeout=_STOP_GRACE_S)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.connection.close()


def _how_it_ended(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        name = signal.Signals(-exitcode).name if -exitcode in signal.valid_signals() else "unknown"
        hint = ", often out of memory" if -exitcode == signal.SIGKILL else ""
        return f"was killed by signal {-exitcode} ({name}{hint})"
    return f"ended with exit code {exitcode}"


def pool_results(job: DetectJob, entries: list[Entry], jobs: int | None) -> Iterator[dict[str, Any]]:
    """Result lines from `jobs` spawned worker processes (default: the CPUs this process may use).

    A worker that dies while detecting in a file (killed, out of memory) makes that
    file an error line and is replaced; one that dies or fails before its run is
    loaded stops the job (JobStopped), as every other would.
    """
    jobs = min(jobs or available_cpus(), len(entries))
    if not jobs:
        return
    context = multiprocessing.get_context("spawn")
    logger.info("Detecting in %d files with %d worker processes", len(entries), jobs)
    waiting = iter(entries)
    workers: list[_PoolWorker] = []
    finished = False
    try:
        for _ in range(jobs):
            workers.append(_PoolWorker(context, job))
            workers[-1].send(waiting)  # read once its run is loaded
        while busy := [worker for worker in workers if worker.entry is not None]:
            for connection in multiprocessing.connection.wait([worker.connection for worker in busy]):
                worker = next(worker for worker in busy if worker.connection is connection)
                status, value = worker.receive()
                if status == "ready":
                    worker.ready = True
                elif status == "done":
                    worker.send(waiting)
                    yield value
                elif status == "failed" or not worker.ready:
                    raise JobStopped(value if status == "failed" else f"a worker process {value} while it loaded "
                                     f"run {job.run}")  # fmt: skip
                else:  # died in a file: that file's error line, and a new worker for the rest
                    yield {"file": worker.entry.name, "error": f"the worker process detecting in this file {value}; "
                                                               "a new one went on with the other files"}  # fmt: skip
                    workers.remove(worker)
                    workers.append(_PoolWorker(context, job))
                    workers[-1].send(waiting)
        finished = True
    finally:
        for worker in workers:
            worker.stop(finished)


class RayDetector:
    """Ray Data's callable class: one `Detector` per actor, a batch of entries to their lines (JSON)."""

    def __init__(self, job: DetectJob):
        self.detector = Detector(job)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        lines = [json.dumps(self.detector(Entry(str(name), str(source), bool(is_url))), ensure_ascii=False)
                 for name, source, is_url in zip(batch["name"], batch["source"], batch["is_url"], strict=True)]  # fmt: skip
        return {"line": np.array(lines, dtype=object)}


def ray_results(job: DetectJob, entries: list[Entry], jobs: int | None) -> Iterator[dict[str, Any]]:
    """Result lines from Ray Data, `jobs` actors of one CPU each (default: the cluster's CPUs).

    Connects to ``RAY_ADDRESS`` when set, else starts a local Ray of `jobs` CPUs;
    disconnects (a local Ray: shuts it down) at the end.
    """
    if not entries:
        return
    try:
        import ray
        import ray.data
    except ImportError:
        raise ManifestError("--engine ray needs Ray: pip install 'speechclas[ray]'") from None
    address = os.environ.get("RAY_ADDRESS", "").strip()
    started = not ray.is_initialized()
    if started and address:
        logger.info("Connecting to the Ray cluster at %s (RAY_ADDRESS)", redact_url(address))
        try:
            ray.init(address=address, logging_level=logging.WARNING)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise ManifestError(f"cannot connect to the Ray cluster at {redact_url(address)} (RAY_ADDRESS): "
                                f"{exc}") from None  # fmt: skip
    elif started:
        ray.init(address="local", num_cpus=jobs or available_cpus(), include_dashboard=False,
                 logging_level=logging.WARNING)  # fmt: skip
    try:
        actors = min(jobs or max(1, int(ray.cluster_resources().get("CPU", 1))), len(entries))
        logger.info("Detecting in %d files with %d Ray actors", len(entries), actors)
        rows = [{"name": entry.name, "source": entry.source, "is_url": entry.is_url} for entry in entries]
        # Ray restarts a dead actor and retries its task; a file whose task fails every time (it kills
        # the actor: out of memory) is dropped by Ray Data and answered here, as the pool answers it.
        with warnings.catch_warnings():  # max_task_retries has no named parameter yet (setup.py caps Ray below 2.64)
            warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
            dataset = ray.data.from_items(rows, override_num_blocks=len(rows)).map_batches(
                RayDetector, fn_constructor_kwargs={"job": job}, batch_size=1, num_cpus=1,
                compute=ray.data.ActorPoolStrategy(size=actors), max_task_retries=RAY_TASK_RETRIES,
            )  # fmt: skip
        dataset.context.max_errored_blocks = -1
        answered = set()
        for row in dataset.iter_rows():
            record = json.loads(row["line"])
            answered.add(record["file"])
            yield record
        for entry in entries:
            if entry.name not in answered:
                yield {"file": entry.name, "error": f"the Ray task detecting in this file failed "
                                                    f"{1 + RAY_TASK_RETRIES} times (its actor died: killed, "
                                                    "out of memory?)"}  # fmt: skip
    finally:
        if started:
            ray.shutdown()


ENGINES: dict[str, Callable[[DetectJob, list[Entry], int | None], Iterable[dict[str, Any]]]] = {
    "pool": pool_results,
    "ray": ray_results,
}


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity, which containers narrow), else all."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


# --- the job ------------------------------------------------------------------------------


def detect_manifest(
    manifest: Path,
    out: Path,
    models_dir: Path,
    options: DetectOptions,
    *,
    limits: Limits,
    jobs: int | None = None,
    engine: str = "pool",
    retry_errors: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Detect in every recording of `manifest` that `out` does not answer yet, one line each
    appended to `out`; the job's summary. Raises ManifestError, RunNotFoundError and
    DetectError before anything is detected, JobStopped if the job stops before its end."""
    started = time.monotonic()
    if engine not in ENGINES:
        raise ManifestError(f"unknown engine {engine!r}; one of {', '.join(ENGINES)}")
    if jobs is not None and jobs < 1:
        raise ManifestError(f"--jobs must be at least 1, got {jobs}")
    entries = read_manifest(manifest)
    job = plan_job(models_dir, options, limits)
    done, kept, dropped = previous_results(out, retry_errors)
    pending = [entry for entry in entries if entry.name not in done]
    summary = {"out": str(out), "run": job.run, "files": len(entries), "skipped": len(entries) - len(pending),
               "done": 0, "errors": 0, "detections": 0, "audio_s": 0.0}  # fmt: skip
    logger.info("%s: %d files, %d already in %s, run %s, threshold %g",
                manifest, len(entries), summary["skipped"], out, job.run, job.settings.threshold)  # fmt: skip
    with _open_results(out, kept, dropped) as stream:

        def write(record: dict[str, Any]) -> None:
            stream.write(json.dumps(record, ensure_ascii=False) + "\n")
            stream.flush()  # a killed job keeps every line it finished
            summary["done"] += 1
            if "error" in record:
                summary["errors"] += 1
                logger.warning("%s", record["error"])
            else:
                summary["detections"] += len(record["detections"])
                summary["audio_s"] += record["duration_s"]

        for entry in pending:
            if entry.error is not None:
                write({"file": entry.name, "error": entry.error})
        to_detect = [entry for entry in pending if entry.error is None]
        for record in _progress(ENGINES[engine](job, to_detect, jobs), len(to_detect), progress):
            write(record)
    summary["audio_s"] = round(summary["audio_s"], 3)
    summary["seconds"] = round(time.monotonic() - started, 3)
    logger.info("Done in %.1f s: %d files (%d errors; %d detections in %.1f s of audio), %d skipped as already "
                "in %s", summary["seconds"], summary["done"], summary["errors"], summary["detections"],
                summary["audio_s"], summary["skipped"], out)  # fmt: skip
    return summary


def _progress(records: Iterable[dict[str, Any]], total: int, shown: bool) -> Iterable[dict[str, Any]]:
    if not shown or not total:
        return records
    from tqdm import tqdm

    return tqdm(records, total=total, unit="file", desc="Detecting", leave=False)
