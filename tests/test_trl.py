"""TRL's trainers train roadkit models through `roadkit.road_trainer`, with PEFT's RoAd under the same trainer as
the oracle: the same loss at every step and the same adapter (to 1e-5), checkpoints that hold the adapter only,
and exact resuming."""

from __future__ import annotations

import copy
import math
import os
import re
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama
from safetensors.torch import load_file

pytest.importorskip("accelerate")
pytest.importorskip("trl")
peft = pytest.importorskip("peft")

import roadkit  # noqa: E402
from roadkit.app.demo import build_tokenizer  # noqa: E402

TARGETS = ["q_proj", "v_proj", "down_proj"]
WORDS = ["abc", "hello", "road", "kit", "rotate", "tiny", "model", "word"]
FULL_WEIGHTS = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json")
ADAPTER = "adapter_model.safetensors"


@pytest.fixture(autouse=True)
def no_telemetry(monkeypatch):
    """TRL's trainers report their use to the Hub; tests stay offline."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_TELEMETRY", True)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def base():
    """A tiny Llama whose input and output embeddings are tied: the stock Trainer cannot save a RoadModel of it
    (it writes the whole state dict, and safetensors refuses shared tensors)."""
    return tiny_llama(tied=True)


def road_config(**overrides) -> roadkit.RoadConfig:
    return roadkit.RoadConfig(group_size=64, target_modules=TARGETS, **overrides)


def peft_config() -> peft.RoadConfig:
    return peft.RoadConfig(group_size=64, target_modules=TARGETS)


def settings(config_class, output_dir, **overrides):
    kwargs = dict(
        output_dir=str(output_dir),
        max_steps=4,
        save_steps=2,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        logging_steps=1,
        use_cpu=True,
        report_to="none",
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
    )
    kwargs.update(overrides)
    return config_class(**kwargs)


def sft_data():
    from datasets import Dataset

    return Dataset.from_list([{"prompt": f"up {w}:", "completion": f" {w.upper()}"} for w in WORDS])


def preference_data():
    from datasets import Dataset

    return Dataset.from_list([{"prompt": f"up {w}:", "chosen": f" {w.upper()}", "rejected": f" {w}"} for w in WORDS])


def losses(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def assert_same_losses(ours: list[float], theirs: list[float], atol: float = 1e-6) -> None:
    assert len(ours) == len(theirs) == 4
    for step, (a, b) in enumerate(zip(ours, theirs, strict=True), start=1):
        assert a == pytest.approx(b, rel=1e-5, abs=atol), f"step {step}: roadkit {a}, PEFT {b}"


def assert_same_adapters(ours: dict, theirs: dict, atol: float = 1e-5) -> None:
    assert set(ours) == set(theirs)
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=atol, msg=key)


def assert_trained(adapter: dict) -> None:
    """The adapter moved away from its identity initialisation (theta 0, alpha 1) in every layer."""
    for key, value in adapter.items():
        start = 0.0 if key.endswith("road_theta") else 1.0
        assert (value - start).abs().max() > 1e-4, f"{key} did not train"


def test_sft_matches_peft_and_saves_adapters_only(base, tokenizer, tmp_path):
    from trl import SFTConfig, SFTTrainer

    path = tmp_path / "base"
    base.save_pretrained(path)  # both routes load the model by name, as TRL users do
    ours = roadkit.road_trainer(SFTTrainer)(
        model=str(path),
        args=settings(SFTConfig, tmp_path / "ours"),
        train_dataset=sft_data(),
        processing_class=tokenizer,
        peft_config=road_config(),
    )
    assert isinstance(ours.model, roadkit.RoadModel)
    ours.train()
    ours.save_model(str(tmp_path / "ours" / "final"))
    theirs = SFTTrainer(
        model=str(path),
        args=settings(SFTConfig, tmp_path / "theirs"),
        train_dataset=sft_data(),
        processing_class=tokenizer,
        peft_config=peft_config(),
    )
    theirs.train()
    theirs.save_model(str(tmp_path / "theirs" / "final"))

    assert_same_losses(losses(ours), losses(theirs))
    assert len(set(losses(ours))) == 4
    adapter = load_file(tmp_path / "ours" / "final" / ADAPTER)
    assert_same_adapters(adapter, load_file(tmp_path / "theirs" / "final" / ADAPTER))
    assert_trained(adapter)
    for directory in ("checkpoint-2", "checkpoint-4", "final"):
        files = set(os.listdir(tmp_path / "ours" / directory))
        assert {"adapter_config.json", ADAPTER, "tokenizer.json"} <= files
        assert not files & set(FULL_WEIGHTS)
    assert_same_adapters(load_file(tmp_path / "ours" / "checkpoint-4" / ADAPTER), adapter, atol=0)
    assert "optimizer.pt" in os.listdir(tmp_path / "ours" / "checkpoint-2")


def test_sft_resumes_exactly(base, tokenizer, tmp_path):
    from trl import SFTConfig, SFTTrainer

    def trainer(model, output_dir):
        return roadkit.road_trainer(SFTTrainer)(
            model=model,
            args=settings(SFTConfig, output_dir),
            train_dataset=sft_data(),
            processing_class=tokenizer,
        )

    model = roadkit.get_peft_model(copy.deepcopy(base), road_config())
    trainer(model, tmp_path / "run").train()
    resumed = roadkit.get_peft_model(copy.deepcopy(base), road_config())
    with torch.no_grad():  # resuming must restore the adapter from the checkpoint
        for name, p in resumed.named_parameters():
            if "road_" in name:
                p.add_(0.1)
    trainer(resumed, tmp_path / "resumed").train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    assert_same_adapters(resumed.adapter_state_dict(), model.adapter_state_dict(), atol=1e-6)


@pytest.mark.parametrize("route", ["peft_config", "trained_adapter"])
def test_dpo_matches_peft(base, tokenizer, tmp_path, route):
    """With `peft_config` the reference is the model with its adapter off; a model that comes with a trained
    adapter is compared against a frozen copy of it ("ref"), as TRL does for PEFT models."""
    from trl import DPOConfig, DPOTrainer

    kwargs = dict(train_dataset=preference_data(), processing_class=tokenizer)
    if route == "peft_config":
        ours_model, our_config = copy.deepcopy(base), road_config()
        their_model, their_config = copy.deepcopy(base), peft_config()
    else:
        torch.manual_seed(1)
        start = roadkit.get_peft_model(copy.deepcopy(base), road_config(init_weights=False))
        start.save_pretrained(tmp_path / "start")
        ours_model = roadkit.RoadModel.from_pretrained(copy.deepcopy(base), tmp_path / "start", is_trainable=True)
        their_model = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "start", is_trainable=True)
        our_config = their_config = None
    ours = roadkit.road_trainer(DPOTrainer)(
        model=ours_model, args=settings(DPOConfig, tmp_path / "ours"), peft_config=our_config, **kwargs
    )
    assert isinstance(ours.ref_model, roadkit.integrations.trainer.AdapterReference)
    ours.train()
    ours.save_model(str(tmp_path / "ours" / "final"))
    theirs = DPOTrainer(
        model=their_model, args=settings(DPOConfig, tmp_path / "theirs"), peft_config=their_config, **kwargs
    )
    if route == "trained_adapter":
        # TRL makes the "ref" adapter and copies the parameters named `*.default.*` into it; PEFT's RoAd parameters
        # are named `*.road_theta.default`, so TRL 1.16 leaves "ref" as a new adapter. Copy them as TRL intends.
        with torch.no_grad():
            for name, p in their_model.named_parameters():
                if name.endswith(".default"):
                    their_model.get_parameter(name.removesuffix("default") + "ref").copy_(p)
    theirs.train()
    theirs.save_model(str(tmp_path / "theirs" / "final"))

    assert losses(ours)[0] == pytest.approx(math.log(2), abs=1e-6)  # the policy starts as its reference
    assert_same_losses(losses(ours), losses(theirs))
    adapter = load_file(tmp_path / "ours" / "final" / ADAPTER)
    assert_same_adapters(adapter, load_file(tmp_path / "theirs" / "final" / ADAPTER))
    if route == "peft_config":
        assert_trained(adapter)
        assert list(ours.model.peft_config) == ["default"]
    else:
        reference = load_file(tmp_path / "ours" / "final" / "ref" / ADAPTER)
        assert_same_adapters(reference, load_file(tmp_path / "start" / ADAPTER), atol=0)  # frozen
        assert_same_adapters(reference, load_file(tmp_path / "theirs" / "final" / "ref" / ADAPTER), atol=0)
        assert any((adapter[k] - reference[k]).abs().max() > 1e-4 for k in adapter)
    files = set(os.listdir(tmp_path / "ours" / "checkpoint-2"))
    assert ADAPTER in files and not files & set(FULL_WEIGHTS)


@pytest.mark.parametrize(
    "beta, road_model",
    [(0.0, False), (0.5, False), (0.5, True)],
    ids=["no KL", "KL to the reference", "KL to the ref adapter of a RoadModel"],
)
def test_grpo_matches_peft(base, tokenizer, tmp_path, beta, road_model):
    """With beta > 0 the reference is the model with its adapter off (PEFT's RoAd and roadkit's with peft_config), or
    for a RoadModel passed in the frozen copy of its adapter, here the identity it starts as. The in-memory model has
    no name or path to load a second copy of the base from."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    def shouting(completions, **_):
        return [float(sum(c.isupper() for c in text)) for text in completions]

    def trainer(cls, output_dir, config, model=None):
        return cls(
            model=copy.deepcopy(base) if model is None else model,
            reward_funcs=shouting,
            args=settings(GRPOConfig, output_dir, num_generations=4, max_completion_length=8, beta=beta),
            train_dataset=Dataset.from_list([{"prompt": f"up {w}:"} for w in WORDS]),
            processing_class=tokenizer,
            peft_config=config,
        )

    if road_model:
        model = roadkit.get_peft_model(copy.deepcopy(base), road_config())
        ours = trainer(roadkit.road_trainer(GRPOTrainer), tmp_path / "ours", None, model)
        assert ours.ref_model.adapter == "ref" and "ref" in model.peft_config
    else:
        ours = trainer(roadkit.road_trainer(GRPOTrainer), tmp_path / "ours", road_config())
    assert ours.beta == ours.args.beta == beta
    assert (ours.ref_model is None) == (beta == 0)
    ours.train()
    ours.save_model(str(tmp_path / "ours" / "final"))
    theirs = trainer(GRPOTrainer, tmp_path / "theirs", peft_config())
    theirs.train()
    theirs.save_model(str(tmp_path / "theirs" / "final"))

    assert_same_losses(losses(ours), losses(theirs))
    if beta:
        kl = [entry["kl"] for entry in ours.state.log_history if "kl" in entry]
        theirs_kl = [entry["kl"] for entry in theirs.state.log_history if "kl" in entry]
        assert kl == pytest.approx(theirs_kl, rel=1e-4, abs=1e-7) and max(kl) > 0
    adapter = load_file(tmp_path / "ours" / "final" / ADAPTER)
    assert_same_adapters(adapter, load_file(tmp_path / "theirs" / "final" / ADAPTER))
    assert_trained(adapter)


