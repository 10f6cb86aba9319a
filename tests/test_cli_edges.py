"""Regressions for rough edges of the library and the `roadkit` command (issue 16): wrapped layers that look
like their base layers, merges of embedding adapters, a full disk, racing runs, empty prompts, broken
pipes, long lists in one-line errors, offline Hub ids, and output directories in odd places."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch
from conftest import tiny_llama
from test_cli import ENV, cli, no_leftovers, one_line_error, write_jsonl
from torch import nn

from roadkit import RoadConfig, RoadModel, get_peft_model
from roadkit.app.demo import build_model, build_tokenizer, task_examples


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny Llama whose tokenizer adds no BOS token (like SmolLM2's), untied and tied, with data."""
    from tokenizers import processors

    root = tmp_path_factory.mktemp("edges")
    tokenizer = build_tokenizer()
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B")
    assert tokenizer("ab").input_ids == tokenizer.convert_tokens_to_ids(["a", "b"])
    for name, tied in (("untied", False), ("tied", True)):
        model = build_model(tokenizer, hidden_size=64, num_layers=1, intermediate_size=128)
        if tied:
            model.config.tie_word_embeddings = True
            model.lm_head.weight = model.model.embed_tokens.weight
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    write_jsonl(
        root / "train.jsonl",
        [{"prompt": e.prompt, "completion": e.completion} for e in task_examples("upper", "train", 8)],
    )
    return root


def embedding_adapter(base_dir, name: str, capsys) -> str:
    """An adapter (non-identity) on embed_tokens and q_proj of the `name` base, saved beside it (what
    loading the base printed is dropped, so the command's output is read alone)."""
    from transformers import AutoModelForCausalLM

    out = base_dir / f"emb-{name}"
    if not out.exists():
        model = AutoModelForCausalLM.from_pretrained(base_dir / name)
        get_peft_model(
            model, RoadConfig(target_modules=["embed_tokens", "q_proj"], init_weights=False)
        ).save_pretrained(out)
    capsys.readouterr()
    return out


# ---- a: wrapped layers expose their base layer's attributes; embedding merges ------------------


def test_wrapped_layers_expose_their_base_layers_attributes():
    from transformers.pytorch_utils import Conv1D

    from roadkit.layers import Conv, Embedding, Linear, TransformersConv1D

    linear, emb, conv, gpt2 = nn.Linear(8, 64), nn.Embedding(10, 64, padding_idx=0), nn.Conv2d(3, 64, 3), Conv1D(64, 8)
    for base, cls in ((linear, Linear), (emb, Embedding), (conv, Conv), (gpt2, TransformersConv1D)):
        layer = cls(base)
        assert layer.weight is base.weight
        assert getattr(layer, "bias", None) is getattr(base, "bias", None)
        with pytest.raises((AttributeError, KeyError)):
            layer.weight = nn.Parameter(torch.zeros(1))  # read-only: the wrapper owns no weight
    assert (Linear(linear).in_features, Linear(linear).out_features) == (8, 64)
    assert (TransformersConv1D(gpt2).in_features, TransformersConv1D(gpt2).out_features) == (8, 64)
    layer = Embedding(emb)
    assert (layer.num_embeddings, layer.embedding_dim, layer.padding_idx) == (10, 64, 0)
    layer = Conv(conv)
    assert (layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride) == (3, 64, (3, 3), (1, 1))


def test_transformers_utilities_work_on_a_road_model():
    model = tiny_llama()
    road = get_peft_model(model, RoadConfig(target_modules=["embed_tokens", "q_proj"], init_weights=False))
    assert road.get_input_embeddings().weight is model.model.embed_tokens.base_layer.weight
    ids = torch.randint(0, 96, (2, 6), generator=torch.Generator().manual_seed(0))
    before = road(input_ids=ids).logits
    road.resize_token_embeddings(128, mean_resizing=False)
    assert road.get_input_embeddings().num_embeddings == 128
    assert road.get_input_embeddings().weight.shape == (128, 128)
    assert road.get_output_embeddings().weight.shape[0] == 128
    torch.testing.assert_close(road(input_ids=ids).logits[..., :96], before)  # the adapter still applies
    assert "model.model.embed_tokens.road_theta.default" in dict(road.named_parameters())


def test_wrapping_a_road_model_again_is_a_clear_error():
    road = get_peft_model(tiny_llama(), RoadConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="add_adapter"):
        get_peft_model(road, RoadConfig(target_modules=["v_proj"]))
    with pytest.raises(ValueError, match="add_adapter"):
        get_peft_model(road.model, RoadConfig(target_modules=["v_proj"]))


