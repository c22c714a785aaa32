#!/usr/bin/env bash
# Set up, then run the book.
#   bash tools/book.sh              # execute every chapter with the real model, outputs saved in place
#   bash tools/book.sh 01 03        # only those chapters
#   bash tools/book.sh lab          # open the chapters in JupyterLab instead (127.0.0.1; prints the URL)
# Progress: one line per code cell. A failing chapter is reported in a few lines, its traceback saved
# in logs/book/<chapter>.log, and the next chapter runs; a summary table ends the run (exit status 1
# if a chapter failed). Expensive measurements are cached in data/results/, so a re-run reuses them.
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/env.sh  # choose (or create) the Python environment, and say which
bash tools/setup.sh book  # install into it
if [ -z "${RLSCRATCH_DATA:-}" ] && [ -d ../shared/data ]; then
  export RLSCRATCH_DATA="$(cd ../shared/data && pwd)"
fi
if [ "${1:-}" = "lab" ]; then
  shift
  exec "$RLSCRATCH_PY" tools/book.py lab "$@"
fi
exec "$RLSCRATCH_PY" tools/book.py run "$@"
