"""Helpers for the vLLM tests: tiny models of two families saved to disk, RoAd and LoRA adapters for
them, an engine runner (one subprocess per engine) and in-process references (roadkit and PEFT).

These tests run in the vLLM environment (`scripts/test.sh` builds it); vLLM pins its own
transformers, so they are not part of the main suite.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, OPTConfig

from roadkit import RoadConfig, RoadModel, get_peft_model

HERE = Path(__file__).parent
TOKENIZER = Path(__file__).parents[2] / "src" / "roadkit" / "app" / "demo_base"
VOCAB = 85  # the demo tokenizer's
ENGINE_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TOKENIZERS_PARALLELISM": "false"}
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
OPT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
# name -> (variant, group size, targets index): several variants and group sizes in one batch
ROAD_ADAPTERS = {"r1": ("road_1", 32), "r2": ("road_2", 64), "r4": ("road_4", 16)}


def llama_config(num_kv_heads: int = 2) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=num_kv_heads,
        head_dim=32,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )


def opt_config() -> OPTConfig:
    """OPT: biases on every projection, including the row-parallel out_proj and fc2."""
    return OPTConfig(
        vocab_size=VOCAB,
        hidden_size=128,
        ffn_dim=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=256,
        word_embed_proj_dim=128,
        enable_bias=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )


@dataclass
class Family:
    name: str
    model_dir: Path
    targets: list[str]
    adapters: dict[str, Path]  # adapter name -> directory

    def base(self) -> torch.nn.Module:
        return AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=torch.float32).eval()


def save_model(config, directory: Path, seed: int) -> None:  # noqa: ANN001 - a transformers config
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # biases are zero at init: make them matter
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    model.save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TOKENIZER / name, directory / name)


def save_road(
    model_dir: Path, directory: Path, variant: str, group_size: int, targets: list[str], seed: int, **config
) -> Path:  # noqa: ANN003
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    cfg = RoadConfig(variant=variant, group_size=group_size, init_weights=False, target_modules=targets, **config)
    get_peft_model(base, cfg).save_pretrained(directory)
    return directory


def save_peft_road(model_dir: Path, directory: Path, targets: list[str], seed: int) -> Path:
    """A RoAd adapter saved by PEFT itself."""
    import peft

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = peft.get_peft_model(
        base, peft.RoadConfig(variant="road_2", group_size=32, init_weights=False, target_modules=targets)
    )
    model.save_pretrained(directory)
    return directory


def save_peft_lora(model_dir: Path, directory: Path, targets: list[str], seed: int, rank: int = 8) -> Path:
    """A LoRA adapter (PEFT, rank 8 unless said) with non-zero B, for serving LoRA beside RoAd."""
    import peft

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = peft.get_peft_model(base, peft.LoraConfig(r=rank, lora_alpha=16, target_modules=targets))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    model.save_pretrained(directory)
    return directory


def with_bad_values(source: Path, directory: Path, kind: str) -> Path:
    """A copy of the adapter at `source` with one module's values broken: "nan", "inf" or "zero scale"."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(source, directory)
    tensors = load_file(directory / "adapter_model.safetensors")
    key = sorted(k for k in tensors if k.endswith("road_alpha"))[-1]
    if kind == "zero scale":
        tensors[key][:] = 0.0
    else:
        tensors[key.replace("road_alpha", "road_theta")][1] = {"nan": float("nan"), "inf": float("inf")}[kind]
    save_file(tensors, directory / "adapter_model.safetensors", metadata={"format": "pt"})
    return directory


def build_family(root: Path, name: str, config, targets: list[str], seed: int) -> Family:  # noqa: ANN001
    model_dir = root / name / "base"
    save_model(config, model_dir, seed)
    adapters = {}
    for i, (adapter, (variant, group_size)) in enumerate(ROAD_ADAPTERS.items()):
        adapters[adapter] = save_road(model_dir, root / name / adapter, variant, group_size, targets, seed + 1 + i)
    adapters["peft_road"] = save_peft_road(model_dir, root / name / "peft_road", targets, seed + 10)
    return Family(name, model_dir, targets, adapters)


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    """Token-id prompts of different lengths (ids past the special tokens)."""
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randint(3, VOCAB, (int(torch.randint(3, 12, (1,), generator=g)),), generator=g).tolist() for _ in range(n)
    ]


def run_engine(
    tmp_path: Path,
    model_dir: Path,
    requests: list[dict],
    engine: Optional[dict] = None,
    max_tokens: int = 8,
    batches: Optional[list[list[int]]] = None,
    env: Optional[dict] = None,
    timeout: int = 600,
    spec: Optional[dict] = None,
) -> list[dict]:
    """Serve `requests` with vLLM's offline engine in a subprocess; one result per request (`spec`: more
    keys for engine_run.py)."""
    spec = {
        **(spec or {}),
        "model": str(model_dir),
        "max_tokens": max_tokens,
        "requests": requests,
        "batches": batches,
        "engine": {
            "dtype": "float32",
            "enable_lora": True,
            "max_loras": 4,
            "max_lora_rank": 8,
            "max_model_len": 128,
            "seed": 0,
            **(engine or {}),
        },
    }
    spec_path, out_path = tmp_path / "spec.json", tmp_path / "out.json"
    spec_path.write_text(json.dumps(spec))
    proc = subprocess.run(
        [sys.executable, str(HERE / "engine_run.py"), str(spec_path), str(out_path)],
        env={**os.environ, **ENGINE_ENV, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise AssertionError(f"engine failed ({proc.returncode}):\n{proc.stderr[-6000:]}")
    return json.loads(out_path.read_text())


def request(ids: list[int], adapter: Optional[tuple[str, int, Path]] = None) -> dict:
    return {"prompt_token_ids": ids, "adapter": [adapter[0], adapter[1], str(adapter[2])] if adapter else None}


@torch.no_grad()
def reference_logprobs(
    model: torch.nn.Module, prompt: list[int], generated: list[int], adapter_names: Optional[list[str]] = None
) -> tuple[list[int], list[float]]:
    """Greedy tokens a model would pick after each prefix of prompt + generated, and the log-probs of
    `generated` under it, from one forward pass."""
    ids = torch.tensor([prompt + generated])
    kwargs = {"adapter_names": adapter_names} if adapter_names else {}
    logits = model(input_ids=ids, **kwargs).logits[0, len(prompt) - 1 : -1].float()
    logp = torch.log_softmax(logits, dim=-1)
    picked = logp.argmax(-1).tolist()
    return picked, logp.gather(-1, torch.tensor(generated)[:, None])[:, 0].tolist()


def roadkit_model(family: Family, names: list[str]) -> RoadModel:
    """The family's base with the named adapters loaded in-process, for mixed-batch references."""
    model = RoadModel.from_pretrained(family.base(), family.adapters[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(family.adapters[name], adapter_name=name)
    return model.eval()
