#!/usr/bin/env bash
# The main job on a fresh clone: install, train on the shipped demo dataset,
# then serve that model through DEEPaaS (speechclas-serve; Swagger UI on http://127.0.0.1:5000/ui).
#
# Training parameters default to etc/config.yaml; QUICKSTART_TRAIN overrides
# them (key=value words). The default below is the recipe chosen for voices the
# model never heard (benchmarks/time_to_accuracy.py, README "Time to accuracy"):
# a few minutes on 2 CPU cores; QUICKSTART_TRAIN="" trains config.yaml's defaults.
# Its synthetic_voices and unknown_words need espeak-ng, flite and festival (Debian
# packages, installed here by scripts/install_voices.sh with sudo when not root);
# where they cannot be installed, the quick start says so and trains without them.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
HOST="${HOST:-0.0.0.0}"
PORT="${PORT:-5000}"
QUICKSTART_TRAIN="${QUICKSTART_TRAIN-model_architecture=tc_resnet8 preprocess=logmel feature_normalization=dataset speed_perturbation=0.1 pitch_perturbation=0.1 background_snr_db=5,20 gain_db=6 spec_time_masks=2 spec_time_mask_ms=100 spec_freq_masks=2 spec_freq_mask_bins=5 learning_rate_schedule=cosine warmup_steps=100 label_smoothing=0.1 how_many_training_steps=2900,100 learning_rate=0.003,0.00003 synthetic_voices=espeak-ng,flite,festival synthetic_speakers=16 unknown_words=lexicon unknown_word_clips=600 unknown_percentage=25}"

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet -e .

case " $QUICKSTART_TRAIN " in
*" synthetic_voices="*)
    if ! bash scripts/install_voices.sh; then
        echo "warning: espeak-ng, flite and festival could not be installed; training without synthetic_voices" \
             "(the model will be less accurate on voices unlike the demo's; README, 'Time to accuracy')" >&2
        # shellcheck disable=SC2086
        QUICKSTART_TRAIN="$(printf '%s\n' $QUICKSTART_TRAIN | grep -v '^synthetic_\|^unknown_word' | tr '\n' ' ')"
    fi
    ;;
esac

export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
# shellcheck disable=SC2086  # the overrides are meant to split into words
"$VENV/bin/speechclas-train" data_dir=data/demo $QUICKSTART_TRAIN

# deepaas-run with the request body limit derived from SPEECHCLAS_MAX_AUDIO_BYTES.
exec "$VENV/bin/speechclas-serve" --listen-ip "$HOST" --listen-port "$PORT"
