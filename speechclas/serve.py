"""``speechclas-serve``: ``deepaas-run`` with an HTTP body limit derived from the upload limit.

DEEPaaS sets no limit on a request body by default, and the upload check of
the API runs only after aiohttp has stored the whole body, so a form field
of gigabytes would be held in the server's memory. This command runs
``deepaas-run --client-max-size N`` with N = `Limits.client_max_size` (the
operator's ``SPEECHCLAS_MAX_AUDIO_BYTES`` plus room for the form around it),
so a larger body gets a 413 before it is stored. Every other argument goes to
``deepaas-run`` unchanged (``--help`` shows its options).

A ``--client-max-size`` given by the user may raise the limit, never lower
it below N: a smaller one would answer 413 to uploads the API accepts, and 0
(no limit at all) is what this command exists to prevent. Either is refused.
To change the limit, set ``SPEECHCLAS_MAX_AUDIO_BYTES``.

The process replaces itself with ``deepaas-run`` (``exec``), so signals from
a terminal, Docker or systemd reach DEEPaaS directly.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from speechclas.limits import Limits, OperatorSettingError, setting

logger = logging.getLogger(__name__)

OPTION = "--client-max-size"


class ServeError(ValueError):
    """Arguments that would serve without the body limit; the message says which and why."""


def deepaas_arguments(argv: Sequence[str], limits: Limits) -> list[str]:
    """The arguments for ``deepaas-run``: `argv` with ``--client-max-size`` set to at least the limit."""
    required = limits.client_max_size()
    passed: list[str] = []
    chosen = required
    arguments = iter(argv)
    for argument in arguments:
        if argument == OPTION or argument.startswith(OPTION + "="):
            raw = argument.partition("=")[2] if "=" in argument else next(arguments, "")
            chosen = max(chosen, _checked_size(raw, required, limits))
        else:
            passed.append(argument)
    # Last, so that it also wins over an abbreviation (--client-max) that argparse would accept.
    return [*passed, OPTION, str(chosen)]


def _checked_size(raw: str, required: int, limits: Limits) -> int:
    try:
        size = int(raw)
    except ValueError:
        raise ServeError(f"{OPTION} must be a whole number of bytes, got {raw!r}") from None
    if size < required:
        env, detect_env = setting("max_audio_bytes").env, setting("detect_max_audio_bytes").env
        raise ServeError(
            f"{OPTION} {size} is below the {required} bytes an upload of {env}={limits.max_audio_bytes} "
            f"bytes (or, for mode=detect, {detect_env}={limits.detect_max_audio_bytes}) needs with its form"
            f"{' (0 would mean no limit at all)' if size == 0 else ''}; leave {OPTION} out, or change {env}"
            f" and {detect_env}"
        )
    return size


def deepaas_executable() -> str:
    """``deepaas-run`` of this interpreter's environment (the venv's bin/), else the one on PATH."""
    beside = Path(sys.executable).parent / "deepaas-run"
    if beside.is_file():
        return str(beside)
    found = shutil.which("deepaas-run")
    if found is None:
        raise ServeError("deepaas-run is not installed (pip install deepaas)")
    return found


def main(argv: list[str] | None = None) -> int:
    """Replace this process with ``deepaas-run`` and its body limit; 2 for refused arguments."""
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        limits = Limits.from_env()
        arguments = deepaas_arguments(argv, limits)
        executable = deepaas_executable()
    except (ServeError, OperatorSettingError) as exc:
        logger.error("%s", exc)
        return 2
    logger.info("Starting %s with a request body limit of %s bytes", executable, arguments[-1])
    os.execv(executable, [executable, *arguments])
    return 0  # not reached: exec replaces this process


if __name__ == "__main__":
    sys.exit(main())
