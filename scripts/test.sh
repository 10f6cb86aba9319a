#!/usr/bin/env bash
# Set up a virtual environment (CPU torch first, then roadkit with its test extra) and run the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/venv.sh
setup_venv test
python -m pytest "$@"
