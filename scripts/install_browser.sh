#!/usr/bin/env bash
# Installs Debian's chromium, the browser the web page tests drive through
# Playwright (tests/test_web.py launches /usr/bin/chromium; Playwright's own
# browser download needs the internet, this does not).
exec bash "$(dirname "$0")/apt_install.sh" /usr/bin/chromium chromium fonts-dejavu-core
