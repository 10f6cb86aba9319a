"""torch.compile traces RoAd layers, and mixed-batch serving through the model, without graph breaks
(checked with fullgraph=True)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama
from torch import nn

from roadkit import Linear, RoadConfig, get_peft_model
from roadkit.layers import Routing


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


def test_compiled_mixed_batch_layer_matches_eager():
    """Per-row routing inside a compiled graph: the tables are built in the graph, no graph breaks."""
    layer = make_layer().eval()
    layer.update_layer("c", "road_2", 8, init_weights=False)  # a third adapter, of group size 8 like "a"
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x = torch.randn(4, 16)
    names = ("a", "__base__", "c", "b")
    layer.routing = Routing(names, torch.tensor([2, 0, 1, 3], dtype=torch.int32))
    try:
        with torch.no_grad():
            got, want = compiled(x), layer(x)
    finally:
        layer.routing = None
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    with torch.no_grad():  # and the routing reaches the rows: rows differ from the plain base output
        assert (got[2] - layer.base_layer(x)[2]).abs().max() < 1e-6  # row 2 is "__base__"
        assert (got[0] - layer.base_layer(x)[0]).abs().max() > 1e-3


@pytest.fixture(scope="module")
def served():
    """A tiny Llama with two adapters of different group sizes, in eval mode."""
    model = get_peft_model(
        tiny_llama(hidden=64), RoadConfig(target_modules=["q_proj", "up_proj"], group_size=16, init_weights=False)
    )
    model.add_adapter("b", RoadConfig(target_modules=["v_proj", "up_proj"], group_size=8, init_weights=False))
    return model.eval()


def test_compiled_model_serves_mixed_batches_without_graph_breaks(served):
    names = ["default", "b", "__base__"]
    ids = torch.randint(0, 96, (3, 6), generator=torch.Generator().manual_seed(0))
    torch._dynamo.reset()
    compiled = torch.compile(served, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        got = compiled(input_ids=ids, adapter_names=names).logits
        want = served(input_ids=ids, adapter_names=names).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_compiled_model_routes_a_mixed_batch_after_compiling_without_one(served):
    """The graph compiled for a plain call must not be reused for a routed one (the routing is guarded)."""
    names = ["b", "__base__", "default"]
    ids = torch.randint(0, 96, (3, 6), generator=torch.Generator().manual_seed(3))
    torch._dynamo.reset()
    compiled = torch.compile(served, backend="aot_eager")
    with torch.no_grad():
        plain = compiled(input_ids=ids).logits
        got = compiled(input_ids=ids, adapter_names=names).logits
        want = served(input_ids=ids, adapter_names=names).logits
        torch.testing.assert_close(plain, served(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got - plain).abs().max() > 1e-3  # the routing changes the result


def test_compiled_model_routes_by_indices_without_recompiling(served):
    """A server keeps one list of adapter names and passes per-call indices: one graph for all of them,
    batch sizes included (after the one recompile that makes the shapes dynamic)."""
    names = ["default", "b", "__base__"]
    gen = torch.Generator().manual_seed(1)
    torch._dynamo.reset()
    compiled = torch.compile(served, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        for batch, seq in ((2, 5), (3, 6)):
            compiled(
                input_ids=torch.randint(0, 96, (batch, seq), generator=gen),
                adapter_names=names,
                adapter_indices=torch.randint(0, len(names), (batch, seq), generator=gen),
            )
        with torch._dynamo.config.patch(error_on_recompile=True):
            for batch, seq in ((4, 7), (3, 6), (5, 9)):
                ids = torch.randint(0, 96, (batch, seq), generator=gen)
                index = torch.randint(0, len(names), (batch, seq), generator=gen)  # per token
                got = compiled(input_ids=ids, adapter_names=names, adapter_indices=index).logits
                want = served(input_ids=ids, adapter_names=names, adapter_indices=index).logits
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        with pytest.raises(RuntimeError, match=r"adapter_indices must lie in \[0, 3\)"):
            compiled(input_ids=ids, adapter_names=names, adapter_indices=torch.full((batch, seq), 3))


def test_compiled_base_model_takes_the_mixed_batch_tables_as_inputs(served):
    """With the base model compiled and the wrapper routing the call, the coefficient tables come from
    the layers' caches: the graph does not rebuild them, whatever the adapter count."""
    graphs = []

    def record(gm, _inputs):
        graphs.append(gm)
        return gm.forward

    names = ["default", "b", "__base__"]
    ids = torch.randint(0, 96, (3, 6), generator=torch.Generator().manual_seed(2))
    index = torch.tensor([1, 0, 2])
    torch._dynamo.reset()
    inner = served.get_base_model()
    inner.compile(fullgraph=True, backend=record)
    try:
        with torch.no_grad():
            got = served(input_ids=ids, adapter_names=names, adapter_indices=index).logits
    finally:
        inner._compiled_call_impl = None  # back to eager for the other tests
    with torch.no_grad():
        want = served(input_ids=ids, adapter_names=names, adapter_indices=index).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    ops = [
        getattr(n.target, "__name__", str(n.target))
        for g in graphs
        for n in g.graph.nodes
        if n.op in ("call_function", "call_method")
    ]
    assert len(graphs) == 1 and "index_select" in ops  # the mixed-batch gather is in the graph
    read = [n.name for g in graphs for n in g.graph.nodes if n.op in ("placeholder", "get_attr")]
    assert not [n for n in read if "road_theta" in n or "road_alpha" in n]  # no adapter parameter is read
    assert [n for n in read if "q_proj" in n]  # (the graph does name the layers' inputs)
