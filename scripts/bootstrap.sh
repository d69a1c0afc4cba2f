# Sourced by scripts/main.sh and scripts/test.sh: make a Python environment with torch and this package.
#
#   source scripts/bootstrap.sh "EXTRAS"     ->  sets PY to the environment's python
#
# Which environment:
#   - an activated virtualenv or conda env (VIRTUAL_ENV / CONDA_PREFIX set) is used as it is, so a torch
#     you installed there (CPU, CUDA, MPS) keeps working;
#   - otherwise a private one at $AB_VENV (default: .venv in the repository), made with $PYTHON
#     (default: python3, >= 3.10). If that interpreter already has torch, the venv sees it
#     (--system-site-packages) instead of downloading another.
# Torch is installed only when the environment has none: torch==$AB_TORCH_VERSION (default 2.13.0).
# Set AB_USE_ACTIVE_ENV=0 to ignore an activated environment.

ab_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ab_extras=${1:-}
ab_pip_flags=(--disable-pip-version-check --no-input)

if [[ "${AB_USE_ACTIVE_ENV:-1}" != 0 && -z "${AB_VENV:-}" && ( -n "${VIRTUAL_ENV:-}" || -n "${CONDA_PREFIX:-}" ) ]]; then
  PY=$(command -v python || command -v python3)
  echo "[setup] using the active environment: $PY" >&2
else
  ab_venv=${AB_VENV:-$ab_root/.venv}
  if [[ ! -x "$ab_venv/bin/python" ]]; then
    ab_base=${PYTHON:-python3}
    if ! command -v "$ab_base" >/dev/null 2>&1; then
      echo "[setup] error: $ab_base not found; install Python >= 3.10 or set PYTHON=/path/to/python" >&2
      return 1 2>/dev/null || exit 1
    fi
    if ! "$ab_base" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
      echo "[setup] error: $("$ab_base" --version 2>&1) is too old; Python >= 3.10 is needed (set PYTHON=...)" >&2
      return 1 2>/dev/null || exit 1
    fi
    ab_venv_flags=()
    if "$ab_base" -c 'import torch' >/dev/null 2>&1; then
      ab_venv_flags=(--system-site-packages)
      echo "[setup] $ab_base already has torch: the new environment will use it" >&2
    fi
    echo "[setup] creating $ab_venv" >&2
    "$ab_base" -m venv "${ab_venv_flags[@]}" "$ab_venv"
  fi
  PY=$ab_venv/bin/python
fi

if ! "$PY" -c 'import torch' >/dev/null 2>&1; then
  echo "[setup] installing torch==${AB_TORCH_VERSION:-2.13.0} (before anything that depends on it)" >&2
  "$PY" -m pip install "${ab_pip_flags[@]}" "torch==${AB_TORCH_VERSION:-2.13.0}"
fi

# Reinstall the package only when its metadata or the requested extras changed.
ab_stamp_dir=$("$PY" -c 'import sys; print(sys.prefix)')
ab_stamp="$ab_stamp_dir/.amortized-bayes-installed"
ab_want="$(cat "$ab_root/pyproject.toml" | cksum) extras=[$ab_extras] root=$ab_root"
if [[ ! -f "$ab_stamp" || "$(cat "$ab_stamp")" != "$ab_want" ]] || ! "$PY" -c 'import amortized_bayes' >/dev/null 2>&1; then
  echo "[setup] installing amortized-bayes${ab_extras:+[$ab_extras]} (editable)" >&2
  "$PY" -m pip install "${ab_pip_flags[@]}" -q -e "$ab_root${ab_extras:+[$ab_extras]}"
  printf '%s' "$ab_want" > "$ab_stamp"
fi
echo "[setup] ready: $("$PY" -c 'import sys, torch, amortized_bayes as ab; print(f"python {sys.version.split()[0]}, torch {torch.__version__}, amortized-bayes {ab.__version__}")')" >&2
