#!/usr/bin/env bash
# Set up and run every test: unit tests, notebook/package sync, and each chapter notebook under
# nbval in smoke mode (a tiny random-weight model, so a chapter runs in seconds to minutes).
# Same Python environment as tools/book.sh (tools/env.sh says which).
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/env.sh  # choose (or create) the Python environment, and say which
bash tools/setup.sh  # install into it
bash tools/browser.sh  # Chromium for the website check (tests/test_site.py)
if [ -z "${RLSCRATCH_DATA:-}" ] && [ -d ../shared/data ]; then
  export RLSCRATCH_DATA="$(cd ../shared/data && pwd)"
fi
export RLSCRATCH_SMOKE=1
"$RLSCRATCH_PY" -m pytest tests chapters --nbval-lax --nbval-current-env -p no:cacheprovider "$@"
