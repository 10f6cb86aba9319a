"""RoAd on transformers' Conv1D (GPT-2): PEFT's RoAd refuses these layers, so the references here are
dense matrices and roadkit's own single-adapter runs."""

from __future__ import annotations

import pytest
import torch
from conftest import train_steps
from test_functional import dense

from roadkit import RoadConfig, RoadModel, TransformersConv1D, get_peft_model
from roadkit import functional as F


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=96, n_embd=128, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
    )
    return GPT2LMHeadModel(cfg).eval()


def ids(rows: int = 3, seq: int = 8) -> torch.Tensor:
    return torch.randint(0, 96, (rows, seq), generator=torch.Generator().manual_seed(7))


def test_default_targets_wrap_c_attn():
    rm = get_peft_model(tiny_gpt2(), RoadConfig(group_size=64))
    paths = [p for p, _ in rm.road_layers()]
    assert paths == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    assert all(isinstance(layer, TransformersConv1D) for _, layer in rm.road_layers())
    assert all(layer.out_features == 384 and layer.in_features == 128 for _, layer in rm.road_layers())


def test_all_linear_includes_conv1d_but_not_the_head():
    rm = get_peft_model(tiny_gpt2(), RoadConfig(group_size=64, target_modules="all-linear"))
    names = {p.rsplit(".", 1)[-1] for p, _ in rm.road_layers()}
    assert names == {"c_attn", "c_proj", "c_fc"}


@pytest.mark.parametrize("variant", ["road_1", "road_2", "road_4"])
def test_forward_and_merge_follow_the_dense_rotation(variant):
    rm = get_peft_model(
        tiny_gpt2(), RoadConfig(variant=variant, group_size=64, init_weights=False, target_modules="all-linear")
    ).eval()
    path, layer = next(iter(rm.road_layers()))
    h = torch.randn(2, 5, layer.in_features)
    with torch.no_grad():
        R = dense(*layer.coefficients("default"), 64)
        base = layer.base_layer(h)
        torch.testing.assert_close(layer(h), base @ R.T, rtol=1e-5, atol=1e-5)
        W0, b0 = layer.base_layer.weight.clone(), layer.base_layer.bias.clone()
        x = ids()
        adapted = rm(x).logits
        rm.merge_adapter()
        torch.testing.assert_close(layer.base_layer.weight, W0 @ R.T, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer.base_layer.bias, R @ b0, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(rm(x).logits, adapted, rtol=1e-5, atol=1e-5)
        rm.unmerge_adapter()
    torch.testing.assert_close(layer.base_layer.weight, W0, rtol=1e-6, atol=1e-6)
    plain = rm.merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(plain(x).logits, adapted, rtol=1e-5, atol=1e-5)


def test_mixed_batch_rows_equal_single_adapter_runs():
    rm = get_peft_model(tiny_gpt2(), RoadConfig(variant="road_2", group_size=64, init_weights=False))
    rm.add_adapter("b", RoadConfig(variant="road_4", group_size=32, init_weights=False, target_modules="all-linear"))
    rm.eval()
    x = ids(4)
    names = ["b", "__base__", "default", "b"]
    with torch.no_grad():
        mixed = rm(x, adapter_names=names).logits
        for name in ("default", "b"):
            rm.set_adapter(name)
            single = rm(x).logits
            rows = [i for i, n in enumerate(names) if n == name]
            torch.testing.assert_close(mixed[rows], single[rows], rtol=1e-5, atol=1e-5)
        with rm.disable_adapter():
            torch.testing.assert_close(mixed[1], rm(x).logits[1], rtol=1e-5, atol=1e-5)


def test_save_and_load_round_trip(tmp_path):
    rm = get_peft_model(tiny_gpt2(), RoadConfig(variant="road_1", group_size=64, init_weights=False)).eval()
    x = ids()
    with torch.no_grad():
        expected = rm(x).logits
    rm.save_pretrained(tmp_path)
    loaded = RoadModel.from_pretrained(tiny_gpt2(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, expected, rtol=0, atol=0)


def test_a_few_training_steps_lower_the_loss():
    rm = get_peft_model(tiny_gpt2(), RoadConfig(variant="road_4", group_size=64, target_modules="all-linear"))
    losses = train_steps(rm, ids(4, 16), 15)
    assert losses[-1] < 0.95 * losses[0]
    assert all(p.grad is None for n, p in rm.named_parameters() if "road_" not in n)


def test_group_size_must_divide_conv1d_outputs():
    with pytest.raises(ValueError, match=r"c_attn'.*out_features=384 is not divisible by group_size=256"):
        get_peft_model(tiny_gpt2(), RoadConfig(group_size=256))


def test_rotate_rows_on_transposed_weight_view_writes_through():
    g, d = 4, 8
    coeffs = F.coefficients("road_2", g, torch.randn(d, dtype=torch.float64), torch.rand(d, dtype=torch.float64) + 1)
    W = torch.randn(5, d)  # Conv1D layout: (in, out)
    expected = W @ dense(*coeffs, g).T.float()
    F.rotate_rows_(W.movedim(1, 0), coeffs, g)
    torch.testing.assert_close(W, expected, rtol=1e-6, atol=1e-6)
