#!/usr/bin/env bash
# Set up and run the book.
#   bash tools/book.sh          # execute every chapter headlessly with the real model, outputs saved in place
#   bash tools/book.sh lab      # open the chapters in JupyterLab instead
# Expensive measurements are cached in data/results/, so a re-run reuses them.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh book
if [ -z "${RLSCRATCH_DATA:-}" ] && [ -d ../shared/data ]; then
  export RLSCRATCH_DATA="$(cd ../shared/data && pwd)"
fi
if [ "${1:-}" = "lab" ]; then
  exec python -m jupyter lab chapters/
fi
for nb in chapters/[0-9][0-9]_*.ipynb; do
  echo "== $nb"
  python tools/export.py >/dev/null  # the package matches the notebooks before each chapter imports it
  python -m jupyter nbconvert --to notebook --execute --inplace --ExecutePreprocessor.timeout=-1 "$nb"
  python -m jupytext --sync "$nb" >/dev/null
done
python tools/export.py
