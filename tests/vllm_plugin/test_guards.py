"""The plugin's runtime guards: a vLLM that lacks an internal the plugin needs, and one whose layers
compute something else than the closed form, are both refused cleanly, and vLLM goes on without RoAd."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from vllm_helpers import Family, prompts, request, run_engine, save_peft_lora

MISSING = textwrap.dedent(
    """
    import logging
    logging.basicConfig(level=logging.INFO)
    from vllm.entrypoints.openai.models.serving import OpenAIServingModels
    from vllm.v1.executor.abstract import Executor
    del OpenAIServingModels.unload_lora_adapter  # a vLLM that moved it
    from roadkit.integrations.vllm import register
    register()
    print("wrapped:", getattr(Executor.add_lora, "roadkit_wrapped", False))
    """
)


def test_a_missing_internal_leaves_vllm_without_road() -> None:
    proc = subprocess.run([sys.executable, "-c", MISSING], capture_output=True, text=True, timeout=300, env=os.environ)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "wrapped: False" in proc.stdout
    lines = [line for line in proc.stderr.splitlines() if "RoAd serving is disabled" in line]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert "lacks vllm.entrypoints.openai.models.serving.OpenAIServingModels.unload_lora_adapter" in lines[0]
    assert "vLLM runs without it" in lines[0]


def test_a_serving_path_that_computes_wrong_numbers_is_refused(families: dict[str, Family], tmp_path) -> None:
    """The rotation is made 1% off: the first RoAd adapter is refused by the probe (RoadAdapterError naming
    the layer), so are later ones, and LoRA adapters and the base are still served."""
    family = families["llama"]
    lora = save_peft_lora(family.model_dir, tmp_path / "lora", family.targets, seed=31)
    p = prompts(4, seed=5)
    reqs = [
        request(p[0], ("r1", 1, family.adapters["r1"])),
        request(p[1], ("r2", 2, family.adapters["r2"])),
        request(p[2], ("lora", 3, lora)),
        request(p[3]),
    ]
    results = run_engine(tmp_path, family.model_dir, reqs, batches=[[0], [1], [2, 3]], spec={"break_rotation": True})
    for res in results[:2]:
        error = res["error"]
        assert error and error.startswith("RoadAdapterError: ") and "RoAd serving is off on this server" in error
        assert "the served rotation differs from R(Wx + b)" in error and "LoRA adapters are still served" in error
    assert results[2]["error"] is None and results[3]["error"] is None
    assert results[2]["token_ids"] and results[3]["token_ids"]
