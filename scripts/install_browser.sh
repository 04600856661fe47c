#!/usr/bin/env bash
# Browser for tests/test_browser.py: Debian chromium (/usr/bin/chromium) + Python Playwright.
# Never `playwright install`: the test drives the system chromium through executable_path.
set -euo pipefail
if ! command -v chromium >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update
  $SUDO apt-get install -y --no-install-recommends chromium
fi
python -m pip install "playwright==1.65.2"
chromium --version
python -c "import playwright; from importlib.metadata import version; print('playwright', version('playwright'))"
