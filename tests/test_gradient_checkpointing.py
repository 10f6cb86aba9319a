"""Gradient checkpointing on a RoadModel: RoAd gradients equal those of a run without checkpointing.

With `use_reentrant=True` and a frozen base, a checkpointed block whose inputs do not require grad
gives its parameters no gradient. transformers 5 makes the input embeddings' output require grad
itself only for models whose main input is `input_ids` (the Llama cases); the ViT cases (main input
`pixel_values`, a trainable classifier outside the blocks) lose their RoAd gradients silently
unless roadkit does it.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_llama

from roadkit import RoadConfig, RoadLayer, get_peft_model

pytestmark = pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning")


def tiny_vit(seed: int = 0):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    cfg = ViTConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        image_size=16,
        patch_size=4,
        num_labels=3,
    )
    return ViTForImageClassification(cfg).eval()


@pytest.fixture(scope="module")
def cases():
    ids = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(0))
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    return {
        "llama": (
            tiny_llama(),
            dict(input_ids=ids, labels=ids, use_cache=False),
            RoadConfig(
                variant="road_2", group_size=64, target_modules=["q_proj", "v_proj", "down_proj"], init_weights=False
            ),
        ),
        "vit": (
            tiny_vit(),
            dict(pixel_values=pixels, labels=torch.tensor([0, 2])),
            RoadConfig(
                variant="road_1",
                group_size=64,
                target_modules=["q_proj", "v_proj"],
                modules_to_save=["classifier"],
                init_weights=False,
            ),
        ),
    }


def gradients(case, how: str = "none", use_reentrant: bool = False):
    """RoAd gradients of one forward/backward in training mode, and how often each RoAd layer ran."""
    base, inputs, config = case
    base = copy.deepcopy(base)
    kwargs = {"use_reentrant": use_reentrant}
    if how == "before_wrap":
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    torch.manual_seed(1)  # the same random adapter every time
    model = get_peft_model(base, config)
    if how == "gradient":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    elif how == "activation":  # transformers 5's name, what its Trainer calls
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    model.train()
    calls = {}
    for path, layer in model.road_layers():
        layer.register_forward_hook(lambda *_, p=path: calls.__setitem__(p, calls.get(p, 0) + 1))
    model(**inputs).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad and "road_" in n}
    return grads, calls


@pytest.mark.parametrize("use_reentrant", [True, False])
@pytest.mark.parametrize("how", ["gradient", "activation", "before_wrap"])
@pytest.mark.parametrize("arch", ["llama", "vit"])
def test_checkpointed_gradients_equal_plain(cases, arch, how, use_reentrant):
    reference, plain_calls = gradients(cases[arch])
    grads, calls = gradients(cases[arch], how, use_reentrant)
    # checkpointing really recomputed (non-reentrant recomputation may stop before a block's last layer)
    assert set(plain_calls.values()) == {1} and max(calls.values()) == 2
    assert reference and set(grads) == set(reference)
    missing = [n for n, g in grads.items() if g is None]
    assert not missing, f"no gradient reached {missing}"
    for name, g in grads.items():
        assert reference[name].abs().max() > 0
        torch.testing.assert_close(g, reference[name], rtol=1e-6, atol=1e-7, msg=name)


def test_enabling_twice_registers_one_hook(cases):
    base, inputs, config = cases["vit"]
    model = get_peft_model(copy.deepcopy(base), config)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    embeddings = model.get_input_embeddings()
    assert len(embeddings._forward_hooks) == 1
    assert all(isinstance(m, RoadLayer) for _, m in model.road_layers())


def trained(case, steps: int, fused: bool, use_reentrant=None):
    """The adapter after `steps` AdamW steps, with or without checkpointing."""
    base, inputs, config = case
    torch.manual_seed(1)
    model = get_peft_model(copy.deepcopy(base), config)
    if use_reentrant is not None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, fused=fused)
    for _ in range(steps):
        model(**inputs).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.adapter_state_dict()


@pytest.mark.parametrize(
    ("fused", "use_reentrant"), [(False, True), (False, False), (True, True)]
)  # fused: no version bumps
def test_training_steps_with_checkpointing_match_plain(cases, fused, use_reentrant):
    reference = trained(cases["llama"], 2, fused)
    got = trained(cases["llama"], 2, fused, use_reentrant)
    for name in reference:
        torch.testing.assert_close(got[name], reference[name], rtol=1e-6, atol=1e-7, msg=name)
