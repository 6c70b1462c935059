#!/usr/bin/env bash
# Debian packages the test suite needs: Prometheus (prometheus, promtool) for the observability tests; Chromium for
# the chat page test (Playwright drives /usr/bin/chromium); the King James Bible (bible-kjv: the embedded model's
# training text, scripts/train_embedded_model.py) and an English word list (wamerican) for the embedded model tests;
# g++ for the C++ CPU quantized kernels (model/kernels/cpu, built by `make install`).
set -euo pipefail
if command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1 && [ -x /usr/bin/chromium ] \
    && command -v bible >/dev/null 2>&1 && [ -f /usr/share/dict/american-english ] && command -v g++ >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" -eq 0 ]; then
    SUDO=""
elif command -v sudo >/dev/null 2>&1; then
    SUDO="sudo"
else
    echo "install-system-deps: need root (or sudo) to install the Debian packages" \
        "'prometheus chromium bible-kjv wamerican g++'" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends prometheus chromium bible-kjv wamerican g++ >/dev/null
