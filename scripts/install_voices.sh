#!/usr/bin/env bash
# Installs the speech synthesis engines that the `synthetic_voices` training
# parameter uses (speechclas/voices.py, ENGINE_PROGRAMS): espeak-ng, flite, and
# festival with its English voices. Safe to run twice.
set -euo pipefail
here="$(dirname "$0")"
bash "$here/apt_install.sh" espeak-ng espeak-ng
bash "$here/apt_install.sh" flite flite
bash "$here/apt_install.sh" text2wave festival festvox-kallpc16k festvox-kdlpc16k festvox-us-slt-hts
