# Sourced by tools/setup.sh, tools/test.sh and tools/book.sh: choose the one Python environment the
# book installs into and runs in, say which, and put it first on PATH. In order:
#   1. RLSCRATCH_PYTHON=/path/to/python    that interpreter, your explicit choice (e.g. a container's Python)
#   2. an active virtual environment       (venv/virtualenv, or a conda environment other than `base`)
#   3. the repository's .venv              created with `python3 -m venv .venv` when missing
# Never the system Python by surprise. Sets RLSCRATCH_PY (the interpreter) and RLSCRATCH_ENV (a description).

_rls_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

_rls_env_kind() {  # "venv" / "conda" when the given python runs inside an active environment, else nothing
  "$1" - <<'EOF' 2>/dev/null
import os, sys
if sys.prefix != sys.base_prefix:
    print("venv")
elif (os.environ.get("CONDA_PREFIX") and os.environ.get("CONDA_DEFAULT_ENV", "base") != "base"
      and os.path.realpath(os.environ["CONDA_PREFIX"]) == os.path.realpath(sys.prefix)):
    print("conda")
EOF
}

_rls_choose_env() {
  local py kind base_py
  if [ -n "${RLSCRATCH_PYTHON:-}" ]; then
    py="$(command -v "$RLSCRATCH_PYTHON" || true)"
    if [ -z "$py" ]; then
      echo "RLSCRATCH_PYTHON=$RLSCRATCH_PYTHON: no such interpreter" >&2
      return 1
    fi
    RLSCRATCH_PY="$("$py" -c 'import sys; print(sys.executable)')"
    RLSCRATCH_ENV="$("$py" -c 'import sys; print(sys.prefix)') (RLSCRATCH_PYTHON)"
    return 0
  fi
  py="$(command -v python3 || command -v python || true)"
  if [ -n "$py" ]; then
    kind="$(_rls_env_kind "$py")"
    if [ "$kind" = venv ]; then kind=virtual; fi
    if [ -n "$kind" ]; then
      RLSCRATCH_PY="$("$py" -c 'import sys; print(sys.executable)')"
      RLSCRATCH_ENV="$("$py" -c 'import sys; print(sys.prefix)') (the active $kind environment)"
      return 0
    fi
  fi
  if [ -x "$_rls_root/.venv/bin/python" ]; then
    RLSCRATCH_PY="$_rls_root/.venv/bin/python"
    RLSCRATCH_ENV="$_rls_root/.venv (the repository's virtual environment)"
    return 0
  fi
  base_py="$py"
  if [ -z "$base_py" ]; then
    echo "No python3 found: install Python 3.10 or newer, or set RLSCRATCH_PYTHON=/path/to/python" >&2
    return 1
  fi
  if ! "$base_py" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
    echo "$base_py is Python $("$base_py" -c 'import platform; print(platform.python_version())'); the book needs 3.10 or newer" >&2
    echo "(activate an environment with a newer Python, or set RLSCRATCH_PYTHON=/path/to/python3.11)" >&2
    return 1
  fi
  echo "No virtual environment is active: creating one in .venv with $base_py ($("$base_py" -c 'import platform; print(platform.python_version())'))"
  if ! "$base_py" -m venv "$_rls_root/.venv"; then
    rm -rf "$_rls_root/.venv"
    echo "Could not create .venv. On Debian/Ubuntu: apt install python3-venv. Or activate an environment" >&2
    echo "of your own (conda env create -f environment.yml && conda activate rlscratch)," >&2
    echo "or set RLSCRATCH_PYTHON=/path/to/python to install into that interpreter." >&2
    return 1
  fi
  RLSCRATCH_PY="$_rls_root/.venv/bin/python"
  RLSCRATCH_ENV="$_rls_root/.venv (the repository's virtual environment, created now)"
}

if [ -z "${RLSCRATCH_PY:-}" ] || [ ! -x "$RLSCRATCH_PY" ]; then
  _rls_choose_env || exit 1
  export RLSCRATCH_PY RLSCRATCH_ENV
  echo "Python environment: $RLSCRATCH_ENV"
fi
# Its scripts (python, jupyter, pytest) come first for everything started from here on.
PATH="$(dirname "$RLSCRATCH_PY"):$PATH"
export PATH
