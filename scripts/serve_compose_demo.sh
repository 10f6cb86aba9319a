#!/usr/bin/env bash
# Compose at request time: train two adapters in disjoint subspaces into an adapter store, serve the
# store with stock vLLM, and ask for A, B and their union A+B, which nobody registered.
#
#   bash scripts/serve_compose_demo.sh    # a few minutes on 2 CPU cores
#
# Uses .venv-vllm (built on first use). Trains the store ./roadkit-compose with
# `examples/composition.py --variant road_4 --steps 1000 --lr 2e-2 --replay 4000 --cross 4000
# --save-adapters roadkit-compose` (about 4 minutes) if it is missing;
# extra arguments go to scripts/serve_compose_demo.py (--store, --words, --max-tokens).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/venv.sh

use_vllm_venv cli

if [ ! -f roadkit-compose/A/adapter_config.json ] || [ ! -f roadkit-compose/B/adapter_config.json ]; then
  echo "training adapters A (shard 0/2) and B (shard 1/2) into ./roadkit-compose"
  OMP_NUM_THREADS=1 python examples/composition.py --variant road_4 --steps 1000 --lr 2e-2 --replay 4000 \
    --cross 4000 --save-adapters roadkit-compose
fi

exec python scripts/serve_compose_demo.py --store roadkit-compose "$@"
