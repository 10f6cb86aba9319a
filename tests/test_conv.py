"""RoAd on nn.Conv1d / Conv2d / Conv3d: output channels rotated, against dense references."""

from __future__ import annotations

import pytest
import torch
from test_functional import dense
from torch import nn

from roadkit import Conv, RoadConfig, RoadModel, get_peft_model

CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


class CNN(nn.Module):
    def __init__(self, dims: int = 2) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv0 = CONVS[dims](3, 16, 3, padding=1)
        self.conv1 = CONVS[dims](16, 16, 3, padding=1)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.conv1(torch.relu(self.conv0(x))).flatten(2).mean(-1))


def channels_last(y: torch.Tensor, channel_axis: int) -> torch.Tensor:
    return y.movedim(channel_axis, -1)


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("batched", [True, False])
def test_conv_output_channels_rotate_like_the_dense_matrix(dims, batched):
    conv = CONVS[dims](3, 8, 3)
    layer = Conv(conv, "a", "road_4", 4, init_weights=False)
    spatial = (5,) * dims
    x = torch.randn(((2,) if batched else ()) + (3,) + spatial)
    axis = -(dims + 1)
    with torch.no_grad():
        R = dense(*layer.coefficients("a"), 4)
        expected = channels_last(conv(x), axis) @ R.T
        torch.testing.assert_close(channels_last(layer(x), axis), expected, rtol=1e-5, atol=1e-5)
        layer.merge()
        torch.testing.assert_close(channels_last(layer.base_layer(x), axis), expected, rtol=1e-5, atol=1e-5)
        layer.unmerge()
        torch.testing.assert_close(channels_last(layer(x), axis), expected, rtol=1e-5, atol=1e-5)


def test_model_with_convs_merges_mixes_and_round_trips(tmp_path):
    rm = get_peft_model(
        CNN(), RoadConfig(variant="road_2", group_size=8, init_weights=False, target_modules=["conv0", "conv1"])
    )
    rm.add_adapter("b", RoadConfig(variant="road_1", group_size=4, init_weights=False, target_modules=["conv1"]))
    rm.eval()
    x = torch.randn(3, 3, 6, 6)
    names = ["b", "default", "__base__"]
    with torch.no_grad():
        mixed = rm(x, adapter_names=names)
        singles = {}
        for name in ("default", "b"):
            rm.set_adapter(name)
            singles[name] = rm(x)
        with rm.disable_adapter():
            singles["__base__"] = rm(x)
        for i, name in enumerate(names):
            torch.testing.assert_close(mixed[i], singles[name][i], rtol=1e-5, atol=1e-5)
        rm.set_adapter("default")
        rm.merge_adapter()
        torch.testing.assert_close(rm(x), singles["default"], rtol=1e-5, atol=1e-5)
        rm.unmerge_adapter()
    rm.save_pretrained(tmp_path)
    loaded = RoadModel.from_pretrained(CNN(), tmp_path)
    loaded.load_adapter(tmp_path / "b", "b")
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), singles["default"], rtol=0, atol=0)
        loaded.set_adapter("b")
        torch.testing.assert_close(loaded(x), singles["b"], rtol=0, atol=0)


def test_all_linear_leaves_convolutions_alone():
    rm = get_peft_model(CNN(), RoadConfig(group_size=2, target_modules="all-linear"))
    assert [p for p, _ in rm.road_layers()] == ["head"]


def test_conv_gradients_reach_only_the_adapter():
    rm = get_peft_model(CNN(), RoadConfig(variant="road_4", group_size=8, target_modules=["conv0", "conv1"]))
    rm.train()
    rm(torch.randn(2, 3, 6, 6)).square().sum().backward()
    grads = {n for n, p in rm.named_parameters() if p.grad is not None}
    assert grads and all("road_" in n for n in grads)
