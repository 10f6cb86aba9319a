"""RoAd on bitsandbytes' quantized linear layers (`Linear4bit` nf4 / fp4, `Linear8bitLt` int8), on CPU.

Forward references are dense rotation matrices applied to the quantized layer's own output. Merged
weights must lie within one rounding of R W (the code book's half gap times the block scale) and
match PEFT's RoAd on the same quantized base byte for byte; merged outputs must stay within
tolerances measured as benchmarks/quantized_merge.py does, on the test model. On CPUs with AVX512-BF16,
bitsandbytes repacks 4-bit weights at the first inference call; tests that merge after such a call
cover that layout too.
"""

from __future__ import annotations

import copy
import logging
import subprocess
import sys
import warnings

import pytest
import torch
from conftest import tiny_llama, train_steps
from test_functional import dense
from torch import nn

bnb = pytest.importorskip("bitsandbytes")

from roadkit import Linear4bit, Linear8bitLt, RoadConfig, RoadModel, get_peft_model  # noqa: E402

# bitsandbytes logs a line per int8 matmul of a float32 input; tests run many of those.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
pytestmark = [
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
    pytest.mark.usefixtures("one_thread"),
]

KINDS = ["nf4", "fp4", "int8"]
VARIANTS = ["road_1", "road_2", "road_4"]
REQUANTIZED = "requantizes the weight"
# Relative L2 distance of logits, merged vs unmerged (and base after merge + unmerge vs before), on
# the 1-layer test Llama: about 1.5x the largest value measured over 3 seeds (nf4 0.13, fp4 0.17,
# int8 0.015 after merging; nf4 0.15, fp4 0.18, int8 0.013 after unmerging moderate adapters).
MERGE_TOL = {"nf4": 0.2, "fp4": 0.25, "int8": 0.025}
UNMERGE_TOL = {"nf4": 0.25, "fp4": 0.3, "int8": 0.02}
WRAPPER = {"nf4": Linear4bit, "fp4": Linear4bit, "int8": Linear8bitLt}


def quantized(layer: nn.Linear, kind: str, compress_statistics: bool = True) -> nn.Module:
    """A bitsandbytes copy of `layer`, quantized (nf4 / fp4: Linear4bit; int8: Linear8bitLt)."""
    bias = layer.bias is not None
    if kind == "int8":
        q = bnb.nn.Linear8bitLt(layer.in_features, layer.out_features, bias, has_fp16_weights=False)
    else:
        q = bnb.nn.Linear4bit(
            layer.in_features,
            layer.out_features,
            bias,
            compute_dtype=torch.float32,
            quant_type=kind,
            compress_statistics=compress_statistics,
        )
    q.load_state_dict(layer.state_dict())
    return q.to("cpu").requires_grad_(False)


def quantize(model: nn.Module, kind: str) -> nn.Module:
    """Every nn.Linear but the output head replaced by its bitsandbytes copy."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and name != "lm_head":
                setattr(parent, name, quantized(child, kind))
    return model


@pytest.fixture(scope="module")
def bases():
    """A quantized 1-layer Llama per kind, never run (so never repacked); tests use deep copies."""
    return {kind: quantize(tiny_llama(layers=1), kind) for kind in KINDS}


def layer_of(kind: str, compress_statistics: bool = True) -> nn.Module:
    torch.manual_seed(0)
    return quantized(nn.Linear(128, 128), kind, compress_statistics)


def ids(rows: int = 4, seq: int = 9, seed: int = 7) -> torch.Tensor:
    return torch.randint(0, 96, (rows, seq), generator=torch.Generator().manual_seed(seed))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def snapshot(base: nn.Module) -> list[torch.Tensor]:
    """Copies of every tensor that holds a quantized layer's weight, bias and scales."""
    w = base.weight
    extra = [w.quant_state.absmax] if hasattr(w, "quant_state") else [w.SCB, base.state.SCB]
    return [t.clone() for t in (w.data, base.bias, *extra) if t is not None]


def dequantized(base: nn.Module) -> torch.Tensor:
    w = base.weight
    if hasattr(w, "quant_state"):
        return bnb.functional.dequantize_4bit(w.data, w.quant_state)
    return bnb.functional.int8_vectorwise_dequant(w.data, w.SCB if w.SCB is not None else base.state.SCB)


