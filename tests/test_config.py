"""RoadConfig: validation messages, variant aliases, adapter_config.json round trip."""

from __future__ import annotations

import json

import pytest

from roadkit import RoadConfig


@pytest.mark.parametrize(
    "given, canonical", [("road_1", "road_1"), ("1", "road_1"), (2, "road_2"), ("4", "road_4"), ("road_4", "road_4")]
)
def test_variant_aliases(given, canonical):
    assert RoadConfig(variant=given).variant == canonical


@pytest.mark.parametrize("bad", ["road_3", "lora", 3, ""])
def test_bad_variant_names_value_and_allowed(bad):
    with pytest.raises(ValueError, match=r"variant=.*road_1, road_2, road_4"):
        RoadConfig(variant=bad)


@pytest.mark.parametrize("bad", [0, -2, 3, 7, 2.0, "8", True])
def test_bad_group_size_names_value(bad):
    with pytest.raises(ValueError, match=rf"group_size must be a positive even integer, got {bad!r}"):
        RoadConfig(group_size=bad)


def test_target_modules_type_checked():
    with pytest.raises(TypeError, match="target_modules must be a list of module names or a regex string"):
        RoadConfig(target_modules=42)
    with pytest.raises(ValueError, match="non-empty module names"):
        RoadConfig(target_modules=["q_proj", ""])


def test_layers_to_transform_checked():
    assert RoadConfig(layers_to_transform=1).layers_to_transform == [1]
    with pytest.raises(ValueError, match="layers_to_transform"):
        RoadConfig(layers_to_transform=[-1])


def test_seq_cls_adds_heads_to_modules_to_save():
    cfg = RoadConfig(task_type="SEQ_CLS", modules_to_save=["pooler"])
    assert cfg.modules_to_save == ["pooler", "classifier", "score"]


def test_json_round_trip_and_unknown_keys_ignored(tmp_path):
    cfg = RoadConfig(
        variant="road_4",
        group_size=8,
        target_modules=["q_proj", "v_proj"],
        modules_to_save=["score"],
        init_weights=False,
    )
    cfg.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["peft_type"] == "ROAD" and data["variant"] == "road_4" and data["group_size"] == 8
    data["some_future_peft_key"] = 1
    (tmp_path / "adapter_config.json").write_text(json.dumps(data))
    assert RoadConfig.from_pretrained(tmp_path) == cfg


def test_set_of_targets_is_stored_sorted():
    assert RoadConfig(target_modules={"v_proj", "q_proj"}).target_modules == ["q_proj", "v_proj"]


def test_other_peft_type_rejected(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    with pytest.raises(ValueError, match="peft_type='LORA'"):
        RoadConfig.from_pretrained(tmp_path)


def test_missing_config_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        RoadConfig.from_pretrained(tmp_path)
