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
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
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


def train_summary(config: Config, limits: Limits) -> dict[str, Any]:
    """Train as an API training, within the operator's `limits`, and answer the run's summary
    (the work of a training process)."""
    from speechclas.tracking import tracker_from_env
    from speechclas.train import train  # TensorFlow, in the training process only

    tracker = tracker_from_env(os.environ, limits.mlflow_model_name)
    return train(config, progress=False, limits=limits, tracker=tracker, confined=True).summary()


def train_in_process(config: Config, limits: Limits) -> dict[str, Any]:
    """`train_summary` in a process of its own; TrainingProcessError if it fails or dies."""
    return run_in_process(train_summary, config, limits, what="training")
