"""How much merging RoAd into bitsandbytes-quantized weights moves a model's outputs.

``python -m benchmarks.quantized_merge [--hidden 256] [--layers 2] [--steps 30] [--seed 0]``

A tiny Llama (from a config; nothing is downloaded) has every linear layer but the output head
replaced by bitsandbytes `Linear4bit` (nf4, fp4) or `Linear8bitLt` (int8) layers. RoAd adapters
(all-linear) are either random (`init_weights=False`: theta ~ N(0, 0.5^2), alpha ~ N(1, 0.5^2), a
large rotation) or trained for a few AdamW steps on the quantized model from the identity. The
table compares the logits of the merged model with the unmerged one on held-out tokens: max abs
difference, that divided by max |logit|, and the relative L2 norm of the difference. For scale, the
last column is the same relative L2 norm between the quantized and the float base model (the
quantization error itself). "unmerge" compares the base model's logits after merge + unmerge with
those before.
"""

from __future__ import annotations

import argparse
import copy
import logging
import warnings

import torch
from torch import nn


def tiny_llama(hidden: int, layers: int, seed: int) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=256,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
    )
    return LlamaForCausalLM(cfg)


def quantize(model: nn.Module, kind: str) -> nn.Module:
    """Replace every nn.Linear but `lm_head` by a bitsandbytes layer of `kind` (nf4, fp4 or int8)."""
    import bitsandbytes as bnb

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not nn.Linear or name == "lm_head":
                continue
            bias = child.bias is not None
            if kind == "int8":
                layer = bnb.nn.Linear8bitLt(child.in_features, child.out_features, bias, has_fp16_weights=False)
            else:
                layer = bnb.nn.Linear4bit(
                    child.in_features, child.out_features, bias, compute_dtype=torch.float32, quant_type=kind
                )
            layer.load_state_dict(child.state_dict())
            setattr(parent, name, layer.to(child.weight.device))  # quantizes
    return model


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def measure(base: nn.Module, kind: str, adapters: str, steps: int, seed: int) -> dict[str, float]:
    from roadkit import RoadConfig, get_peft_model

    float_model = copy.deepcopy(base).eval()
    model = quantize(copy.deepcopy(base), kind)
    gen = torch.Generator().manual_seed(seed)
    vocab = base.config.vocab_size
    train_ids = torch.randint(0, vocab, (8, 32), generator=gen)
    test_ids = torch.randint(0, vocab, (8, 32), generator=gen)
    cfg = RoadConfig(variant="road_2", group_size=64, target_modules="all-linear", init_weights=adapters != "random")
    rm = get_peft_model(model, cfg)
    if adapters == "trained":  # before any inference call: bitsandbytes repacks 4-bit weights for CPU inference
        rm.train()
        opt = torch.optim.AdamW([p for p in rm.parameters() if p.requires_grad], lr=1e-2)
        for _ in range(steps):
            rm(input_ids=train_ids, labels=train_ids).loss.backward()
            opt.step()
            opt.zero_grad()
    rm.eval()
    with torch.no_grad():
        reference = float_model(test_ids).logits
        with rm.disable_adapter():
            base_before = rm(test_ids).logits
        unmerged = rm(test_ids).logits
        rm.merge_adapter()
        merged = rm(test_ids).logits
        rm.unmerge_adapter()
        with rm.disable_adapter():
            base_after = rm(test_ids).logits
    diff = (merged - unmerged).abs().max().item()
    return {
        "max_abs": diff,
        "max_rel": diff / unmerged.abs().max().item(),
        "rel_l2": rel_l2(merged, unmerged),
        "unmerge_rel_l2": rel_l2(base_after, base_before),
        "quant_rel_l2": rel_l2(base_before, reference),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.quantized_merge", description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--steps", type=int, default=30, help="AdamW steps for the trained adapters")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    warnings.filterwarnings("ignore", message=".*requantizes the weight.*")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # one line per int8 matmul of a float32 input
    base = tiny_llama(args.hidden, args.layers, args.seed)
    print(
        f"tiny Llama: hidden {args.hidden}, {args.layers} layers, RoAd road_2 group 64 on all linear layers; "
        f"logits of 8 x 32 held-out tokens; torch {torch.__version__}"
    )
    print(
        "| base | adapters | merged vs unmerged: max abs | max abs / max abs logit | rel. L2 "
        "| after unmerge: rel. L2 | quantization error: rel. L2 |"
    )
    print("|---|---|---|---|---|---|---|")
    for kind in ("nf4", "fp4", "int8"):
        for adapters in ("random", "trained"):
            m = measure(base, kind, adapters, args.steps, args.seed)
            label = "init_weights=False" if adapters == "random" else f"trained {args.steps} steps"
            print(
                f"| {kind} | {label} | {m['max_abs']:.3g} | {m['max_rel']:.3g} | {m['rel_l2']:.3g} "
                f"| {m['unmerge_rel_l2']:.3g} | {m['quant_rel_l2']:.3g} |"
            )


if __name__ == "__main__":
    main()
