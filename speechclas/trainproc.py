"""A training in a process of its own, so that its death never takes its caller down.

A DEEPaaS worker that runs a training itself dies with it when the kernel's
out-of-memory killer (or an operator's kill -9) ends it, and DEEPaaS 2.6 then
never answers that worker's requests again. So the worker only starts and
watches: `run_in_process` runs the work in a spawned child and hands back its
result, its error message, or how the child died, always as a plain value or a
`TrainingProcessError`. The caller survives and goes on serving.

The child never outlives its parent: on Linux it asks the kernel for SIGKILL
when the parent dies (``PR_SET_PDEATHSIG``), so a worker that DEEPaaS kills to
cancel a training, or ends at shutdown, takes the training with it. A killed
training leaves its run folder without the DONE marker, so it is never served.

An API training tells how far it is in a small JSON file of its own
(`TrainingProgress`): its phase (preparing, training, evaluating), its step and
run folder. The worker creates it, the training process keeps it up to date,
the worker removes it when the training ends; `running_trainings` reads them
for ``get_metadata``, which DEEPaaS runs in its main process.
"""

from __future__ import annotations

import ctypes
import dataclasses
import datetime as dt
import json
import logging
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from speechclas.config import Config
from speechclas.limits import Limits

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
_EXIT_GRACE_S = 60
_UNFINISHED = "Its run folder is left unfinished and is never served."


class TrainingProcessError(RuntimeError):
    """The work in the child failed, or the child was killed or crashed; the message says which."""


def error_message(exc: BaseException) -> str:
    """What a caller is told of an error: the message alone for the errors a user causes
    (a missing folder, a bad value, too few clips), the type too for anything else."""
    if isinstance(exc, (ValueError, LookupError, OSError)):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def run_in_process(function: Callable[..., Any], *args: Any, what: str = "training") -> Any:
    """``function(*args)`` in a spawned child process; its result, or TrainingProcessError.

    `function` and `args` are pickled (a module-level function, by reference);
    so is the result. Linux ties the child's death signal to the calling
    thread, not its process: call this from a thread that lives as long as the
    work (a DEEPaaS worker runs ``train`` in its main thread).
    """
    _remove_orphaned_temp_dirs(what)
    # The child's temp files (TensorFlow's autograph writes some) go to a folder of its own,
    # removed when it ends however it ends; one left by a killed worker is removed next time.
    temp_dir = tempfile.mkdtemp(prefix=f"speechclas-{what}-{os.getpid()}-")
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(
        target=_child_main, args=(sender, os.getpid(), temp_dir, function, args), name=f"speechclas-{what}",
        daemon=False,
    )
    process.start()
    sender.close()  # the child holds the only writing end: reading hits EOF once it is gone
    logger.info("The %s runs in process %d", what, process.pid)
    try:
        try:
            outcome = receiver.recv()
        except EOFError:  # died without a word: killed or crashed
            outcome = None
        process.join(timeout=_EXIT_GRACE_S if outcome is not None else None)
        if process.is_alive():  # the result is in; a child stuck in its interpreter's exit is not waited for
            logger.warning("Process %d did not exit %d s after its result; killing it", process.pid, _EXIT_GRACE_S)
            process.kill()
            process.join()
    except BaseException:  # the caller is interrupted (Ctrl-C, SystemExit): take the child along
        process.kill()
        process.join()
        raise
    finally:
        receiver.close()
        shutil.rmtree(temp_dir, ignore_errors=True)
    if outcome is None:
        message = _death_message(what, process.exitcode)
        logger.error("Process %d: %s", process.pid, message)
        raise TrainingProcessError(message)
    status, value = outcome
    if status == "error":
        raise TrainingProcessError(value)
    return value


