#!/usr/bin/env bash
# The test suite. In .venv (CPU torch first, then roadkit with its test extra): ruff lint and format
# over the repository, mypy over src/, then the main tests. Then, in .venv-core, roadkit without extras
# (scripts/check_core_install.py). Then the vLLM serving tests in .venv-vllm
# (vLLM pins its own torch and transformers). Extra arguments go to the main suite's pytest;
# ROADKIT_SKIP_VLLM=1 skips the vLLM tests for a quicker local loop.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/venv.sh
setup_venv test
ruff check .
ruff format --check .
mypy
python -m pytest --ignore=tests/vllm_plugin "$@"
deactivate
setup_venv "" .venv-core  # the core alone, as `pip install roadkit` gives it
python scripts/check_core_install.py
deactivate
if [ "${ROADKIT_SKIP_VLLM:-0}" != 1 ]; then
  setup_vllm_venv test
  python -m pytest tests/vllm_plugin
fi
