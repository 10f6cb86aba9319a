"""Build the base model and the adapter contenders from deep copies of the same base weights.

Contenders: the base model (no adapters), the floor (the base model plus one elementwise multiply
after each targeted layer: what any unmerged output-side adapter costs at least), roadkit RoAd,
PEFT RoAd (same config, same adapter numbers, copied from roadkit through the PEFT checkpoint
keys), PEFT LoRA r=8. All adapters are non-identity (roadkit/PEFT RoAd ``init_weights=False``,
LoRA ``init_lora_weights=False``).
"""

from __future__ import annotations

import copy
import importlib.util
import os
import sys
import warnings
from types import ModuleType

import torch
from torch import nn

import roadkit

from .settings import GROUP_SIZE, LORA_ALPHA, LORA_RANK, TARGET_MODULES, VARIANT, ModelSize

BASE_ROW = "__base__"

ROADKIT = "roadkit RoAd"
PEFT_ROAD = "peft RoAd"
PEFT_LORA = "peft LoRA r=8"
BASE = "base"
FLOOR = "floor: base + 1 multiply/layer"
ADAPTER_CONTENDERS = (ROADKIT, PEFT_ROAD, PEFT_LORA)


def adapter_name(i: int) -> str:
    return f"a{i}"


def build_llama(size: ModelSize, seed: int, device: str = "cpu", dtype: torch.dtype = torch.float32) -> nn.Module:
    """Random-weight Llama of `size`, initialised directly on `device`, then cast to `dtype`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=size.vocab,
        hidden_size=size.hidden,
        intermediate_size=size.intermediate,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        num_key_value_heads=size.heads,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype).eval()
    model.generation_config.pad_token_id = 0
    return model


def roadkit_config(targets=TARGET_MODULES, task_type="CAUSAL_LM", package=roadkit) -> roadkit.RoadConfig:
    return package.RoadConfig(
        variant=VARIANT, group_size=GROUP_SIZE, init_weights=False, target_modules=list(targets), task_type=task_type
    )


def peft_road_config(targets=TARGET_MODULES, task_type="CAUSAL_LM"):
    import peft

    return peft.RoadConfig(
        variant=VARIANT, group_size=GROUP_SIZE, init_weights=False, target_modules=list(targets), task_type=task_type
    )


def peft_lora_config(targets=TARGET_MODULES, task_type="CAUSAL_LM"):
    import peft

    return peft.LoraConfig(
        r=LORA_RANK,
        lora_alpha=LORA_ALPHA,
        lora_dropout=0.0,
        init_lora_weights=False,
        target_modules=list(targets),
        task_type=task_type,
    )


def load_baseline(label: str, src: str) -> ModuleType:
    """The roadkit package in another source tree (`src`, the directory holding `roadkit/`, e.g. an older
    commit's `git worktree`), imported beside this one as `roadkit_baseline_<label>`: two versions timed
    side by side in one process. Its modules import each other relatively, so the new name holds."""
    name = "roadkit_baseline_" + "".join(ch if ch.isalnum() else "_" for ch in label)
    init = os.path.join(src, "roadkit", "__init__.py")
    if not os.path.isfile(init):
        raise FileNotFoundError(f"--baseline {label}={src}: {init} does not exist (give a checkout's src/ directory)")
    spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[os.path.dirname(init)])
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def make_roadkit(
    base: nn.Module, n_adapters: int, targets=TARGET_MODULES, task_type="CAUSAL_LM", autocast=True, package=roadkit
):
    model = package.get_peft_model(
        copy.deepcopy(base),
        roadkit_config(targets, task_type, package),
        adapter_name(0),
        autocast_adapter_dtype=autocast,
    )
    for i in range(1, n_adapters):
        model.add_adapter(adapter_name(i), roadkit_config(targets, task_type, package))
    model.set_adapter(adapter_name(0))
    return model


def make_peft_road_like(
    rk_model, base: nn.Module, n_adapters: int, targets=TARGET_MODULES, task_type="CAUSAL_LM", autocast=True
):
    """PEFT RoAd with the *same* adapter numbers as `rk_model`: roadkit's `adapter_state_dict`
    (PEFT's checkpoint keys) is loaded with PEFT's own `set_peft_model_state_dict`."""
    import peft
    from peft.utils import set_peft_model_state_dict

    model = peft.get_peft_model(
        copy.deepcopy(base), peft_road_config(targets, task_type), adapter_name(0), autocast_adapter_dtype=autocast
    )
    for i in range(1, n_adapters):
        model.add_adapter(adapter_name(i), peft_road_config(targets, task_type), autocast_adapter_dtype=autocast)
    for i in range(n_adapters):
        state = rk_model.adapter_state_dict(adapter_name(i))
        res = set_peft_model_state_dict(model, state, adapter_name=adapter_name(i))
        unexpected = list(getattr(res, "unexpected_keys", []) or [])
        if unexpected:
            raise RuntimeError(f"PEFT did not accept roadkit's keys for {adapter_name(i)}: {unexpected[:5]}")
    model.set_adapter(adapter_name(0))
    return model


def make_peft_lora(
    base: nn.Module, n_adapters: int, targets=TARGET_MODULES, task_type="CAUSAL_LM", seed=1, autocast=True
):
    import peft

    torch.manual_seed(seed)
    model = peft.get_peft_model(
        copy.deepcopy(base), peft_lora_config(targets, task_type), adapter_name(0), autocast_adapter_dtype=autocast
    )
    for i in range(1, n_adapters):
        model.add_adapter(adapter_name(i), peft_lora_config(targets, task_type), autocast_adapter_dtype=autocast)
    model.set_adapter(adapter_name(0))
    return model


def make_floor(base: nn.Module, targets=TARGET_MODULES) -> nn.Module:
    """The base model with each targeted layer's output multiplied by a fixed per-feature vector
    (a forward hook): the cheapest conceivable unmerged adapter on layer outputs. Whatever it costs
    over the base model is a floor that no eager implementation of RoAd (or IA3, or LoRA) can beat,
    since each needs at least one elementwise op after the layer."""
    model = copy.deepcopy(base)
    gen = torch.Generator().manual_seed(0)
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in targets:
            scale = (1 + 0.01 * torch.randn(module.out_features, generator=gen)).to(module.weight)
            module.register_forward_hook(lambda _m, _inp, out, scale=scale: out.mul(scale))
    return model


def build_inference_contenders(base: nn.Module, n_adapters: int, seed: int) -> dict[str, nn.Module]:
    """Base, the floor model and the three adapter contenders, each adapter contender holding
    `n_adapters` distinct loaded adapters.

    On a 16-bit base every contender keeps its adapters in the base dtype (`autocast_adapter_dtype=
    False`): PEFT 0.21's RoAd cannot run mixed batches with its default float32 adapters on such a
    base (an index_put dtype mismatch), and all contenders must compute the same numbers."""
    autocast = next(base.parameters()).dtype == torch.float32
    torch.manual_seed(seed + 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rk = make_roadkit(base, n_adapters, autocast=autocast)
        pr = make_peft_road_like(rk, base, n_adapters, autocast=autocast)
        lo = make_peft_lora(base, n_adapters, seed=seed + 2, autocast=autocast)
    models = {BASE: copy.deepcopy(base), FLOOR: make_floor(base), ROADKIT: rk, PEFT_ROAD: pr, PEFT_LORA: lo}
    for m in models.values():
        m.eval()
    return models


def count_adapters(model: nn.Module) -> int:
    cfg = getattr(model, "peft_config", None)
    return len(cfg) if cfg is not None else 0


# ---- sanity: roadkit and PEFT RoAd must compute the same numbers before anything is timed -------


def _logits(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out


@torch.no_grad()
def check_inference_parity(
    models: dict[str, nn.Module], vocab: int, n_adapters: int, seed: int, atol: float = 1e-4, rel: float = 0.0
) -> dict:
    """roadkit vs PEFT RoAd logits, on a mixed batch (several adapters and `__base__` rows) and on
    the plain single-adapter path; `__base__` rows must equal the base model, adapters must not."""
    rk, pr, base = models[ROADKIT], models[PEFT_ROAD], models[BASE]
    g = torch.Generator().manual_seed(seed + 7)
    names = [adapter_name(i % n_adapters) for i in range(min(n_adapters, 5))] + [BASE_ROW]
    names = names + [adapter_name(n_adapters - 1)]
    ids = torch.randint(3, vocab, (len(names), 12), generator=g).to(next(base.parameters()).device)
    mask = torch.ones_like(ids)
    ref_base = _logits(base(input_ids=ids, attention_mask=mask))
    a = _logits(rk(input_ids=ids, attention_mask=mask, adapter_names=names))
    b = _logits(pr(input_ids=ids, attention_mask=mask, adapter_names=names))
    mixed = (a - b).abs().max().item()
    base_row = names.index(BASE_ROW)
    base_diff = (a[base_row] - ref_base[base_row]).abs().max().item()
    adapted_vs_base = (a[0] - ref_base[0]).abs().max().item()
    a1 = _logits(rk(input_ids=ids, attention_mask=mask))
    b1 = _logits(pr(input_ids=ids, attention_mask=mask))
    single = (a1 - b1).abs().max().item()
    limit = max(atol, rel * adapted_vs_base)
    result = {
        "mixed_batch_names": names,
        "max_abs_diff_mixed": mixed,
        "max_abs_diff_single": single,
        "base_row_vs_base_model": base_diff,
        "adapted_row_vs_base_model": adapted_vs_base,
        "atol": atol,
        "rel": rel,
        "limit": limit,
    }
    if not (mixed <= limit and single <= limit and base_diff <= limit):
        raise AssertionError(f"roadkit and PEFT RoAd disagree, refusing to benchmark: {result}")
    if adapted_vs_base <= 10 * atol:
        raise AssertionError(f"adapters look like the identity (init_weights=False expected): {result}")
    return result
