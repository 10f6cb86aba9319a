"""The usage examples of the seed documents (PEFT's RoAd docs), with `peft` replaced by `roadkit`.

Models come from a local directory written by `save_pretrained` (nothing is downloaded), so the
examples' `AutoModelForCausalLM.from_pretrained(...)` lines run as written, on a tiny model.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_llama


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama().save_pretrained(path)
    return str(path)


def test_basic_configuration(model_dir, capsys):
    from transformers import AutoModelForCausalLM

    from roadkit import RoadConfig, get_peft_model

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    config = RoadConfig(variant="road_1", group_size=64, target_modules=["q_proj", "v_proj"])
    model = get_peft_model(model, config)
    model.print_trainable_parameters()
    # road_1: out_features / 2 angles and as many scales per layer
    hidden, layers = model.config.hidden_size, model.config.num_hidden_layers
    expected = layers * (hidden + model.config.num_key_value_heads * (hidden // 4))
    assert model.num_parameters(only_trainable=True) == expected
    assert f"trainable params: {expected:,d}" in capsys.readouterr().out


def test_comparing_variants(model_dir):
    from transformers import AutoModelForCausalLM

    from roadkit import RoadConfig, get_peft_model

    base_model = AutoModelForCausalLM.from_pretrained(model_dir)
    counts = {}
    for variant in ["road_1", "road_2", "road_4"]:
        model = copy.deepcopy(base_model)
        config = RoadConfig(variant=variant, target_modules=["q_proj", "v_proj"], group_size=64)
        counts[variant] = get_peft_model(model, config).num_parameters(only_trainable=True)
    assert counts["road_2"] == 2 * counts["road_1"] and counts["road_4"] == 4 * counts["road_1"]


@pytest.mark.parametrize(
    "target_modules", ["all-linear", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]]
)
def test_all_linear_and_full_configuration(model_dir, target_modules):
    from transformers import AutoModelForCausalLM

    from roadkit import RoadConfig, get_peft_model

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    config = RoadConfig(
        variant="road_2", group_size=64, init_weights=True, target_modules=target_modules, modules_to_save=None
    )
    peft_model = get_peft_model(model, config)
    wrapped = {p.rsplit(".", 1)[-1] for p, _ in peft_model.road_layers()}
    assert wrapped == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_regex_target_modules_on_t5():
    from transformers import T5Config, T5ForConditionalGeneration

    from roadkit import RoadConfig, get_peft_model

    model = T5ForConditionalGeneration(
        T5Config(vocab_size=64, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, decoder_start_token_id=0)
    )
    config = RoadConfig(
        variant="road_2", target_modules=".*decoder.*(SelfAttention|EncDecAttention).*(q|v)$", group_size=64
    )
    paths = [p for p, _ in get_peft_model(model, config).road_layers()]
    assert len(paths) == 2 * 2 * 2  # 2 decoder blocks x (self, cross) attention x (q, v)
    assert all(p.startswith("decoder.") and p[-2:] in (".q", ".v") for p in paths)


def test_modules_to_save_and_mixed_batch(model_dir):
    from transformers import AutoModelForSequenceClassification

    from roadkit import RoadConfig, get_peft_model

    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=3)
    model.config.pad_token_id = 0
    config = RoadConfig(
        variant="road_2",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        modules_to_save=["classifier", "score"],
        group_size=64,
    )
    peft_model = get_peft_model(model, config, adapter_name="adapter1")
    peft_model.add_adapter(
        "adapter2",
        RoadConfig(
            variant="road_4", target_modules=["q_proj"], group_size=64, init_weights=False, modules_to_save=["score"]
        ),
    )
    assert any(
        n.endswith("score.modules_to_save.adapter1.weight") for n, p in peft_model.named_parameters() if p.requires_grad
    )
    input_ids = torch.randint(1, 96, (3, 7))
    peft_model.eval()
    with torch.no_grad():
        outputs = peft_model(input_ids, adapter_names=["adapter1", "adapter1", "adapter2"])
        peft_model.set_adapter("adapter2")
        alone = peft_model(input_ids)
    torch.testing.assert_close(outputs.logits[2], alone.logits[2], rtol=1e-6, atol=1e-6)
