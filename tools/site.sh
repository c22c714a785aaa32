#!/usr/bin/env bash
# Build the book as a static website (Jupyter Book 1.x) from the notebooks' stored outputs (nothing is
# executed), warnings as errors. Configuration: book/_config.yml and book/_toc.yml.
#   bash tools/site.sh              # -> build/site/_build/html/index.html (git-ignored)
#   bash tools/site.sh OUT_DIR      # -> OUT_DIR/_build/html/
# Sets up first (tools/setup.sh) when jupyter-book is not installed yet.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-build/site}"
if [ -n "${PYTHON:-}" ]; then
  python="$PYTHON"  # the test passes its own interpreter
else
  source tools/env.sh  # the book's environment, as tools/book.sh and tools/test.sh use it
  python="$RLSCRATCH_PY"
fi
"$python" -c "import jupyter_book, importlib; importlib.import_module('sphinx-mathjax-offline')" 2>/dev/null \
  || bash tools/setup.sh
"$python" -c "from jupyter_book.cli.main import main; main()" build . --config book/_config.yml \
  --toc book/_toc.yml --path-output "$out" --warningiserror --keep-going --quiet
echo "site: $out/_build/html/index.html"
