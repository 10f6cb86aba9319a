"""Reading RoAd adapter directories for serving (`roadkit.integrations.vllm.adapter`) and the vLLM version check
(`roadkit.integrations.vllm.compat`); neither needs vLLM installed."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from conftest import tiny_llama
from safetensors.torch import load_file, save_file

from roadkit import RoadConfig, get_peft_model
from roadkit import checkpoint as ckpt
from roadkit import functional as F
from roadkit.integrations.vllm.adapter import RoadAdapterError, is_road_directory, read_road_adapter
from roadkit.integrations.vllm.compat import check_vllm, installed_version, is_supported
from roadkit.kernels import torch_ops

pytestmark = [
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
    pytest.mark.usefixtures("one_thread"),
]

TARGETS = ["q_proj", "v_proj", "up_proj"]  # outputs of 64, 64 and 128 features
PATHS = {
    f"model.layers.0.{block}.{name}"
    for block, name in (("self_attn", "q_proj"), ("self_attn", "v_proj"), ("mlp", "up_proj"))
}


@pytest.fixture(scope="module")
def base():
    return tiny_llama(hidden=64, layers=1)


def expected_rotations(directory: str, variant: str, group_size: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(c, s) per module path, from the saved tensors read directly with safetensors."""
    tensors = load_file(os.path.join(directory, "adapter_model.safetensors"))
    out = {}
    for key in tensors:
        if key.endswith(".road_theta"):
            path = key.removeprefix("base_model.model.").removesuffix(".road_theta")
            theta, alpha = tensors[key].float(), tensors[key.replace("road_theta", "road_alpha")].float()
            out[path] = F.coefficients(variant, group_size, theta, alpha)
    return out


def check_rotations(directory: str, variant: str, group_size: int) -> dict:
    adapter = read_road_adapter(directory)
    assert adapter.directory == directory
    assert adapter.config.variant == variant and adapter.config.group_size == group_size
    want = expected_rotations(directory, variant, group_size)
    assert set(adapter.rotations) == set(want) == PATHS
    for path, rot in adapter.rotations.items():
        assert rot.group_size == group_size and rot.c.dtype == torch.float32
        assert rot.features == (128 if path.endswith("up_proj") else 64)
        torch.testing.assert_close(rot.c, want[path][0], rtol=0, atol=0)
        torch.testing.assert_close(rot.s, want[path][1], rtol=0, atol=0)
        assert not torch.allclose(rot.c, torch.ones_like(rot.c))  # init_weights=False: not the identity
    assert is_road_directory(directory)
    return adapter.rotations


@pytest.mark.parametrize("variant, group_size", [("road_1", 8), ("road_2", 64), ("road_4", 16)])
def test_reads_roadkit_adapters(base, tmp_path, variant: str, group_size: int):
    torch.manual_seed(1)
    config = RoadConfig(variant=variant, group_size=group_size, init_weights=False, target_modules=TARGETS)
    model = get_peft_model(copy.deepcopy(base), config)
    directory = str(tmp_path / "adapter")
    model.save_pretrained(directory)
    check_rotations(directory, variant, group_size)


