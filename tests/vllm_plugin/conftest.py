"""The vLLM tests run in the vLLM environment, which `bash scripts/test.sh` builds: vLLM pins its own
transformers, so these tests are not part of the main suite."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm", reason="the vLLM tests run in the vLLM environment (bash scripts/test.sh builds it)")

from vllm_helpers import LLAMA_TARGETS, OPT_TARGETS, Family, build_family, llama_config, opt_config  # noqa: E402


@pytest.fixture(scope="session")
def families(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Family]:
    root = tmp_path_factory.mktemp("vllm_models")
    return {
        "llama": build_family(root, "llama", llama_config(), LLAMA_TARGETS, seed=0),
        "opt": build_family(root, "opt", opt_config(), OPT_TARGETS, seed=100),
    }
