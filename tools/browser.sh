#!/usr/bin/env bash
# Makes sure Debian's headless browser and its WebDriver are installed (for tests/console.rs):
# installs `chromium` and `chromium-driver` with apt when either is missing (needs root, as
# on CI), then prints both versions. Exits non-zero when they cannot be had.
set -euo pipefail
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "chromium/chromedriver missing and not root: run 'apt-get install chromium chromium-driver'" >&2
    exit 1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
fi
chromium --version
chromedriver --version
