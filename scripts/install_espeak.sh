#!/usr/bin/env bash
# Installs the espeak-ng speech synthesizer that scripts/make_demo_data.py needs.
exec bash "$(dirname "$0")/apt_install.sh" espeak-ng espeak-ng
