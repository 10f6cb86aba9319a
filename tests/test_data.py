"""JSONL reading and validation, completion-only labels, padding for training and for generation."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from roadkit.app.data import IGNORE_INDEX, DataError, Example, read_jsonl, tokenize, tokenize_all
from roadkit.app.demo import build_tokenizer
from roadkit.app.generation import left_padded


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def write(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_read_jsonl_rows_and_blank_lines(tmp_path):
    rows = [json.dumps({"text": "abc"}), "", json.dumps({"prompt": "p", "completion": "c"})]
    path = write(tmp_path / "d.jsonl", rows)
    assert read_jsonl(path) == [Example("", "abc", 1), Example("p", "c", 3)]


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"text": "a"', "not valid JSON"),
        ('["a"]', "expected a JSON object"),
        ('{"prompt": "a"}', 'expected {"text"'),
        ('{"text": 3}', "'text' must be a string"),
        ('{"text": ""}', "'text' is empty"),
        ('{"text": "a", "prompt": "b", "completion": "c"}', "both 'text' and 'prompt'"),
        ('{"prompt": "a", "completion": ""}', "'completion' is empty"),
    ],
)
def test_read_jsonl_errors_name_file_and_line(tmp_path, line, message):
    path = write(tmp_path / "bad.jsonl", [json.dumps({"text": "fine"}), line])
    with pytest.raises(DataError, match="bad.jsonl:2: ") as err:
        read_jsonl(path)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_read_jsonl_missing_empty_and_binary(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_jsonl(tmp_path / "missing.jsonl")
    with pytest.raises(DataError, match="no rows"):
        read_jsonl(write(tmp_path / "empty.jsonl", ["", "  "]))
    (tmp_path / "bin.jsonl").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(DataError, match="not UTF-8"):
        read_jsonl(tmp_path / "bin.jsonl")


def test_completion_only_labels(tokenizer):
    sample = tokenize(tokenizer, Example("ab ->", " AB"), max_length=64)
    prompt = tokenizer("ab ->").input_ids
    assert sample.input_ids == prompt + tokenizer(" AB", add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    assert sample.labels[: len(prompt)] == [IGNORE_INDEX] * len(prompt)
    assert sample.labels[len(prompt) :] == sample.input_ids[len(prompt) :]


def test_text_rows_label_every_token_after_bos(tokenizer):
    sample = tokenize(tokenizer, Example("", "hello"), max_length=64)
    assert sample.input_ids[0] == tokenizer.bos_token_id and sample.labels[0] == IGNORE_INDEX
    assert sample.labels[1:] == sample.input_ids[1:] and sample.input_ids[-1] == tokenizer.eos_token_id


def test_truncation_drops_rows_without_a_completion_token(tokenizer):
    rows = [Example("a long prompt ->", " X", 1), Example("p", " X", 2)]
    samples, dropped = tokenize_all(tokenizer, rows, max_length=6)
    assert dropped == [1] and [s.line for s in samples] == [2]
    assert all(len(s.input_ids) <= 6 for s in samples)


def test_training_batches_are_right_padded_with_unlabelled_padding(tokenizer):
    from roadkit.app.training import collator

    samples, _ = tokenize_all(tokenizer, [Example("a", " b"), Example("abc", " d")], 64)
    caller = copy.deepcopy(tokenizer)
    caller.padding_side = "left"  # the caller's setting, which the collator must neither use nor change
    batch = collator(caller)([{"input_ids": s.input_ids, "labels": s.labels} for s in samples])
    assert caller.padding_side == "left"
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (2, 7)
    assert batch["attention_mask"][0].tolist() == [1, 1, 1, 1, 1, 0, 0]  # <s> a _ b </s> + 2 pads
    assert batch["labels"][0, 5:].tolist() == [IGNORE_INDEX] * 2
    assert batch["input_ids"][0, 5:].tolist() == [tokenizer.pad_token_id] * 2


def test_left_padding_for_generation(tokenizer):
    batch = left_padded(tokenizer, ["a", "abc"])
    assert batch["attention_mask"].tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]]
    assert batch["input_ids"][0, :2].tolist() == [tokenizer.pad_token_id] * 2
    assert torch.equal(batch["input_ids"][1], torch.tensor(tokenizer("abc").input_ids))


def test_prompts_tokenize_the_same_in_training_and_generation():
    from tokenizers import processors

    from roadkit.app.data import prompt_ids

    eos_after = build_tokenizer()  # a tokenizer that ends every text with EOS
    vocab = eos_after.get_vocab()
    eos_after._tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", vocab["<s>"]), ("</s>", vocab["</s>"])]
    )
    assert eos_after("ab").input_ids[-1] == eos_after.eos_token_id
    sample = tokenize(eos_after, Example("ab ->", " AB"), max_length=64)
    prompt = [i for i, label in zip(sample.input_ids, sample.labels, strict=True) if label == IGNORE_INDEX]
    assert prompt == prompt_ids(eos_after, "ab ->") and prompt[-1] != eos_after.eos_token_id
    assert left_padded(eos_after, ["ab ->"])["input_ids"][0].tolist() == prompt


def test_pad_token_fallbacks(tokenizer):
    import copy

    from roadkit.app.data import pad_token_id

    assert pad_token_id(tokenizer) == tokenizer.pad_token_id
    no_pad = copy.deepcopy(tokenizer)
    no_pad.pad_token = None
    assert pad_token_id(no_pad) == tokenizer.eos_token_id
    no_pad.eos_token = None
    assert pad_token_id(no_pad, default=0) == 0
    with pytest.raises(ValueError, match="neither a pad nor an end-of-sequence"):
        pad_token_id(no_pad)


# ---- chat rows ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chat_tokenizer():
    from roadkit.app.demo import CHAT_TEMPLATE

    tokenizer = build_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def chat(*turns):
    """A chat row from (role, content) pairs."""
    return json.dumps({"messages": [{"role": r, "content": c} for r, c in turns]})


def test_read_jsonl_chat_rows(tmp_path):
    from roadkit.app.data import ChatExample

    path = write(tmp_path / "chat.jsonl", [chat(("system", "be brief"), ("user", "hi"), ("assistant", "HI"))])
    assert read_jsonl(path) == [ChatExample((("system", "be brief"), ("user", "hi"), ("assistant", "HI")), 1)]


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"messages": []}', "'messages' must be a non-empty list"),
        ('{"messages": "hi"}', "'messages' must be a non-empty list"),
        ('{"messages": ["hi"]}', "message 1 must be a JSON object"),
        (chat(("user", "hi"), ("bot", "HI")), "message 2 has the role 'bot'; roles are system, user, assistant"),
        ('{"messages": [{"content": "hi"}]}', "message 1 has no 'role'"),
        (
            '{"messages": [{"role": "user"}, {"role": "assistant", "content": "A"}]}',
            "message 1 (user) has no 'content'",
        ),
        (
            '{"messages": [{"role": "user", "content": ["hi"]}, {"role": "assistant", "content": "A"}]}',
            "'content' must be a string, got list",
        ),
        (chat(("user", "hi"), ("assistant", "")), "message 2 (assistant) is empty"),
        (chat(("system", "s"), ("user", "hi")), "no assistant message"),
        ('{"messages": [{"role": "user", "content": "a"}], "text": "b"}', "has both 'messages' and ['text']"),
    ],
)
def test_malformed_chat_rows_name_file_line_and_problem(tmp_path, line, message):
    path = write(tmp_path / "bad.jsonl", [chat(("user", "fine"), ("assistant", "FINE")), line])
    with pytest.raises(DataError, match="bad.jsonl:2: ") as err:
        read_jsonl(path)
    assert message in str(err.value) and "\n" not in str(err.value)


def learnt(tokenizer, sample):
    """The text of the labelled tokens."""
    return "".join(
        tokenizer.convert_ids_to_tokens([i for i, x in zip(sample.input_ids, sample.labels, strict=True) if x >= 0])
    )


def test_chat_rows_learn_the_assistant_turns_only(chat_tokenizer, tmp_path):
    from roadkit.app.data import chat_prompt_ids

    path = write(
        tmp_path / "c.jsonl",
        [chat(("system", "s"), ("user", "ab"), ("assistant", "AB"), ("user", "cd"), ("assistant", "CD"))],
    )
    (row,) = read_jsonl(path)
    sample = tokenize(chat_tokenizer, row, 64)
    text = chat_tokenizer.apply_chat_template(row.as_messages(), tokenize=False)
    assert text == "<s>system: s\nuser: ab\nassistant: AB</s>\nuser: cd\nassistant: CD</s>\n"
    assert sample.input_ids == chat_tokenizer(text, add_special_tokens=False).input_ids
    assert learnt(chat_tokenizer, sample) == "AB</s>\nCD</s>\n"  # each answer and its end of turn
    everything = tokenize(chat_tokenizer, row, 64, loss_on="all")
    assert everything.input_ids == sample.input_ids and everything.labels == everything.input_ids
    # the text before the first answer is what generation sends for that user turn (after a system turn here)
    one = tokenize(
        chat_tokenizer, read_jsonl(write(tmp_path / "1.jsonl", [chat(("user", "ab"), ("assistant", "AB"))]))[0], 64
    )
    prompt = chat_prompt_ids(chat_tokenizer, "ab")
    assert one.input_ids[: len(prompt)] == prompt and one.labels[len(prompt)] == one.input_ids[len(prompt)]
    assert all(x == IGNORE_INDEX for x in one.labels[: len(prompt)])


def test_loss_on_all_labels_prompts_too(tokenizer):
    sample = tokenize(tokenizer, Example("ab ->", " AB"), max_length=64, loss_on="all")
    assert sample.labels == sample.input_ids
    with pytest.raises(ValueError, match="loss_on"):
        tokenize(tokenizer, Example("ab ->", " AB"), max_length=64, loss_on="prompt")


def test_a_template_that_does_not_render_turn_by_turn_is_a_clear_error(chat_tokenizer, tmp_path):
    from roadkit.app.data import load_samples

    odd = copy.deepcopy(chat_tokenizer)  # the generation prompt is not how an assistant turn begins
    odd.chat_template = chat_tokenizer.chat_template.replace("{{ 'assistant: ' }}", "{{ 'answer: ' }}")
    path = write(tmp_path / "c.jsonl", [chat(("user", "ab"), ("assistant", "AB"))])
    with pytest.raises(DataError, match=r"c.jsonl:1: the chat template does not render this conversation turn by turn"):
        load_samples(path, odd, 64)
    assert len(load_samples(path, odd, 64, loss_on="all")) == 1  # the whole row is learnt


def test_chat_rows_need_a_chat_template(tokenizer, tmp_path):
    from roadkit.app.data import load_samples

    path = write(tmp_path / "c.jsonl", [json.dumps({"text": "x"}), chat(("user", "ab"), ("assistant", "AB"))])
    with pytest.raises(DataError, match=r"c.jsonl:2: a chat row .* has no chat template"):
        load_samples(path, tokenizer, 64)


def test_a_template_error_names_the_row(chat_tokenizer, tmp_path):
    from roadkit.app.data import load_samples

    strict = copy.deepcopy(chat_tokenizer)
    strict.chat_template = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system turns') }}{% endif %}"
    path = write(tmp_path / "c.jsonl", [chat(("system", "s"), ("user", "ab"), ("assistant", "AB"))])
    with pytest.raises(DataError, match="c.jsonl:1: the chat template refused the conversation: no system turns"):
        load_samples(path, strict, 64)
