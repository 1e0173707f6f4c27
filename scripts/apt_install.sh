#!/usr/bin/env bash
# apt_install.sh PROGRAM PACKAGE...: installs Debian PACKAGEs unless PROGRAM
# (a command name or a path) is already there, so it is safe to run twice.
# Uses sudo only when not root and sudo exists.
set -euo pipefail

program="$1"
shift
if command -v "$program" >/dev/null 2>&1 || { [[ "$program" == */* ]] && [ -e "$program" ]; }; then
    echo "$program is already installed"
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "error: apt-get not found; install $* with your package manager" >&2
    exit 1
fi
if [ "$(id -u)" -eq 0 ]; then
    SUDO=""
elif command -v sudo >/dev/null 2>&1; then
    SUDO="sudo"
else
    echo "error: installing $* needs root, and sudo is not available" >&2
    exit 1
fi
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get update
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$@"
