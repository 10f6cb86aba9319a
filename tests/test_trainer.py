"""`RoadTrainer`: transformers' Trainer on a RoadModel writes adapter-only checkpoints and resumes exactly."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from conftest import tiny_llama
from safetensors.torch import load_file

from roadkit import RoadConfig, RoadModel, RoadTrainer, get_peft_model

pytest.importorskip("accelerate")  # transformers' Trainer needs it

CONFIG = RoadConfig(variant="road_1", group_size=64, target_modules=["q_proj", "v_proj"])
OTHER = RoadConfig(variant="road_2", group_size=64, target_modules=["o_proj"], init_weights=False)
FULL_WEIGHTS = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json")


class Tokens(torch.utils.data.Dataset):
    """Random token rows with a column (`extra`) that the model does not take and the Trainer must drop."""

    def __init__(self, n: int, seed: int = 0) -> None:
        self.ids = torch.randint(0, 96, (n, 12), generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {
            "input_ids": self.ids[i],
            "attention_mask": torch.ones_like(self.ids[i]),
            "labels": self.ids[i],
            "extra": i,
        }


@pytest.fixture(scope="module")
def base():
    return tiny_llama()


def road_model(base) -> RoadModel:
    torch.manual_seed(0)
    model = get_peft_model(copy.deepcopy(base), CONFIG)
    model.add_adapter("other", OTHER)  # inactive: saved and restored, never trained
    return model


def arguments(output_dir, **overrides):
    from transformers import TrainingArguments

    kwargs = dict(
        output_dir=str(output_dir),
        max_steps=6,
        save_steps=3,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=8,
        learning_rate=1e-2,
        use_cpu=True,
        report_to="none",
        disable_tqdm=True,
        logging_steps=100,
        seed=0,
        dataloader_num_workers=0,
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def adapters(model: RoadModel) -> dict[str, torch.Tensor]:
    return {f"{name}:{k}": t.clone() for name in model.peft_config for k, t in model.adapter_state_dict(name).items()}


def assert_same(a: dict, b: dict, atol: float = 1e-7) -> None:
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=k)


def test_checkpoints_hold_adapters_only_and_resume_exactly(base, tmp_path):
    model = road_model(base)
    start = adapters(model)
    trainer = RoadTrainer(
        model=model, args=arguments(tmp_path / "run"), train_dataset=Tokens(24), eval_dataset=Tokens(8, seed=1)
    )
    assert trainer.label_names == ["labels"]
    batch = next(iter(trainer.get_train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "labels"}  # `extra` dropped, the model's columns kept
    trainer.train()
    assert "eval_loss" in trainer.evaluate()
    end = adapters(model)
    assert all((end[k] != start[k]).any() for k in end if k.startswith("default:")), "the adapter did not train"
    assert_same(
        {k: v for k, v in end.items() if k.startswith("other:")},
        {k: v for k, v in start.items() if k.startswith("other:")},
        atol=0,
    )

    for step in (3, 6):
        ckpt = tmp_path / "run" / f"checkpoint-{step}"
        files = set(os.listdir(ckpt))
        assert {"adapter_config.json", "adapter_model.safetensors", "optimizer.pt", "trainer_state.json"} <= files
        assert not files & set(FULL_WEIGHTS)
        saved = load_file(ckpt / "adapter_model.safetensors")
        assert set(saved) == set(model.adapter_state_dict())
        assert set(load_file(ckpt / "other" / "adapter_model.safetensors")) == set(model.adapter_state_dict("other"))
    final = load_file(tmp_path / "run" / "checkpoint-6" / "adapter_model.safetensors")
    assert_same(final, model.adapter_state_dict(), atol=0)

    resumed = road_model(base)
    with torch.no_grad():  # scramble both adapters: resuming must restore them from the checkpoint
        for name, p in resumed.named_parameters():
            if "road_" in name:
                p.add_(0.1)
    RoadTrainer(model=resumed, args=arguments(tmp_path / "resumed"), train_dataset=Tokens(24)).train(
        resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-3")
    )
    assert_same(adapters(resumed), end)


def eval_loss(model: RoadModel, data: Tokens) -> float:
    model.eval()
    with torch.no_grad():
        return model(input_ids=data.ids, labels=data.ids).loss.item()


@pytest.mark.parametrize(
    "optim",
    [
        "adamw_torch",
        "adamw_torch_fused",  # fused steps do not bump version counters: the coefficient cache must notice
    ],
)
def test_evaluation_during_training_sees_the_trained_adapter(base, tmp_path, optim):
    data = Tokens(8, seed=1)
    model = road_model(base)
    trainer = RoadTrainer(
        model=model,
        args=arguments(tmp_path, optim=optim, max_steps=4, save_steps=4, eval_strategy="steps", eval_steps=2),
        train_dataset=Tokens(16),
        eval_dataset=data,
    )
    trainer.train()
    reported = trainer.evaluate()["eval_loss"]
    fresh = RoadModel.from_pretrained(copy.deepcopy(base), tmp_path / "checkpoint-4")
    assert reported == pytest.approx(eval_loss(fresh, data), abs=1e-6)


def test_load_best_model_at_end_restores_the_best_checkpoint(base, tmp_path):
    model = road_model(base)
    evaluations = []

    def first_is_best(_) -> dict:  # a metric that makes the earliest evaluation the best
        evaluations.append(len(evaluations))
        return {"order": float(evaluations[-1])}

    args = arguments(
        tmp_path,
        max_steps=4,
        save_steps=2,
        eval_strategy="steps",
        eval_steps=2,
        load_best_model_at_end=True,
        metric_for_best_model="order",
        greater_is_better=False,
    )
    trainer = RoadTrainer(
        model=model, args=args, train_dataset=Tokens(16), eval_dataset=Tokens(4, seed=1), compute_metrics=first_is_best
    )
    trainer.train()
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-2")
    best = load_file(tmp_path / "checkpoint-2" / "adapter_model.safetensors")
    last = load_file(tmp_path / "checkpoint-4" / "adapter_model.safetensors")
    assert any((best[k] != last[k]).any() for k in best)
    assert_same(model.adapter_state_dict(), best, atol=0)


def test_label_smoothing_shifts_causal_lm_labels_like_the_base_model(base, tmp_path):
    from transformers import Trainer

    data = Tokens(4)
    batch = {"input_ids": data.ids, "labels": data.ids}
    args = arguments(tmp_path, label_smoothing_factor=0.1)
    plain = copy.deepcopy(base)
    expected = Trainer(model=plain, args=args).compute_loss(plain, dict(batch))
    model = get_peft_model(copy.deepcopy(base), CONFIG)  # identity adapter: the same logits as the base
    got = RoadTrainer(model=model, args=args).compute_loss(model, dict(batch))
    torch.testing.assert_close(got, expected)


def test_other_models_are_left_to_the_stock_trainer(base, tmp_path):
    model = copy.deepcopy(base)
    trainer = RoadTrainer(model=model, args=arguments(tmp_path))
    assert trainer.divergence_guard is None
    trainer.save_model(str(tmp_path / "saved"))
    assert "model.safetensors" in os.listdir(tmp_path / "saved")


def test_a_diverging_run_stops_and_writes_only_usable_checkpoints(base, tmp_path):
    from roadkit.integrations.trainer import StopOnDivergence

    model = road_model(base)
    # warmup from 0: step 1 changes nothing, step 2 (lr 1e30 / 3) overflows every rotation's scale
    args = arguments(tmp_path / "run", save_steps=1, learning_rate=1e30, warmup_steps=3)
    trainer = RoadTrainer(model=model, args=args, train_dataset=Tokens(24))
    assert isinstance(trainer.divergence_guard, StopOnDivergence)
    trainer.train()
    guard = trainer.divergence_guard
    assert (guard.diverged_at, guard.kept_step, trainer.state.global_step) == (2, 1, 2)
    assert "degenerate" in guard.reason
    assert sorted(os.listdir(tmp_path / "run")) == ["checkpoint-1"]  # no checkpoint of the broken step
    assert all(torch.isfinite(t).all() for t in adapters(model).values())
    RoadModel.from_pretrained(copy.deepcopy(base), tmp_path / "run" / "checkpoint-1")  # values checked: usable


def test_a_non_finite_loss_counts_as_divergence(base):
    from types import SimpleNamespace

    from transformers import TrainerControl

    from roadkit.integrations.trainer import StopOnDivergence

    model = road_model(base)
    guard, control = StopOnDivergence(), TrainerControl()
    args, state = SimpleNamespace(device=torch.device("cpu")), SimpleNamespace(global_step=4)
    guard.on_train_begin(args, state, control, model=model)
    guard.observe_loss(torch.tensor(2.0))
    state.global_step = 5
    guard.on_step_end(args, state, control)
    assert guard.diverged_at is None and not control.should_training_stop
    guard.observe_loss(torch.tensor(float("inf")))
    guard.observe_loss(torch.tensor(2.0))
    state.global_step = 6
    control.should_save = True
    guard.on_step_end(args, state, control)
    assert (guard.diverged_at, guard.kept_step, guard.reason) == (6, 5, "a NaN or infinite training loss")
    assert control.should_training_stop and not control.should_save


def test_road_trainer_gives_any_trainer_subclass_the_same_behaviour(base, tmp_path):
    from transformers import Trainer

    from roadkit import road_trainer

    class Doubled(Trainer):  # a user's subclass with a loss of its own
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            outputs = model(**inputs)
            return (2 * outputs.loss, outputs) if return_outputs else 2 * outputs.loss

    model = road_model(base)
    start = adapters(model)
    trainer = road_trainer(Doubled)(
        model=model, args=arguments(tmp_path, max_steps=3, save_steps=3), train_dataset=Tokens(12)
    )
    assert trainer.divergence_guard is not None and trainer.label_names == ["labels"]
    batch = next(iter(trainer.get_train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "labels"}  # the wrapped model's columns
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    for directory in ("checkpoint-3", "final"):
        files = set(os.listdir(tmp_path / directory))
        assert "adapter_model.safetensors" in files and not files & set(FULL_WEIGHTS)
    assert_same(load_file(tmp_path / "final" / "adapter_model.safetensors"), model.adapter_state_dict(), atol=0)
    assert any((adapters(model)[k] != start[k]).any() for k in start if k.startswith("default:"))
    with pytest.raises(TypeError, match="peft_config"):  # Doubled takes no peft_config: neither does its Road class
        road_trainer(Doubled)(model=road_model(base), args=arguments(tmp_path), peft_config=CONFIG)


def test_a_4bit_base_trains_and_evaluations_change_nothing(base, tmp_path):
    """RoadTrainer takes a RoadModel on a 4-bit base loaded by transformers (the Trainer refuses quantized
    models it does not see adapters on), and evaluating between steps leaves the training unchanged: on
    CPUs with AVX512-BF16, bitsandbytes repacks 4-bit weights at the first inference call, and a repacked
    layer passes no gradient back."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    base.save_pretrained(tmp_path / "base")
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    trained = []
    for evaluate in (False, True):
        quantized = AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=quantization)
        assert quantized.is_quantized
        torch.manual_seed(0)
        model = get_peft_model(quantized, CONFIG)
        extra = dict(eval_strategy="steps", eval_steps=1) if evaluate else {}
        args = arguments(tmp_path / f"run-{evaluate}", max_steps=3, save_steps=100, **extra)
        trainer = RoadTrainer(model=model, args=args, train_dataset=Tokens(16), eval_dataset=Tokens(8, seed=1))
        trainer.train()
        trained.append(adapters(model))
    assert any((t != 0).any() for k, t in trained[0].items() if "road_theta" in k)
    for key, value in trained[0].items():
        torch.testing.assert_close(trained[1][key], value, rtol=0, atol=1e-6, msg=key)