def moderate(rm: RoadModel, seed: int = 0) -> None:
    """Adapter parameters that rotate clearly but keep every 2x2 block well conditioned."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in rm.named_parameters():
            if "road_theta" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
            elif "road_alpha" in name:
                p.copy_(0.8 + 0.4 * torch.rand(p.shape, generator=g))


def all_linear(variant: str = "road_2", init_weights: bool = False) -> RoadConfig:
    return RoadConfig(variant=variant, group_size=64, init_weights=init_weights, target_modules="all-linear")


def test_importing_roadkit_leaves_bitsandbytes_unimported():
    code = "import sys, roadkit; assert 'bitsandbytes' not in sys.modules, 'bitsandbytes was imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("kind", KINDS)
def test_all_linear_wraps_the_quantized_layers_but_not_the_head(bases, kind):
    rm = get_peft_model(copy.deepcopy(bases[kind]), all_linear())
    layers = dict(rm.road_layers())
    assert {p.rsplit(".", 1)[-1] for p in layers} == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    assert all(type(layer) is WRAPPER[kind] for layer in layers.values())
    down = layers["model.layers.0.mlp.down_proj"]
    assert (down.in_features, down.out_features) == (256, 128)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("kind", KINDS)
def test_forward_is_the_dense_rotation_of_the_quantized_output(kind, variant):
    base = layer_of(kind)
    layer = WRAPPER[kind](base, "a", variant, 64, init_weights=False)
    h = torch.randn(2, 5, 128)
    R = dense(*layer.coefficients("a"), 64).detach()
    y = layer(h)  # training path: parameters need gradients
    with torch.no_grad():
        expected = base(h) @ R.T
        torch.testing.assert_close(y.detach(), expected, rtol=1e-5, atol=1e-5)
        layer.eval()
        torch.testing.assert_close(layer(h), base(h) @ R.T, rtol=1e-5, atol=1e-5)  # cached path, repacked 4-bit


def test_bfloat16_output_of_a_4bit_layer_is_rotated_in_bfloat16():
    torch.manual_seed(0)
    base = bnb.nn.Linear4bit(128, 128, compute_dtype=torch.bfloat16, quant_type="nf4")
    base.load_state_dict(nn.Linear(128, 128).state_dict())
    base = base.to("cpu").requires_grad_(False)
    layer = Linear4bit(base, "a", "road_4", 64, init_weights=False)
    h = torch.randn(3, 128, dtype=torch.bfloat16)
    with torch.no_grad():
        out, raw = layer(h), base(h)
        R = dense(*layer.coefficients("a"), 64)
    assert out.dtype == raw.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), raw.float() @ R.T, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_training_moves_only_theta_and_alpha_and_lowers_the_loss(bases, kind):
    rm = get_peft_model(copy.deepcopy(bases[kind]), all_linear("road_4", init_weights=True))
    frozen = {n: t.clone() for n, t in rm.state_dict().items() if "road_" not in n}
    losses = train_steps(rm, ids(4, 16), 12, lr=2e-2)
    assert losses[-1] < 0.95 * losses[0]
    with_grad = {n for n, p in rm.named_parameters() if p.grad is not None}
    assert with_grad and all(".road_theta." in n or ".road_alpha." in n for n in with_grad)
    assert all(torch.equal(rm.state_dict()[n], t) for n, t in frozen.items())


@pytest.mark.parametrize("kind", KINDS)
def test_mixed_batch_rows_equal_single_adapter_runs(bases, kind):
    rm = get_peft_model(copy.deepcopy(bases[kind]), all_linear("road_2"))
    rm.add_adapter("b", all_linear("road_4"))
    rm.eval()
    x = ids()
    names = ["b", "__base__", "default", "b"]
    with torch.no_grad():
        mixed = rm(x, adapter_names=names).logits
        for name in ("default", "b"):
            rm.set_adapter(name)
            rows = [i for i, n in enumerate(names) if n == name]
            torch.testing.assert_close(mixed[rows], rm(x).logits[rows], rtol=1e-5, atol=1e-5)
        with rm.disable_adapter():
            torch.testing.assert_close(mixed[1], rm(x).logits[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_merge_warns_keeps_outputs_close_and_unloads_to_quantized_layers(bases, kind):
    rm = get_peft_model(copy.deepcopy(bases[kind]), all_linear()).eval()
    x = ids()
    with torch.no_grad():
        adapted = rm(x).logits  # repacks 4-bit weights on AVX512-BF16 CPUs: the merge reads that layout
        with rm.disable_adapter():
            base = rm(x).logits
        with pytest.warns(UserWarning, match=REQUANTIZED) as record:
            rm.merge_adapter()
        assert len([w for w in record if REQUANTIZED in str(w.message)]) == len(list(rm.road_layers()))
        merged = rm(x).logits
        assert rel(merged, adapted) < MERGE_TOL[kind] < rel(base, adapted)
        plain = rm.merge_and_unload()
        q_proj = plain.model.layers[0].self_attn.q_proj
        assert type(q_proj) is (bnb.nn.Linear8bitLt if kind == "int8" else bnb.nn.Linear4bit)
        torch.testing.assert_close(plain(x).logits, merged, rtol=0, atol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_unmerge_warns_and_restores_close_to_the_original(bases, kind):
    rm = get_peft_model(copy.deepcopy(bases[kind]), all_linear("road_1")).eval()
    moderate(rm)
    x = ids()
    with torch.no_grad():
        with rm.disable_adapter():
            base = rm(x).logits
        adapted = rm(x).logits
        with pytest.warns(UserWarning, match="merging RoAd adapters " + REQUANTIZED):
            rm.merge_adapter()
        with rm.disable_adapter():  # merged adapters are undone on the fly
            assert rel(rm(x).logits, base) < UNMERGE_TOL[kind]
        with pytest.warns(UserWarning, match="unmerging RoAd adapters " + REQUANTIZED):
            rm.unmerge_adapter()
        assert not any(layer.merged for _, layer in rm.road_layers())
        assert rel(rm(x).logits, adapted) < UNMERGE_TOL[kind]
        with rm.disable_adapter():
            assert rel(rm(x).logits, base) < UNMERGE_TOL[kind]


@pytest.mark.parametrize("kind", KINDS)
def test_merging_the_identity_leaves_the_quantized_values_unchanged(kind):
    base = layer_of(kind)
    codes, before, bias = base.weight.data.clone(), dequantized(base), base.bias.clone()
    layer = WRAPPER[kind](base, "a", "road_2", 64, init_weights=True)
    with pytest.warns(UserWarning, match=REQUANTIZED):
        layer.merge()
    assert torch.equal(base.bias, bias)
    if kind != "fp4":  # fp4 has two zeros, +0 and -0: a -0 may come back as +0
        assert torch.equal(base.weight.data, codes)
    # Only the double-quantized 4-bit block scales round again (a relative 4e-4 here).
    torch.testing.assert_close(dequantized(base), before, rtol=1e-3, atol=0)
    if kind != "int8":
        for attr in ("blocksize", "quant_type", "compress_statistics", "quant_storage"):
            assert getattr(base.weight, attr) == getattr(layer_of(kind).weight, attr)
        assert base.quant_state is base.weight.quant_state


@pytest.mark.parametrize("kind", KINDS)
def test_merged_weight_is_the_rotated_dequantized_weight_rounded_once(kind):
    # Plain (not double-quantized) block scales, so that the bound below is exact: double quantization
    # rounds the scales of blocks much smaller than the rest (rows scaled by a small alpha) coarsely.
    base = layer_of(kind, compress_statistics=False)
    layer = WRAPPER[kind](base, "a", "road_2", 64, init_weights=False)
    W, b = dequantized(base).double(), base.bias.double()
    R = dense(*layer.coefficients("a", dtype=torch.float64), 64)
    with pytest.warns(UserWarning, match=REQUANTIZED):
        layer.merge()
    torch.testing.assert_close(base.bias.double(), R @ b, rtol=1e-6, atol=1e-6)
    target = R @ W
    err = (dequantized(base).double() - target).abs()
    # Round to nearest: within half the largest gap of the code book times the block's scale (4-bit:
    # absmax of 64 consecutive entries, rows hold two blocks; int8: absmax of the row, after fp16).
    half_gap = {"nf4": (1 - 0.6962) / 2, "fp4": (1 - 0.6667) / 2, "int8": 0.5 / 127}[kind]
    block = 64 if kind != "int8" else 128
    scale = target.reshape(-1, block).abs().amax(dim=1, keepdim=True)
    assert (err.reshape(-1, block) <= (half_gap + 1e-3) * scale).all()


def test_several_adapters_merge_in_one_requantization():
    base = layer_of("nf4")
    layer = Linear4bit(base, "a", "road_1", 64, init_weights=False)
    layer.update_layer("b", "road_2", 32, init_weights=False)
    layer.set_adapter(["a", "b"])
    h = torch.randn(3, 128)
    with torch.no_grad():
        adapted = layer(h)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        layer.merge()
    assert len(record) == 1 and REQUANTIZED in str(record[0].message)
    assert layer.merged_adapters == ["a", "b"]
    with torch.no_grad():
        assert rel(layer(h), adapted) < MERGE_TOL["nf4"]


@pytest.mark.parametrize("kind", KINDS)
def test_safe_merge_refuses_nan_and_leaves_the_quantized_weights_byte_identical(bases, kind):
    rm = get_peft_model(copy.deepcopy(bases[kind]), all_linear()).eval()
    with torch.no_grad():
        rm(ids())  # the layout a merge would read after inference (repacked 4-bit on AVX512-BF16 CPUs)
        for _, layer in rm.road_layers():
            layer.road_theta["default"][3] = float("nan")
    before = {path: snapshot(layer.base_layer) for path, layer in rm.road_layers()}
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with pytest.raises(ValueError, match="NaN or inf"):
            rm.merge_adapter(safe_merge=True)
    assert not [w for w in record if REQUANTIZED in str(w.message)]
    for path, layer in rm.road_layers():
        assert not layer.merged_adapters
        after = snapshot(layer.base_layer)
        assert all(torch.equal(a, b) for a, b in zip(after, before[path], strict=True)), path


def test_8bit_layer_with_float_weights_merges_like_a_float_linear():
    torch.manual_seed(0)
    lin = nn.Linear(128, 128)
    base = bnb.nn.Linear8bitLt(128, 128, has_fp16_weights=True)
    base.load_state_dict(lin.state_dict())
    base.requires_grad_(False)
    layer = Linear8bitLt(base, "a", "road_4", 64, init_weights=False)
    h = torch.randn(3, 128)
    with torch.no_grad():
        layer(h)  # caches an int8 copy of the weight in the layer's state
        R = dense(*layer.coefficients("a", dtype=torch.float64), 64)
        with pytest.warns(UserWarning, match=REQUANTIZED):
            layer.merge()
        torch.testing.assert_close(base.weight.double(), R @ lin.weight.double(), rtol=1e-6, atol=1e-6)
        assert base.state.CB is None  # the stale int8 copy is gone; the next call quantizes the new weight
        expected = torch.nn.functional.linear(h, base.weight, base.bias)
        assert rel(layer(h), expected) < MERGE_TOL["int8"]


@pytest.mark.parametrize("kind", KINDS)
def test_checkpoint_round_trip_onto_a_fresh_quantized_model(bases, tmp_path, kind):
    rm = get_peft_model(copy.deepcopy(bases[kind]), all_linear("road_4")).eval()
    x = ids()
    with torch.no_grad():
        expected = rm(x).logits
    rm.save_pretrained(tmp_path)
    loaded = RoadModel.from_pretrained(quantize(tiny_llama(layers=1), kind), tmp_path).eval()
    assert all(type(layer) is WRAPPER[kind] for _, layer in loaded.road_layers())
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, expected, rtol=0, atol=0)
    on_float = RoadModel.from_pretrained(tiny_llama(layers=1), tmp_path)  # same keys and shapes on the float base
    assert {p for p, _ in on_float.road_layers()} == {p for p, _ in loaded.road_layers()}


@pytest.mark.parametrize("kind", KINDS)
def test_parity_with_peft_forward_and_merged_weights(bases, kind):
    peft = pytest.importorskip("peft")
    base = copy.deepcopy(bases[kind])
    # PEFT dispatches to its bitsandbytes layers only for models flagged as loaded in 4 / 8 bits.
    setattr(base, "is_loaded_in_8bit" if kind == "int8" else "is_loaded_in_4bit", True)
    torch.manual_seed(0)
    pm = peft.get_peft_model(
        copy.deepcopy(base),
        peft.RoadConfig(variant="road_4", group_size=64, init_weights=False, target_modules="all-linear"),
    )
    rm = get_peft_model(base, all_linear("road_4"))
    src = {n.removeprefix("base_model.model."): p for n, p in pm.named_parameters() if ".road_" in n}
    dst = {n.removeprefix("model."): p for n, p in rm.named_parameters() if ".road_" in n}
    assert sorted(src) == sorted(dst)
    with torch.no_grad():
        for key, p in src.items():
            dst[key].copy_(p)
    x = ids()
    # Training mode, no gradients: bitsandbytes keeps its float32 4-bit path (no CPU repacking,
    # whose bfloat16 kernel would turn last-bit differences into 1e-3 ones, and which PEFT's merge cannot read).
    pm.train()
    rm.train()
    with torch.no_grad():
        torch.testing.assert_close(rm(x).logits, pm(x).logits, rtol=1e-5, atol=1e-5)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm.merge_adapter()
            rm.merge_adapter()
        for path, layer in rm.road_layers():
            theirs = pm.base_model.model.get_submodule(path).get_base_layer()
            assert torch.equal(layer.base_layer.weight.data, theirs.weight.data), path
        torch.testing.assert_close(rm(x).logits, pm(x).logits, rtol=1e-5, atol=1e-5)