def test_save_pretrained_takes_peft_keywords_and_honours_is_main_process(tmp_path):
    road = get_peft_model(tiny_llama(), RoadConfig(target_modules=["q_proj"]))
    road.save_pretrained(tmp_path / "off", is_main_process=False)
    assert not (tmp_path / "off").exists()
    road.save_pretrained(
        tmp_path / "on",
        safe_serialization=True,
        selected_adapters=["default"],
        save_embedding_layers="auto",
        is_main_process=True,
    )
    assert (tmp_path / "on" / "adapter_model.safetensors").is_file()
    with pytest.warns(UserWarning, match="unused_option"):
        road.save_pretrained(tmp_path / "other", unused_option=1)


def test_save_pretrained_without_adapters_is_an_error(tmp_path):
    road = get_peft_model(tiny_llama(), RoadConfig(target_modules=["q_proj"]))
    road.delete_adapter("default")
    with pytest.raises(ValueError, match="no adapter"):
        road.save_pretrained(tmp_path / "empty")
    assert not (tmp_path / "empty").exists()


def test_merge_of_an_embedding_adapter_on_an_untied_base(base_dir, tmp_path, capsys, monkeypatch):
    from transformers import AutoModelForCausalLM

    adapter = embedding_adapter(base_dir, "untied", capsys)
    code, out, err = cli(
        ["merge", "--model", base_dir / "untied", "--adapter", adapter, "--output", tmp_path / "merged"],
        capsys,
        tmp_path,
        monkeypatch,
    )
    assert code == 0, err
    ids = torch.randint(4, 40, (2, 7), generator=torch.Generator().manual_seed(1))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    adapted = RoadModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir / "untied"), adapter).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, adapted(input_ids=ids).logits, atol=1e-4, rtol=1e-4)


def test_merge_of_an_embedding_adapter_on_a_tied_base_is_refused(base_dir, tmp_path, capsys, monkeypatch):
    adapter = embedding_adapter(base_dir, "tied", capsys)
    code, _, err = cli(
        ["merge", "--model", base_dir / "tied", "--adapter", adapter, "--output", tmp_path / "m"],
        capsys,
        tmp_path,
        monkeypatch,
    )
    one_line_error(code, err, "tied")
    assert not (tmp_path / "m").exists() and no_leftovers(tmp_path)


# ---- b: a full disk ----------------------------------------------------------------------------


def test_merge_on_a_full_disk_is_a_one_line_error(base_dir, tmp_path, capsys, monkeypatch):
    import transformers.modeling_utils as modeling_utils
    from safetensors import SafetensorError

    def full_disk(tensors, filename, *args, **kwargs):
        with open(filename, "wb") as fh:
            fh.write(b"partial")
        raise SafetensorError(
            'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
        )

    monkeypatch.setattr(modeling_utils, "safe_save_file", full_disk)
    adapter = embedding_adapter(base_dir, "untied", capsys)
    code, _, err = cli(
        ["merge", "--model", base_dir / "untied", "--adapter", adapter, "--output", tmp_path / "m"],
        capsys,
        tmp_path,
        monkeypatch,
    )
    one_line_error(code, err, "No space left on device")
    assert not (tmp_path / "m").exists() and no_leftovers(tmp_path)


# ---- c: two runs racing for one output ---------------------------------------------------------


def test_a_run_finishing_second_does_not_replace_the_first(base_dir, tmp_path, capsys, monkeypatch):
    from roadkit.app.training import TrainingRun

    fit = TrainingRun.fit

    def fit_while_another_run_finishes(self, *args, **kwargs):
        status = fit(self, *args, **kwargs)
        (tmp_path / "run").mkdir()  # the other run, started at the same time, finished first
        (tmp_path / "run" / "first.txt").write_text("first")
        return status

    monkeypatch.setattr(TrainingRun, "fit", fit_while_another_run_finishes)
    code, out, err = cli(
        [
            "train",
            "--model",
            base_dir / "untied",
            "--data",
            base_dir / "train.jsonl",
            "--max-steps",
            "1",
            "--no-progress",
            "--output",
            tmp_path / "run",
        ],
        capsys,
        tmp_path,
        monkeypatch,
    )
    one_line_error(code, err, "run-2")
    assert os.listdir(tmp_path / "run") == ["first.txt"]
    assert (tmp_path / "run-2" / "adapter_model.safetensors").is_file()
    assert no_leftovers(tmp_path)


# ---- d: empty prompts ----------------------------------------------------------------------------


@pytest.mark.parametrize("prompts", [[""], ["abc", "base:"]], ids=["alone", "mixed"])
def test_an_empty_prompt_without_bos_is_a_one_line_error(base_dir, tmp_path, capsys, monkeypatch, prompts):
    args = ["generate", "--model", base_dir / "untied", "--max-new-tokens", "2", "--device", "cpu"]
    for p in prompts:
        args += ["--prompt", p]
    code, _, err = cli(args, capsys, tmp_path, monkeypatch)
    one_line_error(code, err, "empty")