def test_road_trainer_makes_one_subclass_and_leaves_the_original_alone():
    from transformers import Trainer
    from trl import SFTConfig, SFTTrainer

    made = roadkit.road_trainer(SFTTrainer)
    assert made is roadkit.road_trainer(SFTTrainer)
    assert made.__name__ == "RoadSFTTrainer" and issubclass(made, (SFTTrainer, roadkit.RoadTrainer))
    assert roadkit.road_trainer(made) is made
    assert roadkit.road_trainer(Trainer) is roadkit.RoadTrainer
    assert roadkit.RoadTrainer not in SFTTrainer.__mro__
    for wrong in (SFTConfig, object(), torch.nn.Module):
        with pytest.raises(TypeError, match="subclass of transformers.Trainer"):
            roadkit.road_trainer(wrong)


def test_a_roadkit_config_with_a_model_that_has_adapters_and_a_synced_reference_are_refused(base, tokenizer, tmp_path):
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    kwargs = dict(args=settings(SFTConfig, tmp_path), train_dataset=sft_data(), processing_class=tokenizer)
    model = roadkit.get_peft_model(copy.deepcopy(base), road_config())
    with pytest.raises(ValueError, match="already has RoAd adapters"):
        roadkit.road_trainer(SFTTrainer)(model=model, peft_config=road_config(), **kwargs)
    with pytest.raises(ValueError, match="sync_ref_model"):
        roadkit.road_trainer(DPOTrainer)(
            model=model,
            args=settings(DPOConfig, tmp_path, sync_ref_model=True),
            train_dataset=preference_data(),
            processing_class=tokenizer,
        )


def test_the_documented_examples_run_as_written(tmp_path, monkeypatch):
    text = (Path(__file__).parents[1] / "docs" / "training.md").read_text()
    section = text[text.index("## With TRL") :]
    blocks = re.findall(r"```python\n(.*?)```", section[: section.index("\n## ", 1)], re.S)
    assert len(blocks) == 3  # SFT, DPO, GRPO, each continuing the one before
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "docs/training.md", "exec"), namespace)
    for run in ("sft", "dpo"):
        files = set(os.listdir(tmp_path / "runs" / run))
        assert {"adapter_config.json", ADAPTER} <= files and not files & set(FULL_WEIGHTS)
    reference = load_file(tmp_path / "runs" / "dpo" / "ref" / ADAPTER)
    assert_same_adapters(reference, load_file(tmp_path / "runs" / "sft" / ADAPTER), atol=0)
    assert namespace["trainer"].state.global_step == 4
