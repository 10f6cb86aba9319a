"""Tensor parallelism = 2 on CPU: two worker processes, each loading the plugin through its entry point.

The Llama here has one KV head, so at TP=2 the K and V projections are replicated on both ranks;
q/k/v and gate/up are column-parallel shards, o_proj and down_proj row-parallel.
"""

from __future__ import annotations

from vllm_helpers import (
    LLAMA_TARGETS,
    Family,
    llama_config,
    prompts,
    reference_logprobs,
    request,
    roadkit_model,
    run_engine,
    save_model,
    save_road,
)

ATOL = 1e-4
TP_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "0|1", "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}


def test_tensor_parallel_equals_roadkit(tmp_path) -> None:
    model_dir = tmp_path / "base"
    save_model(llama_config(num_kv_heads=1), model_dir, seed=5)
    adapters = {
        "r1": save_road(model_dir, tmp_path / "r1", "road_1", 32, LLAMA_TARGETS, seed=6),
        "r4": save_road(model_dir, tmp_path / "r4", "road_4", 16, LLAMA_TARGETS, seed=7),
    }
    # q_proj's 128 outputs are 64 per rank: a group of 128 would straddle the ranks.
    misfit = save_road(model_dir, tmp_path / "misfit", "road_1", 128, ["q_proj"], seed=8)
    family = Family("llama-kv1", model_dir, LLAMA_TARGETS, adapters)
    p = prompts(7, seed=3)
    names = ["r1", None, "r4", "r1", "r4", None]
    reqs = [request(p[i], (n, 1 + list(adapters).index(n), adapters[n]) if n else None) for i, n in enumerate(names)]
    reqs.append(request(p[6], ("misfit", 9, misfit)))
    results = run_engine(
        tmp_path,
        model_dir,
        reqs,
        engine={"tensor_parallel_size": 2, "distributed_executor_backend": "mp"},
        env=TP_ENV,
        batches=[[6], list(range(6))],
    )
    error = results[6]["error"]
    assert error and error.startswith("RoadAdapterError: ") and "64 output features" in error, error
    assert "'model.layers.0.self_attn.q_proj'" in error and "qkv_proj" not in error, error  # the trained name
    assert "group_size=128" in error
    model = roadkit_model(family, ["r1", "r4"])
    for req, name, res in zip(reqs[:6], names, results[:6], strict=True):
        assert res["error"] is None, res["error"]
        picked, logprobs = reference_logprobs(model, req["prompt_token_ids"], res["token_ids"], [name or "__base__"])
        assert res["token_ids"] == picked, name
        assert max(abs(a - b) for a, b in zip(res["logprobs"], logprobs, strict=True)) < ATOL
