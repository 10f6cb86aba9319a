"""torch.compile traces RoAd layers without graph breaks (checked with fullgraph=True)."""

from __future__ import annotations

import torch
from torch import nn

from roadkit import Linear


def make_layer():
    torch.manual_seed(0)
    layer = Linear(nn.Linear(16, 32), "a", "road_4", 8, init_weights=False)
    layer.update_layer("b", "road_1", 4, init_weights=False)
    layer.set_adapter(["a", "b"])
    return layer


def test_compiled_layer_trains_without_graph_breaks():
    layer = make_layer()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x = torch.randn(3, 5, 16)
    compiled(x).square().sum().backward()
    got = [p.grad.clone() for p in (layer.road_theta["a"], layer.road_alpha["b"])]
    layer.zero_grad()
    layer(x).square().sum().backward()
    want = [layer.road_theta["a"].grad, layer.road_alpha["b"].grad]
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_compiled_layer_inference_matches_eager():
    layer = make_layer().eval()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x = torch.randn(4, 16)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), layer(x), rtol=1e-6, atol=1e-6)
