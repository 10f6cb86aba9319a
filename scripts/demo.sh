#!/usr/bin/env bash
# Set up a virtual environment (CPU torch first, then roadkit) and run the offline demo:
# it writes ./roadkit-demo (replacing the one a previous run wrote). Extra arguments go to `roadkit demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/venv.sh
setup_venv cli
roadkit demo --output roadkit-demo --overwrite "$@"
