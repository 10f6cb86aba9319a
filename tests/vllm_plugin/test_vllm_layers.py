"""`RoadLinear` around vLLM's own linear layers, against dense matrices: y = R (W x + b).

Covers the layer kinds the model tests do not reach: replicated layers, and column- and
row-parallel layers with `skip_bias_add` (the bias comes back separately and the caller adds it,
so the layer must return R(y + b) - b). One process, tensor-parallel size 1.
"""

from __future__ import annotations

import socket

import pytest
import torch
from vllm.config import VllmConfig, set_current_vllm_config
from vllm.config.lora import LoRAConfig
from vllm.distributed import init_distributed_environment, initialize_model_parallel
from vllm.lora.layers import ColumnParallelLinearWithLoRA, ReplicatedLinearWithLoRA, RowParallelLinearWithLoRA
from vllm.lora.punica_wrapper import get_punica_wrapper
from vllm.model_executor.layers.linear import ColumnParallelLinear, ReplicatedLinear, RowParallelLinear

from roadkit import functional as F
from roadkit.integrations.vllm.adapter import ModuleRotation
from roadkit.integrations.vllm.layers import RoadLinear
from roadkit.integrations.vllm.slots import SlotRouting

N_SLOTS, TOKENS, D_IN, D_OUT = 3, 5, 48, 64


@pytest.fixture(scope="module")
def vllm_context():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = VllmConfig()
    with set_current_vllm_config(config):
        init_distributed_environment(1, 0, f"tcp://127.0.0.1:{port}", 0, backend="gloo")
        initialize_model_parallel(1)
        yield config


def dense(rotation: ModuleRotation) -> torch.Tensor:
    """R as a d x d matrix: pairs j and j + g/2 inside each group of g."""
    c, s, g = rotation.c.double(), rotation.s.double(), rotation.group_size
    r = torch.diag(c)
    for start in range(0, c.shape[0], g):
        for j in range(g // 2):
            a, b = start + j, start + j + g // 2
            r[a, b], r[b, a] = -s[a], s[b]
    return r


def rotation(group_size: int, seed: int, variant: str = "road_2") -> ModuleRotation:
    g = torch.Generator().manual_seed(seed)
    n = F.parameter_length(variant, D_OUT)
    theta, alpha = torch.randn(n, generator=g), 1 + 0.3 * torch.randn(n, generator=g)
    c, s = F.coefficients(variant, group_size, theta, alpha)
    return ModuleRotation(c, s, group_size)


CASES = {
    "replicated": (ReplicatedLinear, ReplicatedLinearWithLoRA, {}),
    "replicated, skip_bias_add": (ReplicatedLinear, ReplicatedLinearWithLoRA, {"skip_bias_add": True}),
    "column, skip_bias_add": (ColumnParallelLinear, ColumnParallelLinearWithLoRA, {"skip_bias_add": True}),
    "row": (RowParallelLinear, RowParallelLinearWithLoRA, {}),
    "row, skip_bias_add": (RowParallelLinear, RowParallelLinearWithLoRA, {"skip_bias_add": True}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_road_linear_equals_dense(vllm_context, case: str) -> None:
    base_cls, lora_cls, kwargs = CASES[case]
    torch.manual_seed(0)
    base = base_cls(D_IN, D_OUT, bias=True, params_dtype=torch.float32, **kwargs)
    with torch.no_grad():
        base.weight.normal_()
        base.bias.normal_()
    weight, bias_ = base.weight.detach().double().clone(), base.bias.detach().double().clone()
    base.quant_method.process_weights_after_loading(base)  # as the model loader does (may repack the weight)
    lora_config = LoRAConfig(max_lora_rank=8, max_loras=N_SLOTS, lora_dtype=torch.float32)
    lora = lora_cls(base)
    lora.create_lora_weights(N_SLOTS, lora_config)
    lora.set_mapping(get_punica_wrapper(TOKENS, max_batches=TOKENS, device="cpu", lora_config=lora_config))
    routing = SlotRouting(TOKENS, N_SLOTS, "cpu")
    layer = RoadLinear(lora, "layer", N_SLOTS, routing)
    rotations = {0: rotation(16, seed=1), 2: rotation(64, seed=2, variant="road_4")}
    for slot, rot in rotations.items():
        layer.set_road(slot, [rot])

    slots = [0, -1, 2, 2, 0]  # -1: no adapter
    routing.update(torch.tensor(slots))
    x = torch.randn(TOKENS, D_IN)
    out = layer(x)
    y, bias = out if isinstance(out, tuple) else (out, None)
    if kwargs.get("skip_bias_add"):
        assert bias is not None and torch.equal(bias.double(), bias_)
        y = y + bias  # what the caller does
    plain = x.double() @ weight.T + bias_
    eye = torch.eye(D_OUT, dtype=torch.float64)
    want = torch.stack([(dense(rotations[s]) if s >= 0 else eye) @ row for s, row in zip(slots, plain, strict=True)])
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-4)
