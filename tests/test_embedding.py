"""RoAd on nn.Embedding: embedding vectors rotated, merges into the table, tied tables refused."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama
from test_functional import dense
from torch import nn

from roadkit import Embedding, RoadConfig, RoadModel, get_peft_model


def test_embedding_vectors_rotate_like_the_dense_matrix_and_merge_into_the_table():
    torch.manual_seed(0)
    emb = nn.Embedding(20, 8)
    layer = Embedding(emb, "a", "road_2", 4, init_weights=False)
    ids = torch.randint(0, 20, (3, 5))
    with torch.no_grad():
        R = dense(*layer.coefficients("a"), 4)
        expected = emb(ids) @ R.T
        torch.testing.assert_close(layer(ids), expected, rtol=1e-6, atol=1e-6)
        table = emb.weight.clone()
        layer.merge()
        torch.testing.assert_close(emb.weight, table @ R.T, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(layer(ids), expected, rtol=1e-6, atol=1e-6)
        layer.unmerge()
    torch.testing.assert_close(emb.weight, table, rtol=1e-6, atol=1e-6)


def untied_llama():
    model = tiny_llama()
    model.config.tie_word_embeddings = False
    model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())
    return model


def test_embedding_adapter_in_a_model_mixes_merges_and_round_trips(tmp_path, input_ids):
    rm = get_peft_model(
        untied_llama(),
        RoadConfig(variant="road_1", group_size=32, init_weights=False, target_modules=["embed_tokens", "q_proj"]),
    ).eval()
    rm.add_adapter(
        "b", RoadConfig(variant="road_4", group_size=64, init_weights=False, target_modules=["embed_tokens"])
    )
    names = ["b", "default", "__base__", "b"]
    with torch.no_grad():
        mixed = rm(input_ids, adapter_names=names).logits
        singles = {}
        for name in ("default", "b"):
            rm.set_adapter(name)
            singles[name] = rm(input_ids).logits
        with rm.disable_adapter():
            singles["__base__"] = rm(input_ids).logits
        for i, name in enumerate(names):
            torch.testing.assert_close(mixed[i], singles[name][i], rtol=1e-5, atol=1e-5)
        rm.set_adapter("default")
        rm.merge_adapter()
        torch.testing.assert_close(rm(input_ids).logits, singles["default"], rtol=1e-5, atol=1e-5)
        rm.unmerge_adapter()
    rm.save_pretrained(tmp_path)
    loaded = RoadModel.from_pretrained(untied_llama(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids).logits, singles["default"], rtol=0, atol=0)


def test_merging_into_a_tied_table_is_refused_and_changes_nothing():
    model = tiny_llama()
    model.lm_head.weight = model.model.embed_tokens.weight  # tie input and output embeddings
    rm = get_peft_model(model, RoadConfig(group_size=32, init_weights=False, target_modules=["embed_tokens"]))
    before = {k: v.clone() for k, v in rm.state_dict().items()}
    with pytest.raises(ValueError, match=r"cannot merge into 'model.embed_tokens'.*shared with \['lm_head'\]"):
        rm.merge_adapter()
    assert not any(layer.merged for _, layer in rm.road_layers())
    assert all(torch.equal(v, before[k]) for k, v in rm.state_dict().items())
