#!/usr/bin/env bash
# Chromium for the website check in tests/test_site.py: Debian's package, installed with apt-get when it
# is missing and we are root (as in CI). Never stops the test run: without a browser, that test fails
# (in CI, or as root) or is skipped (elsewhere), and says why.
set -uo pipefail
if command -v chromium >/dev/null || command -v chromium-browser >/dev/null || [ -n "${RLSCRATCH_CHROMIUM:-}" ]; then
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "tools/browser.sh: no chromium and no way to install it here (needs root and apt-get)" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
echo "tools/browser.sh: installing chromium (apt-get)"
apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1 \
  || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends chromium >/dev/null; } \
  || echo "tools/browser.sh: apt-get could not install chromium; tests/test_site.py will fail" >&2
exit 0