def _death_message(what: str, exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        number = -exitcode
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = "unknown"
        hint = " — out of memory?" if number == signal.SIGKILL else "."
        return f"the {what} process was killed by signal {number} ({name}){hint} {_UNFINISHED}"
    return f"the {what} process crashed: it ended with exit code {exitcode} and no result. {_UNFINISHED}"


def _remove_orphaned_temp_dirs(what: str) -> None:
    """Temp folders of children whose parent (a worker killed by a cancel) is gone."""
    for folder in Path(tempfile.gettempdir()).glob(f"speechclas-{what}-*-*"):
        pid = folder.name.split("-")[2]
        if pid.isdigit() and not _is_alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _child_main(sender, parent_pid: int, temp_dir: str, function: Callable[..., Any], args: tuple) -> None:
    die_with_parent(parent_pid)
    os.environ["TMPDIR"] = temp_dir
    tempfile.tempdir = temp_dir
    if not logging.getLogger().handlers:  # a spawned process starts with no logging configured
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        outcome = ("ok", function(*args))
    except KeyboardInterrupt:
        outcome = ("error", f"the process was interrupted (SIGINT). {_UNFINISHED}")
    except Exception as exc:
        logger.exception("Failed in process %d", os.getpid())
        outcome = ("error", error_message(exc))
    sender.send(outcome)
    sender.close()


def die_with_parent(parent_pid: int) -> None:
    """Ask Linux to SIGKILL this process when its parent dies; elsewhere, do without."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        failed = libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0
    except (OSError, AttributeError):
        failed = True
    if failed:
        logger.warning("Could not tie process %d to its parent: it may outlive it", os.getpid())
    if os.getppid() != parent_pid:  # the parent died before the request took effect
        os._exit(1)


# --- the progress of API trainings -------------------------------------------------------

PROGRESS_EVERY_S = 0.5  # the training process writes its step at most this often
PHASES = ("preparing", "training", "evaluating")


def progress_dir() -> Path:
    """Where API trainings keep their progress files: one folder per user in the temp folder,
    shared by every server of that user (each lists its own trainings, `running_trainings`)."""
    user = os.getuid() if hasattr(os, "getuid") else "user"
    return Path(tempfile.gettempdir()) / f"speechclas-progress-{user}"


@dataclasses.dataclass
class TrainingProgress:
    """The progress file of one API training, ``<progress_dir>/<worker pid>.json``.

    The worker (a DEEPaaS worker runs one training at a time) creates it in phase
    ``preparing`` (indexing the data, the engines saying the words of a text_only
    training, decoding shards), hands it to the training process, which sets its
    run once the run folder exists (phase ``training``), its step as the steps
    end (`on_step`, written at most every `every_s`), and phase
    ``evaluating`` after the last step (final evaluation, exports, streaming
    evaluation); the worker removes it when the training ends, however it ends.
    Each write replaces the file whole (``os.replace``), so a reader never sees
    half of one. It records the worker's process id and its parent's (the
    server's), and the training process' once it runs: a file whose processes are
    gone (a worker killed by a cancel) is stale, and `running_trainings` removes it.
    Writing never fails a training: an error is logged once and writing stops.
    """

    path: Path
    state: dict[str, Any]
    every_s: float = PROGRESS_EVERY_S
    _written: float = 0.0
    _broken: bool = False

    @classmethod
    def start(cls, config: Config, folder: Path | None = None) -> TrainingProgress:
        """The progress file of the training `config` that this process is about to start."""
        folder = folder or progress_dir()
        now = time.time()
        state = {
            "pid": os.getpid(), "server": os.getppid(), "child": None,
            "run": None, "phase": "preparing", "step": 0, "total": int(sum(config.how_many_training_steps)),
            "started": dt.datetime.fromtimestamp(now).astimezone().isoformat(timespec="seconds"),
            "started_at": now, "wanted_words": list(config.wanted_words),
        }  # fmt: skip
        progress = cls(folder / f"{os.getpid()}.json", state)
        try:
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            progress._give_up(exc)
        progress.write()
        return progress

    def in_child(self) -> None:
        """Record the training process' id (called there, first)."""
        self.update(child=os.getpid())

    def on_run(self, run) -> None:
        """The run folder exists: the data is ready and the steps begin."""
        self.update(run=run.name, phase="training")

    def on_step(self, done: int, total: int) -> None:
        """`speechclas.train.train`'s on_step: written at most every `every_s`, and after the last step."""
        last = done >= total
        if not last and time.monotonic() - self._written < self.every_s:
            self.state.update(step=done, total=total)
            return
        self.update(step=done, total=total, phase="evaluating" if last else "training")

    def update(self, **changes: Any) -> None:
        self.state.update(changes)
        self.write()

    def write(self) -> None:
        if self._broken:
            return
        temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            temporary.write_text(json.dumps(self.state))
            os.replace(temporary, self.path)
        except OSError as exc:
            self._give_up(exc)
        self._written = time.monotonic()

    def remove(self) -> None:
        """The training has ended: its file goes, with what a killed writer left half written."""
        for path in (self.path, *self.path.parent.glob(f".{self.path.name}.*.tmp")):
            path.unlink(missing_ok=True)

    def _give_up(self, exc: OSError) -> None:
        logger.warning("Cannot write the training's progress to %s (%s): it is not reported", self.path, exc)
        self._broken = True


def running_trainings(folder: Path | None = None) -> list[dict[str, Any]]:
    """The API trainings that this process runs, or its workers run (a DEEPaaS server's main
    process answers ``get_metadata`` for all its workers), oldest first: each one's run (null
    until its run folder exists), phase, step and total steps, start (ISO 8601), elapsed
    seconds and wanted words. Another server's trainings are not listed, nor one whose worker
    or training process is gone; a file whose worker is gone (killed by a cancel) is removed."""
    folder = folder or progress_dir()
    found = []
    for path in folder.glob("*.json") if folder.is_dir() else ():
        try:
            state = json.loads(path.read_text())
            pid, server, child = state["pid"], state["server"], state.get("child")
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not one of ours, or removed as we read
        if not all(isinstance(p, int) and p > 0 for p in (pid, server, child if child is not None else 1)):
            continue
        if not _is_running(pid) or (child is not None and not _is_running(child)):
            if not _is_alive(pid):  # a worker killed by a cancel left it
                path.unlink(missing_ok=True)
            continue
        if os.getpid() not in (pid, server):
            continue
        found.append({
            "run": state.get("run"), "phase": state.get("phase"), "step": state.get("step"),
            "total": state.get("total"), "started": state.get("started"),
            "elapsed_s": round(max(0.0, time.time() - float(state.get("started_at", time.time()))), 1),
            "wanted_words": state.get("wanted_words"),
        })  # fmt: skip
    return sorted(found, key=lambda training: -training["elapsed_s"])


def _is_running(pid: int) -> bool:
    """Alive and not a zombie (a killed process that no one has waited for yet)."""
    if not _is_alive(pid):
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc: alive is all we know
    return stat[stat.rindex(")") + 2 :].split(" ", 1)[0] not in ("Z", "X")


# --- API trainings ------------------------------------------------------------------------


def train_summary(config: Config, limits: Limits, progress: TrainingProgress | None = None) -> dict[str, Any]:
    """Train as an API training, within the operator's `limits`, and answer the run's summary
    (the work of a training process); `progress`, if given, is kept up to date."""
    from speechclas.tracking import tracker_from_env
    from speechclas.train import train  # TensorFlow, in the training process only

    tracker = tracker_from_env(os.environ, limits.mlflow_model_name)
    hooks = {}
    if progress is not None:
        progress.in_child()
        hooks = {"on_step": progress.on_step, "on_run": progress.on_run}
    return train(config, progress=False, limits=limits, tracker=tracker, confined=True, **hooks).summary()


def train_in_process(config: Config, limits: Limits, progress_folder: Path | None = None) -> dict[str, Any]:
    """`train_summary` in a process of its own; TrainingProcessError if it fails or dies.
    Its progress is reported in `progress_folder` (default `progress_dir`) while it runs."""
    progress = TrainingProgress.start(config, progress_folder)
    try:
        return run_in_process(train_summary, config, limits, progress, what="training")
    finally:
        progress.remove()
