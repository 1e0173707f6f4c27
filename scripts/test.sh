#!/usr/bin/env bash
# The test command: installs what the tests need on a fresh machine (a virtual
# environment with the package and its test extras, Debian's chromium for the
# browser tests, the speech synthesizers for the data tests), then runs the
# linter and the whole test suite.
# Extra arguments go to pytest, e.g. scripts/test.sh -k api -x
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"

if [ -f scripts/install_browser.sh ]; then
    bash scripts/install_browser.sh
fi
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet -e '.[test]'
# espeak-ng, sox, flite and festival: the data tests make demo and held-out voices with them.
"$VENV/bin/python" benchmarks/time_to_accuracy.py --install-tools

export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
"$VENV/bin/ruff" check speechclas tests benchmarks scripts
"$VENV/bin/python" -m pytest "$@"
