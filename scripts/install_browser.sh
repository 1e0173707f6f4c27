#!/usr/bin/env bash
# Installs Debian's chromium, the browser the web page tests drive through
# Playwright (tests/test_web.py launches /usr/bin/chromium; Playwright's own
# browser download needs the internet, this does not).
# It does nothing when /usr/bin/chromium exists, so it is safe to run twice.
# Uses sudo only when not root and sudo exists.
set -euo pipefail

if [ -x /usr/bin/chromium ]; then
    echo "chromium is already installed: $(/usr/bin/chromium --version 2>/dev/null || echo /usr/bin/chromium)"
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "error: apt-get not found; install chromium at /usr/bin/chromium with your package manager" >&2
    exit 1
fi

if [ "$(id -u)" -eq 0 ]; then
    SUDO=""
elif command -v sudo >/dev/null 2>&1; then
    SUDO="sudo"
else
    echo "error: installing chromium needs root, and sudo is not available" >&2
    exit 1
fi

$SUDO env DEBIAN_FRONTEND=noninteractive apt-get update
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium fonts-dejavu-core

/usr/bin/chromium --version