@pytest.mark.parametrize("variant, group_size", [("road_1", 64), ("road_2", 8), ("road_4", 32)])
def test_reads_peft_adapters_and_reproduces_peft_outputs(base, tmp_path, variant: str, group_size: int):
    """PEFT is the oracle: each served rotation applied to the base layer's output gives PEFT's layer output."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(2)
    config = peft.RoadConfig(variant=variant, group_size=group_size, init_weights=False, target_modules=TARGETS)
    pm = peft.get_peft_model(copy.deepcopy(base), config)
    directory = str(tmp_path / "peft")
    pm.save_pretrained(directory)
    rotations = check_rotations(directory, variant, group_size)
    h = torch.randn(3, 64)
    with torch.no_grad():
        for path, rot in rotations.items():
            module = pm.base_model.model.get_submodule(path)
            want = module(h)
            got = torch_ops.rotate_values(module.base_layer(h), rot.c, rot.s, rot.group_size)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


# ---- directories that cannot be served --------------------------------------------------------------


def write_valid(directory: str, variant: str = "road_1", group_size: int = 8, **config_kwargs) -> dict:
    """A small valid adapter: one module with 32 output features. Returns its tensors."""
    n = F.parameter_length(variant, 32)
    tensors = {
        ckpt.adapter_key("layers.0.proj", "road_theta"): torch.randn(n),
        ckpt.adapter_key("layers.0.proj", "road_alpha"): torch.randn(n),
    }
    ckpt.write_adapter(
        directory, RoadConfig(variant=variant, group_size=group_size, target_modules=["proj"], **config_kwargs), tensors
    )
    return tensors


def rewrite_tensors(directory: str, tensors: dict[str, torch.Tensor]) -> None:
    save_file(
        {k: v.contiguous() for k, v in tensors.items()},
        os.path.join(directory, "adapter_model.safetensors"),
        metadata={"format": "pt"},
    )


def edit_config(directory: str, **changes) -> None:
    path = os.path.join(directory, "adapter_config.json")
    with open(path, encoding="utf-8") as fh:
        data = json.load(fh)
    data.update(changes)
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(data, fh)


def expect_error(directory: str, *words: str) -> RoadAdapterError:
    with pytest.raises(RoadAdapterError) as info:
        read_road_adapter(directory)
    message = str(info.value)
    assert directory in message
    for word in words:
        assert word in message, message
    return info.value


def test_valid_small_adapter_reads(tmp_path):
    directory = str(tmp_path / "ok")
    tensors = write_valid(directory, "road_1", 8)
    rot = read_road_adapter(directory).rotations["layers.0.proj"]
    assert rot.features == 32 and rot.group_size == 8
    want = F.coefficients(
        "road_1",
        8,
        tensors[ckpt.adapter_key("layers.0.proj", "road_theta")],
        tensors[ckpt.adapter_key("layers.0.proj", "road_alpha")],
    )
    torch.testing.assert_close(rot.c, want[0])
    torch.testing.assert_close(rot.s, want[1])


def test_missing_directory(tmp_path):
    directory = str(tmp_path / "does-not-exist")
    expect_error(directory)
    assert not is_road_directory(directory)


def test_directory_without_config(tmp_path):
    expect_error(str(tmp_path))


def test_corrupt_weights(tmp_path):
    directory = str(tmp_path / "corrupt")
    write_valid(directory)
    with open(os.path.join(directory, "adapter_model.safetensors"), "wb") as fh:
        fh.write(b"\x00\x01 not a safetensors file")
    expect_error(directory, "damaged")


def test_truncated_weights(tmp_path):
    directory = str(tmp_path / "truncated")
    write_valid(directory)
    path = os.path.join(directory, "adapter_model.safetensors")
    with open(path, "rb") as fh:
        data = fh.read()
    with open(path, "wb") as fh:
        fh.write(data[: len(data) - 16])
    expect_error(directory)


def test_other_peft_type(tmp_path):
    directory = str(tmp_path / "lora")
    write_valid(directory)
    edit_config(directory, peft_type="LORA")
    expect_error(directory, "LORA")
    assert not is_road_directory(directory)


def test_modules_to_save(tmp_path):
    directory = str(tmp_path / "mts")
    write_valid(directory, modules_to_save=["score"])
    expect_error(directory, "modules_to_save")


@pytest.mark.parametrize(
    "key, shape",
    [
        ("base_model.model.layers.0.proj.weight", (32,)),  # not a RoAd parameter name
        ("layers.1.proj.road_theta", (16,)),  # without the base_model.model. prefix
        ("base_model.model.layers.1.proj.road_theta", (4, 4)),  # not a vector
    ],
)
def test_foreign_tensor_key(tmp_path, key: str, shape: tuple[int, ...]):
    directory = str(tmp_path / "foreign")
    tensors = write_valid(directory)
    rewrite_tensors(directory, {**tensors, key: torch.randn(shape)})
    expect_error(directory, key)


def test_mismatched_theta_alpha(tmp_path):
    directory = str(tmp_path / "mismatch")
    tensors = write_valid(directory)
    tensors[ckpt.adapter_key("layers.0.proj", "road_alpha")] = torch.randn(8)
    rewrite_tensors(directory, tensors)
    expect_error(directory, "layers.0.proj")


def test_theta_without_alpha(tmp_path):
    directory = str(tmp_path / "half")
    tensors = write_valid(directory)
    del tensors[ckpt.adapter_key("layers.0.proj", "road_alpha")]
    rewrite_tensors(directory, tensors)
    expect_error(directory, "layers.0.proj")


@pytest.mark.parametrize(
    "variant, group_size, length",
    [
        ("road_1", 8, 6),  # 12 features: not a multiple of 8
        ("road_2", 8, 20),  # 20 features: not a multiple of 8
        ("road_4", 4, 7),  # no output size has 7 road_4 parameters
        ("road_4", 8, 12),  # 6 features: not a multiple of 8
    ],
)
def test_length_no_output_size_fits(tmp_path, variant: str, group_size: int, length: int):
    directory = str(tmp_path / "length")
    write_valid(directory, variant, group_size)
    rewrite_tensors(
        directory, {ckpt.adapter_key("layers.0.proj", p): torch.randn(length) for p in ("road_theta", "road_alpha")}
    )
    expect_error(directory, "layers.0.proj", str(length))


def test_no_parameters(tmp_path):
    directory = str(tmp_path / "empty")
    write_valid(directory)
    rewrite_tensors(directory, {})
    expect_error(directory)


def test_is_road_directory_with_broken_config(tmp_path):
    directory = str(tmp_path / "broken")
    write_valid(directory)
    assert is_road_directory(directory)
    with open(os.path.join(directory, "adapter_config.json"), "w", encoding="utf-8") as fh:
        fh.write("{not json")
    assert not is_road_directory(directory)


# ---- the vLLM version check ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("version", "supported"),
    [("0.32.0", True), ("0.32.5+cpu", True), ("0.33.0", True), ("0.34.1", True), ("0.31.0", False),
     ("0.35.0", False), ("0.9.2", False), ("1.32.0", False), ("garbage", False)],
)  # fmt: skip
def test_supported_releases(version: str, supported: bool):
    assert is_supported(version) == supported


@pytest.mark.skipif(installed_version() is not None, reason="vLLM is installed here")
def test_check_vllm_without_vllm():
    assert check_vllm() == ["vLLM is not installed"]
