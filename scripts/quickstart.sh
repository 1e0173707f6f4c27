#!/usr/bin/env bash
# The main job on a fresh clone: install, train on the shipped demo dataset,
# then serve that model through DEEPaaS (speechclas-serve; Swagger UI on http://127.0.0.1:5000/ui).
#
# Training parameters default to etc/config.yaml; QUICKSTART_TRAIN overrides
# them (key=value words). The default below is a CPU-friendly run of a few
# minutes; unset it (QUICKSTART_TRAIN="") for the full recipe.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
HOST="${HOST:-0.0.0.0}"
PORT="${PORT:-5000}"
QUICKSTART_TRAIN="${QUICKSTART_TRAIN-model_architecture=ds_cnn how_many_training_steps=600,200 learning_rate=0.001,0.0001}"

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet -e .

export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
# shellcheck disable=SC2086  # the overrides are meant to split into words
"$VENV/bin/speechclas-train" data_dir=data/demo $QUICKSTART_TRAIN

# deepaas-run with the request body limit derived from SPEECHCLAS_MAX_AUDIO_BYTES.
exec "$VENV/bin/speechclas-serve" --listen-ip "$HOST" --listen-port "$PORT"
