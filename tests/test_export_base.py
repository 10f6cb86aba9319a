"""`roadkit export-base`: a GGUF base model written as a transformers directory (what vLLM serves).

The tests write a tiny Llama GGUF file themselves with the `gguf` package (Q8_0 matrices, so the
export really dequantizes; a byte-level BPE tokenizer and a chat template, as in real files), export
it, and check that transformers loads the directory with the logits and tokenizer of the GGUF file,
and that a RoAd adapter saved on the GGUF base gives the same outputs on the exported directory.
"""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch

gguf = pytest.importorskip("gguf", reason="reading GGUF files needs the gguf package (pip install 'roadkit[gguf]')")
np = pytest.importorskip("numpy")

from test_cli import cli, no_leftovers, one_line_error  # noqa: E402

from roadkit import RoadModel, get_peft_model  # noqa: E402
from roadkit.app.loading import load_causal_lm, load_tokenizer  # noqa: E402
from roadkit.config import RoadConfig  # noqa: E402

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
IDS = torch.tensor([[1, 40, 71, 260, 5, 90, 2, 33], [1, 200, 17, 261, 261, 3, 100, 8]])


def write_tiny_gguf(path, tied: bool, hidden: int = 64, layers: int = 2, heads: int = 4, ffn: int = 128) -> None:
    """A random Llama as llama.cpp lays it out: Q8_0 matrices, float32 norms, a byte-level BPE tokenizer
    ("gpt2" in GGUF terms) with three control tokens and a few merges, and a chat template. Without
    `output.weight` the model ties its output head to the embeddings (as SmolLM2 does)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    rng = np.random.default_rng(0)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens = [*specials, *sorted(set(bytes_to_unicode().values())), "Ġt", "he", "Ġthe"]
    writer = gguf.GGUFWriter(os.fspath(path), "llama")
    writer.add_name("tiny")
    writer.add_context_length(64)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(heads)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL] * 3 + [gguf.TokenType.NORMAL] * (len(tokens) - 3))
    writer.add_token_merges(["Ġ t", "h e", "Ġt he"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)

    def matrix(name: str, rows: int, cols: int) -> None:
        data = (0.1 * rng.standard_normal((rows, cols))).astype(np.float32)
        q8 = gguf.GGMLQuantizationType.Q8_0
        writer.add_tensor(name, gguf.quants.quantize(data, q8), raw_dtype=q8)

    def norm(name: str) -> None:
        writer.add_tensor(name, (1 + 0.1 * rng.standard_normal(hidden)).astype(np.float32))

    matrix("token_embd.weight", len(tokens), hidden)
    for i in range(layers):
        norm(f"blk.{i}.attn_norm.weight")
        for part in ("attn_q", "attn_k", "attn_v", "attn_output"):
            matrix(f"blk.{i}.{part}.weight", hidden, hidden)
        norm(f"blk.{i}.ffn_norm.weight")
        matrix(f"blk.{i}.ffn_gate.weight", ffn, hidden)
        matrix(f"blk.{i}.ffn_up.weight", ffn, hidden)
        matrix(f"blk.{i}.ffn_down.weight", hidden, ffn)
    norm("output_norm.weight")
    if not tied:
        matrix("output.weight", len(tokens), hidden)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def exported(request, tmp_path_factory):
    """(directory holding tiny.gguf and its export in base/, the model roadkit reads from the GGUF file)."""
    root = tmp_path_factory.mktemp("gguf")
    write_tiny_gguf(root / "tiny.gguf", tied=request.param)
    with pytest.MonkeyPatch.context() as mp:
        code, _, _ = cli(["export-base", "--model", "tiny.gguf", "--output", "base"], _Uncaptured, root, mp)
    assert code == 0
    return root, load_causal_lm(root / "tiny.gguf")


class _Uncaptured:
    """For `cli` in a module-scoped fixture, where capsys is not available: pytest keeps the output."""

    @staticmethod
    def readouterr() -> tuple[str, str]:
        return "", ""


def test_the_export_loads_in_transformers_with_the_gguf_logits_and_tokenizer(exported):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, gguf_model = exported
    base = root / "base"
    assert {
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    } <= set(os.listdir(base))
    config = json.loads((base / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in config
    assert config["tie_word_embeddings"] == gguf_model.config.tie_word_embeddings
    # Readable by a server running as another user, as the config and tokenizer files are.
    mode = stat.S_IMODE(os.stat(base / "model.safetensors").st_mode)
    assert mode == stat.S_IMODE(os.stat(base / "config.json").st_mode), oct(mode)
    assert no_leftovers(root)

    model = AutoModelForCausalLM.from_pretrained(base).eval()
    assert model.dtype == torch.float32
    with torch.no_grad():
        expected = gguf_model(input_ids=IDS).logits
        torch.testing.assert_close(model(input_ids=IDS).logits, expected, atol=0, rtol=0)

    tokenizer, gguf_tokenizer = AutoTokenizer.from_pretrained(base), load_tokenizer(root / "tiny.gguf")
    text = "the cat<|im_end|> then"
    assert tokenizer(text).input_ids == gguf_tokenizer(text).input_ids
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (
        "<|im_start|>",
        "<|im_end|>",
        "<|im_end|>",
    )
    messages = [{"role": "user", "content": "hi"}]
    assert tokenizer.chat_template == gguf_tokenizer.chat_template == CHAT_TEMPLATE
    assert tokenizer.apply_chat_template(messages, tokenize=False) == "<|im_start|>user\nhi<|im_end|>\n"


def test_an_adapter_saved_on_the_gguf_base_gives_the_same_outputs_on_the_export(exported, tmp_path):
    from transformers import AutoModelForCausalLM

    root, _ = exported
    torch.manual_seed(0)
    on_gguf = get_peft_model(
        load_causal_lm(root / "tiny.gguf"),
        RoadConfig(variant="road_2", target_modules="all-linear", init_weights=False),
    )
    on_gguf.save_pretrained(tmp_path / "adapter")
    recorded = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert recorded == str(root / "tiny.gguf")

    on_export = RoadModel.from_pretrained(AutoModelForCausalLM.from_pretrained(root / "base"), tmp_path / "adapter")
    assert [name for name, _ in on_export.road_layers()] == [name for name, _ in on_gguf.road_layers()]
    assert len(list(on_export.road_layers())) == 2 * 7
    with torch.no_grad():
        expected = on_gguf(input_ids=IDS).logits
        with on_gguf.disable_adapter():
            plain = on_gguf(input_ids=IDS).logits
        torch.testing.assert_close(on_export(input_ids=IDS).logits, expected, atol=0, rtol=0)
    assert (expected - plain).abs().max() > 0.1  # the adapter matters


def test_dtype_overwrite_and_errors(exported, tmp_path, capsys, monkeypatch):
    from safetensors.torch import load_file

    root, _ = exported
    gguf_file = root / "tiny.gguf"
    code, _, err = cli(["export-base", "--model", gguf_file, "--output", root / "base"], capsys, tmp_path, monkeypatch)
    one_line_error(code, err, "already exists", "--overwrite")

    code, out, err = cli(
        ["export-base", "--model", gguf_file, "--output", "half", "--dtype", "bfloat16"], capsys, tmp_path, monkeypatch
    )
    assert code == 0, err
    assert out.splitlines() == [
        f"reading {gguf_file} (dequantizing)",
        "tokenizer and chat template included",
        "wrote half (LlamaForCausalLM, bfloat16)",
    ]
    assert json.loads((tmp_path / "half" / "config.json").read_text())["dtype"] == "bfloat16"
    half, full = load_file(tmp_path / "half" / "model.safetensors"), load_file(root / "base" / "model.safetensors")
    assert half.keys() == full.keys()
    for name, tensor in half.items():
        assert tensor.dtype == torch.bfloat16
        torch.testing.assert_close(tensor, full[name].to(torch.bfloat16), atol=0, rtol=0)

    (tmp_path / "half" / "notes.txt").write_text("mine")
    code, out, err = cli(
        ["export-base", "--model", gguf_file, "--output", "half", "--overwrite"], capsys, tmp_path, monkeypatch
    )
    assert code == 0, err
    assert json.loads((tmp_path / "half" / "config.json").read_text())["dtype"] == "float32"
    assert not (tmp_path / "half" / "notes.txt").exists()  # replaced whole, like merge's output

    code, _, err = cli(["export-base", "--model", "missing.gguf", "--output", "x"], capsys, tmp_path, monkeypatch)
    one_line_error(code, err, "missing.gguf", "does not exist")
    code, _, err = cli(
        ["export-base", "--model", gguf_file, "--output", root, "--overwrite"], capsys, tmp_path, monkeypatch
    )
    one_line_error(code, err, "holds the input")  # replacing it would delete the GGUF file
    assert gguf_file.is_file() and not (tmp_path / "x").exists() and no_leftovers(tmp_path)