# ---- e: rough edges -----------------------------------------------------------------------------


def test_version(capsys):
    from roadkit import __version__
    from roadkit.app.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"roadkit {__version__}"


def test_inspect_into_a_closed_pipe_is_quiet(tmp_path):
    road = get_peft_model(tiny_llama(layers=8), RoadConfig(target_modules="all-linear"))
    road.save_pretrained(tmp_path / "a")
    result = subprocess.run(
        f"{sys.executable} -m roadkit inspect a | head -1; exit ${{PIPESTATUS[0]}}",
        shell=True,
        executable="/bin/bash",
        cwd=tmp_path,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.stderr == "", result.stderr
    assert result.returncode in (0, 141), result.returncode  # 141: 128 + SIGPIPE, like other tools
    assert len(result.stdout.splitlines()) == 1


def test_a_long_key_list_is_counted_not_spelled_out(base_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    road = get_peft_model(tiny_llama(layers=8), RoadConfig(target_modules="all-linear"))
    road.save_pretrained(tmp_path / "a")
    with pytest.raises(ValueError) as err:
        RoadModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir / "untied"), tmp_path / "a")
    message = str(err.value)
    assert len(message) < 800, message
    assert "more" in message and "keys (" in message


def test_the_heatmap_of_a_30_layer_all_linear_adapter_has_a_capped_size(tmp_path):
    from PIL import Image

    from roadkit.app.report import inspect_adapter, plot_report

    road = get_peft_model(tiny_llama(hidden=64, layers=30), RoadConfig(target_modules="all-linear", group_size=8))
    road.save_pretrained(tmp_path / "a")
    report = inspect_adapter(tmp_path / "a")
    plot_report(report, tmp_path / "a.png", title="30 layers")
    width, height = Image.open(tmp_path / "a.png").size
    assert height <= 120 * 32 and width <= 120 * 16, (width, height)


def test_a_hub_id_offline_fails_fast(tmp_path, capsys, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))  # an empty cache
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    start = time.perf_counter()
    code, _, err = cli(["generate", "--model", "someorg/somemodel", "--prompt", "x"], capsys, tmp_path, monkeypatch)
    assert time.perf_counter() - start < 15
    one_line_error(code, err, "someorg/somemodel", "cannot be reached")


def test_adapters_in_subfolders_get_a_hint(tmp_path, capsys, monkeypatch):
    road = get_peft_model(tiny_llama(), RoadConfig(target_modules=["q_proj"]), adapter_name="upper")
    road.add_adapter("lower", RoadConfig(target_modules=["q_proj"]))
    road.save_pretrained(tmp_path / "a")
    code, _, err = cli(["inspect", tmp_path / "a"], capsys, tmp_path, monkeypatch)
    one_line_error(code, err, "subfolders", "lower", "upper")


def test_inspect_of_a_file_says_it_is_a_file(tmp_path, capsys, monkeypatch):
    (tmp_path / "f.txt").write_text("x")
    code, _, err = cli(["inspect", tmp_path / "f.txt"], capsys, tmp_path, monkeypatch)
    one_line_error(code, err, "is a file")


def test_outputs_inside_an_input_adapter_are_refused(base_dir, tmp_path, capsys, monkeypatch):
    adapter = embedding_adapter(base_dir, "untied", capsys)
    before = sorted(os.listdir(adapter))
    code, _, err = cli(
        ["compose", "--adapter", f"a={adapter}", "--output", adapter / "inner"], capsys, tmp_path, monkeypatch
    )
    one_line_error(code, err, "inside")
    code, _, err = cli(
        ["merge", "--model", base_dir / "untied", "--adapter", adapter, "--output", adapter / "m"],
        capsys,
        tmp_path,
        monkeypatch,
    )
    one_line_error(code, err, "inside")
    assert sorted(os.listdir(adapter)) == before


def test_step_counts_read_well(base_dir, tmp_path, capsys, monkeypatch):
    common = [
        "train",
        "--model",
        base_dir / "untied",
        "--data",
        base_dir / "train.jsonl",
        "--no-progress",
        "--batch-size",
        "4",
        "--output",
        tmp_path / "run",
    ]
    code, out, err = cli([*common, "--max-steps", "1"], capsys, tmp_path, monkeypatch)
    assert code == 0, err
    assert "for 1 step " in out and "done: 1 step in" in out, out
    code, out, err = cli([*common, "--max-steps", "2", "--overwrite"], capsys, tmp_path, monkeypatch)
    assert code == 0, err
    code, out, err = cli(
        ["train", "--output", tmp_path / "run", "--resume", "--max-steps", "1"], capsys, tmp_path, monkeypatch
    )
    assert code == 0, err
    assert "of 1 step" not in out and "already did 2 steps" in out, out
