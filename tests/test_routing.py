"""Routings across devices, and the modules-to-save copies in a mixed batch."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import roadkit
from roadkit import ModulesToSaveWrapper, RoadConfig, get_peft_model
from roadkit.layers import Routing


class MoveTo(nn.Module):
    """Moves its input to another device, as accelerate's hooks do between the parts of a `device_map` split."""

    def __init__(self, device: str) -> None:
        super().__init__()
        self.device = device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.device)


def split_model(second: str) -> nn.Module:
    """Two adapted linear layers, the first on the CPU, the second (and its input) on `second`."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), MoveTo(second), nn.Linear(8, 8, device=second))


def test_each_layer_gets_the_routing_index_on_its_own_device(monkeypatch):
    # A `device_map` split: the index must reach each layer on that layer's device (a CPU index on a CUDA
    # layer breaks the torch path's gather and hands Triton a pointer into another device). On the CPU the
    # other device is "meta", where nothing checks devices: the kernels' entry point checks them instead.
    rm = get_peft_model(split_model("meta"), RoadConfig(target_modules=["0", "2"], group_size=4, init_weights=False))
    seen = []
    inner = roadkit.kernels.forward_indexed

    def spy(x, c_table, s_table, index, *args, **kwargs):
        seen.append((x.device.type, index.device.type))
        return inner(x, c_table, s_table, index, *args, **kwargs)

    monkeypatch.setattr(roadkit.kernels, "forward_indexed", spy)
    routing = rm.eval().route(["default", "__base__", "default"])
    with torch.no_grad():
        for _ in range(2):
            assert rm(torch.randn(3, 8), routing=routing).device.type == "meta"
    assert seen == [("cpu", "cpu"), ("meta", "meta")] * 2
    assert routing.index.device.type == "cpu"  # the routing's own index stays where it was made


def test_a_routing_moves_its_index_once_per_device():
    routing = Routing(("a", "b"), torch.tensor([1, 0, 1], dtype=torch.int32))
    assert routing.index_on(torch.device("cpu")) is routing.index  # the same device: no copy
    moved = routing.index_on(torch.device("meta"))
    assert moved.device.type == "meta" and moved.dtype == torch.int32 and moved.shape == (3,)
    assert routing.index_on(torch.device("meta")) is moved  # kept: later calls move nothing


def test_a_routing_is_refused_once_an_adapter_it_uses_is_deleted():
    config = RoadConfig(target_modules=["0"], group_size=4, init_weights=False)
    rm = get_peft_model(nn.Sequential(nn.Linear(8, 8)), config)
    rm.add_adapter("b", config)
    routing = rm.eval().route(["default", "b"])
    rm.delete_adapter("b")
    with pytest.raises(ValueError, match=r"uses adapters \['b'\], deleted since it was made"):
        rm(torch.randn(2, 8), routing=routing)


def _mixed_outputs_on(devices: tuple[str, str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The same mixed batch on a model split across `devices`, and on the CPU alone."""
    config = RoadConfig(target_modules=["0", "2"], group_size=4, init_weights=False)
    split = get_peft_model(nn.Sequential(nn.Linear(8, 8), MoveTo(devices[1]), nn.Linear(8, 8)), config)
    split.add_adapter("b", config)
    whole = get_peft_model(nn.Sequential(nn.Linear(8, 8), nn.Identity(), nn.Linear(8, 8)), config)
    whole.add_adapter("b", config)
    whole.load_state_dict(split.state_dict())
    split.model[0].to(devices[0])
    split.model[2].to(devices[1])
    x = torch.randn(4, 8)
    names = ["default", "b", "__base__", "b"]
    with torch.no_grad():
        return split.eval()(x.to(devices[0]), adapter_names=names).cpu(), whole.eval()(x, adapter_names=names)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_model_split_between_the_cpu_and_a_gpu_routes_mixed_batches():
    got, want = _mixed_outputs_on(("cpu", "cuda:0"))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_a_model_split_across_two_gpus_routes_mixed_batches():
    got, want = _mixed_outputs_on(("cuda:0", "cuda:1"))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ---- modules to save in a mixed batch ----------------------------------------------------------------


class Scaled(nn.Module):
    """A head that takes a per-row input beside x, as a module to save may."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, scale: torch.Tensor, shift: float = 0.0) -> torch.Tensor:
        return self.linear(x) * scale + shift


def routed(wrapper: nn.Module, routing: Routing, *args, **kwargs):
    wrapper.routing = routing
    try:
        with torch.no_grad():
            return wrapper(*args, **kwargs)
    finally:
        wrapper.routing = None


def test_modules_to_save_split_per_row_arguments_with_their_rows():
    # A tensor whose first axis has the batch's length goes with the rows; anything else goes to every copy.
    torch.manual_seed(0)
    wrapper = ModulesToSaveWrapper(Scaled(), "a")
    wrapper.add_adapter("b")
    with torch.no_grad():
        wrapper.modules_to_save["b"].linear.weight.mul_(2)
    x, scale, shift = torch.randn(3, 4), torch.tensor([[1.0], [2.0], [3.0]]), torch.randn(4)
    routing = Routing(("a", "b", "__base__"), torch.tensor([1, 0, 2]))
    modules = [wrapper.modules_to_save["b"], wrapper.modules_to_save["a"], wrapper.original_module]
    with torch.no_grad():
        want = torch.cat([m(x[i : i + 1], scale[i : i + 1], shift) for i, m in enumerate(modules)])
    torch.testing.assert_close(routed(wrapper, routing, x, scale, shift), want)
    torch.testing.assert_close(routed(wrapper, routing, x, scale=scale, shift=shift), want)


def test_modules_to_save_answer_an_empty_batch_with_an_empty_output():
    wrapper = ModulesToSaveWrapper(nn.Linear(4, 6), "a")
    out = routed(wrapper, Routing(("a",), torch.zeros(0, dtype=torch.long)), torch.randn(0, 4))
    assert isinstance(out, torch.Tensor) and out.shape == (0, 6)
