#!/usr/bin/env bash
# Set up a virtual environment (CPU torch first, then roadkit) and run the offline demo:
# it writes ./roadkit-demo (replacing the one a previous run wrote). Extra arguments go to `roadkit demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q torch==2.13.0
python -m pip install -q -e .
roadkit demo --output roadkit-demo --overwrite "$@"
