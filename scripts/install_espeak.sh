#!/usr/bin/env bash
# Installs the espeak-ng speech synthesizer that scripts/make_demo_data.py needs.
# It does nothing when espeak-ng is already on PATH, so it is safe to run twice.
# Uses sudo only when not root and sudo exists (Debian/Ubuntu images, apt-get).
set -euo pipefail

if command -v espeak-ng >/dev/null 2>&1; then
    echo "espeak-ng is already installed: $(command -v espeak-ng)"
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "error: apt-get not found; install espeak-ng with your package manager" >&2
    exit 1
fi

if [ "$(id -u)" -eq 0 ]; then
    SUDO=""
elif command -v sudo >/dev/null 2>&1; then
    SUDO="sudo"
else
    echo "error: installing espeak-ng needs root, and sudo is not available" >&2
    exit 1
fi

$SUDO env DEBIAN_FRONTEND=noninteractive apt-get update
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y espeak-ng

command -v espeak-ng
