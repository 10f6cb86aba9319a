"""Training data for causal language models: JSONL rows, token ids with completion-only labels, padding.

A JSONL file holds one JSON object per line: `{"text": ...}` (the loss covers every token) or
`{"prompt": ..., "completion": ...}` (the loss covers the completion only). The prompt and the
completion are tokenized separately, so the boundary never falls inside a token and a prompt
tokenizes the same way in training and in generation; an end-of-sequence token follows the
completion so the model learns to stop.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

IGNORE_INDEX = -100  # label of tokens the loss skips (what transformers' models expect)


class DataError(ValueError):
    """Unusable input data; the message names the file (and line)."""


@dataclass(frozen=True)
class Example:
    """One training row. `prompt` is "" for plain-text rows. `line` is the row's line in its file."""

    prompt: str
    completion: str
    line: int = 0


@dataclass(frozen=True)
class Sample:
    """One tokenized row: token ids and their labels (IGNORE_INDEX where the loss skips a token)."""

    input_ids: list[int]
    labels: list[int]
    line: int = 0


def read_jsonl(path: Union[str, os.PathLike]) -> list[Example]:
    """Read and validate a JSONL file; any problem raises `DataError` naming the file and line."""
    name = os.fspath(path)
    if os.path.isdir(name):
        raise DataError(f"{name}: is a directory, not a JSONL file.")
    if not os.path.isfile(name):
        raise DataError(f"{name}: no such file.")
    examples = []
    with open(name, encoding="utf-8-sig") as fh:  # -sig: a byte-order mark some editors write is not data
        try:
            lines = list(fh)
        except UnicodeDecodeError as err:
            raise DataError(f"{name}: not UTF-8 text ({err.reason} at byte {err.start}).") from err
    for number, line in enumerate(lines, start=1):
        if line.strip():
            examples.append(_parse_row(line, f"{name}:{number}", number))
    if not examples:
        raise DataError(f"{name}: no rows; expected one JSON object per line.")
    return examples


def _parse_row(line: str, where: str, number: int) -> Example:
    try:
        row: Any = json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(f"{where}: not valid JSON ({err.msg}, column {err.colno}).") from err
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}.")
    if "text" in row and ("prompt" in row or "completion" in row):
        raise DataError(f"{where}: has both 'text' and 'prompt'/'completion'; give one or the other.")
    keys = ("text",) if "text" in row else ("prompt", "completion")
    for key in keys:
        if key not in row:
            raise DataError(
                f'{where}: expected {{"text": ...}} or {{"prompt": ..., "completion": ...}}, got keys {sorted(row)}.'
            )
        if not isinstance(row[key], str):
            raise DataError(f"{where}: '{key}' must be a string, got {type(row[key]).__name__}.")
    if "text" in row:
        if not row["text"]:
            raise DataError(f"{where}: 'text' is empty.")
        return Example("", row["text"], number)
    if not row["completion"]:
        raise DataError(f"{where}: 'completion' is empty.")
    return Example(row["prompt"], row["completion"], number)


def prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    """Token ids of a prompt, the same in training and in generation: with the tokenizer's special
    tokens (BOS), but without a trailing EOS (tokenizers that end every text with one)."""
    ids = list(tokenizer(prompt).input_ids)
    eos = tokenizer.eos_token_id
    if eos is not None and ids and ids[-1] == eos and eos != tokenizer.bos_token_id:
        ids = ids[:-1]
    return ids


def pad_token_id(tokenizer: Any, default: Optional[int] = None) -> int:
    """The id to pad with: the tokenizer's pad token, else its end-of-sequence token, else `default`
    (ValueError when that is None too)."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, default):
        if candidate is not None:
            return int(candidate)
    raise ValueError("the tokenizer has neither a pad nor an end-of-sequence token to pad with.")


def tokenize(tokenizer: Any, example: Example, max_length: int) -> Sample:
    """Token ids of prompt + completion + EOS, cut to `max_length`; the prompt's tokens get no label.

    The prompt is tokenized with the tokenizer's special tokens (BOS), the completion without.
    """
    eos = tokenizer.eos_token_id
    prompt = prompt_ids(tokenizer, example.prompt)
    completion = tokenizer(example.completion, add_special_tokens=False).input_ids
    if eos is not None:
        completion = completion + [eos]
    ids = (prompt + completion)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt) + completion)[:max_length]
    return Sample(ids, labels, example.line)


def tokenize_all(tokenizer: Any, examples: Sequence[Example], max_length: int) -> tuple[list[Sample], list[int]]:
    """Tokenize every example; returns the samples that keep at least one predicted label token
    within `max_length`, and the line numbers of those that do not (their prompt fills the window)."""
    samples, dropped = [], []
    for example in examples:
        sample = tokenize(tokenizer, example, max_length)
        if any(label != IGNORE_INDEX for label in sample.labels[1:]):
            samples.append(sample)
        else:
            dropped.append(example.line)
    return samples, dropped


def load_samples(path: Union[str, os.PathLike], tokenizer: Any, max_length: int) -> list[Sample]:
    """Read and tokenize a JSONL file for training; DataError when no row keeps a completion token within
    `max_length`, and a one-line warning on stderr naming the lines of the rows that were skipped."""
    name = os.fspath(path)
    samples, dropped = tokenize_all(tokenizer, read_jsonl(name), max_length)
    if not samples:
        raise DataError(f"{name}: no row keeps a completion token within --max-length {max_length}.")
    if dropped:
        shown = ", ".join(map(str, dropped[:10])) + (", ..." if len(dropped) > 10 else "")
        print(
            f"warning: {name}: skipped {len(dropped)} rows whose prompt fills --max-length {max_length} "
            f"(lines {shown}).",
            file=sys.stderr,
        )
    return samples
