# Sourced by the other scripts. `setup_venv [EXTRA]` creates and activates .venv, installs CPU torch
# first (an unpinned torch pulls gigabytes of CUDA packages), then roadkit in editable mode, with EXTRA.
setup_venv() {
  python3 -m venv .venv
  . .venv/bin/activate
  python -m pip install -q --upgrade pip
  python -m pip install -q torch==2.13.0
  python -m pip install -q -e ".${1:+[$1]}"
}
