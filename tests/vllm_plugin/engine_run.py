"""Run vLLM's offline engine on a JSON spec and write what it generated (a subprocess per engine).

    python engine_run.py SPEC.json OUT.json

SPEC: {"model": DIR, "engine": {LLM kwargs}, "max_tokens": N,
       "requests": [{"prompt_token_ids": [...], "adapter": null | [name, int_id, DIR]}, ...],
       "batches": [[request indices], ...]   (optional; default: all requests in one call),
       "preload": true | false               (optional; default true),
       "prompt_logprobs": true | false       (optional; then each result has "prompt_logprobs"),
       "break_rotation": true | false        (optional; the CPU rotation scaled by 1.01),
       "adapter_memory": true | false        (optional; then each result has "adapter_memory", the engine's
                                              after its batch: {"lora_tensors": bytes, "road_tables": bytes})}
OUT: per request {"token_ids": [...], "logprobs": [...], "error": null | message}.
Adapters are loaded before each batch (as the API server does): a request whose adapter fails to
load gets that error and is not generated; the engine goes on with the others. With "preload":
false the requests go straight to `generate`, and a bad adapter fails its whole batch.
"""

from __future__ import annotations

import json
import sys


def main() -> None:
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    spec = json.load(open(sys.argv[1]))
    if spec.get("break_rotation"):  # a serving path that computes wrong numbers, for the probe to catch
        from roadkit.integrations.vllm.slots import SlotTable

        forward = SlotTable.forward
        SlotTable.forward = lambda self, *args, **kwargs: forward(self, *args, **kwargs) * 1.01
    llm = LLM(spec["model"], **spec["engine"])
    params = SamplingParams(
        max_tokens=spec["max_tokens"],
        temperature=0.0,
        logprobs=0,
        ignore_eos=True,
        prompt_logprobs=0 if spec.get("prompt_logprobs") else None,
    )
    requests = spec["requests"]
    results: list = [None] * len(requests)
    for batch in spec.get("batches") or [list(range(len(requests)))]:
        for i in batch:
            if requests[i]["adapter"] and spec.get("preload", True):
                try:
                    llm.llm_engine.add_lora(LoRARequest(*requests[i]["adapter"]))
                except Exception as err:  # noqa: BLE001 - the test reads the message
                    results[i] = {"token_ids": None, "logprobs": None, "error": f"{type(err).__name__}: {err}"}
        batch = [i for i in batch if results[i] is None]
        prompts = [{"prompt_token_ids": requests[i]["prompt_token_ids"]} for i in batch]
        loras = [LoRARequest(*requests[i]["adapter"]) if requests[i]["adapter"] else None for i in batch]
        try:
            outs = llm.generate(prompts, params, lora_request=loras, use_tqdm=False)
        except Exception as err:  # noqa: BLE001 - without preloading, a bad adapter fails its batch
            for i in batch:
                results[i] = {"token_ids": None, "logprobs": None, "error": f"{type(err).__name__}: {err}"}
            continue
        for i, out in zip(batch, outs, strict=True):
            completion = out.outputs[0]
            logprobs = [step[tok].logprob for step, tok in zip(completion.logprobs, completion.token_ids, strict=True)]
            results[i] = {"token_ids": list(completion.token_ids), "logprobs": logprobs, "error": None}
            if spec.get("adapter_memory"):
                from roadkit.integrations.vllm.manager import adapter_memory_on_worker

                results[i]["adapter_memory"] = llm.collective_rpc(adapter_memory_on_worker)[0]
            if out.prompt_logprobs is not None:  # the first prompt token has none
                ids = requests[i]["prompt_token_ids"]
                steps = zip(out.prompt_logprobs[1:], ids[1:], strict=True)
                results[i]["prompt_logprobs"] = [step[tok].logprob for step, tok in steps]
    json.dump(results, open(sys.argv[2], "w"))


if __name__ == "__main__":
    main()
