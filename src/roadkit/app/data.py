"""Training data for causal language models: JSONL rows, token ids with answer-only labels, padding.

A JSONL file holds one JSON object per line: `{"text": ...}` (the loss covers every token),
`{"prompt": ..., "completion": ...}` (the loss covers the completion only) or a conversation,
`{"messages": [{"role": "system" | "user" | "assistant", "content": ...}, ...]}`, rendered with the
tokenizer's chat template (the loss covers the assistant turns only). `loss_on="all"` puts every token
of every row under the loss instead.

The prompt and the completion are tokenized separately, so the boundary never falls inside a token and
a prompt tokenizes the same way in training and in generation; an end-of-sequence token follows the
completion so the model learns to stop. A conversation is rendered whole, and cut where each assistant
turn starts and ends, found by rendering the turns before it with the template's generation prompt: the
text before a turn is what a server sends the model when it asks for that turn, and the turn's end
(the template's end-of-turn token) is learnt, so the model stops there.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

from ..errors import InputError

IGNORE_INDEX = -100  # label of tokens the loss skips (what transformers' models expect)
ROLES = ("system", "user", "assistant")  # the roles a chat row's messages may have
LOSS_ON = ("assistant", "all")  # what the loss covers: answers (completions, assistant turns) or every token


class DataError(InputError):
    """Unusable input data; the message names the file (and line)."""


@dataclass(frozen=True)
class Example:
    """One training row. `prompt` is "" for plain-text rows. `line` is the row's line in its file."""

    prompt: str
    completion: str
    line: int = 0


@dataclass(frozen=True)
class ChatExample:
    """One chat row: its messages as (role, content) pairs, in order. `line` is the row's line in its file."""

    messages: tuple[tuple[str, str], ...]
    line: int = 0

    def as_messages(self) -> list[dict[str, str]]:
        """The messages as a chat template takes them: [{"role": ..., "content": ...}, ...]."""
        return [{"role": role, "content": content} for role, content in self.messages]


Row = Union[Example, ChatExample]


@dataclass(frozen=True)
class Sample:
    """One tokenized row: token ids and their labels (IGNORE_INDEX where the loss skips a token)."""

    input_ids: list[int]
    labels: list[int]
    line: int = 0


def read_jsonl(path: Union[str, os.PathLike]) -> list[Row]:
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


FORMATS = '{"text": ...}, {"prompt": ..., "completion": ...} or {"messages": [{"role": ..., "content": ...}, ...]}'


def _parse_row(line: str, where: str, number: int) -> Row:
    try:
        row: Any = json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(f"{where}: not valid JSON ({err.msg}, column {err.colno}).") from err
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}.")
    if "messages" in row:
        others = sorted({"text", "prompt", "completion"} & set(row))
        if others:
            raise DataError(f"{where}: has both 'messages' and {others}; give one or the other.")
        return ChatExample(_parse_messages(row["messages"], where), number)
    if "text" in row and ("prompt" in row or "completion" in row):
        raise DataError(f"{where}: has both 'text' and 'prompt'/'completion'; give one or the other.")
    keys = ("text",) if "text" in row else ("prompt", "completion")
    for key in keys:
        if key not in row:
            raise DataError(f"{where}: expected {FORMATS}, got keys {sorted(row)}.")
        if not isinstance(row[key], str):
            raise DataError(f"{where}: '{key}' must be a string, got {type(row[key]).__name__}.")
    if "text" in row:
        if not row["text"]:
            raise DataError(f"{where}: 'text' is empty.")
        return Example("", row["text"], number)
    if not row["completion"]:
        raise DataError(f"{where}: 'completion' is empty.")
    return Example(row["prompt"], row["completion"], number)


def _parse_messages(messages: Any, where: str) -> tuple[tuple[str, str], ...]:
    """A chat row's messages as (role, content) pairs; DataError for a malformed list, an unknown role, a missing
    or non-string content, an empty answer, or a conversation with no assistant turn (nothing to learn)."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f'{where}: \'messages\' must be a non-empty list of {{"role": ..., "content": ...}} objects.')
    out = []
    for i, message in enumerate(messages, start=1):
        if not isinstance(message, dict):
            raise DataError(f"{where}: message {i} must be a JSON object, got {type(message).__name__}.")
        role = message.get("role")
        if role not in ROLES:
            shown = "no 'role'" if role is None else f"the role {role!r}"
            raise DataError(f"{where}: message {i} has {shown}; roles are {', '.join(ROLES)}.")
        if "content" not in message:
            raise DataError(f"{where}: message {i} ({role}) has no 'content'.")
        content = message["content"]
        if not isinstance(content, str):
            raise DataError(f"{where}: message {i} ({role}): 'content' must be a string, got {type(content).__name__}.")
        if role == "assistant" and not content:
            raise DataError(f"{where}: message {i} (assistant) is empty.")
        out.append((role, content))
    if not any(role == "assistant" for role, _ in out):
        raise DataError(f"{where}: no assistant message, so nothing to learn; add the answer as an assistant turn.")
    return tuple(out)


def has_chat_template(tokenizer: Any) -> bool:
    """Whether the tokenizer can render conversations (it has a chat template)."""
    return bool(getattr(tokenizer, "chat_template", None))


def require_chat_template(tokenizer: Any, rows: Sequence[Row], source: str, model: str = "the model") -> None:
    """DataError naming the file and the first chat row when `rows` hold conversations and `tokenizer` has no
    chat template to render them with."""
    chat = next((row for row in rows if isinstance(row, ChatExample)), None)
    if chat is not None and not has_chat_template(tokenizer):
        raise DataError(
            f'{source}:{chat.line}: a chat row ("messages"), but the tokenizer of {model} has no chat template to '
            'render it with; give the tokenizer one ("chat_template" in tokenizer_config.json, or '
            "chat_template.jinja) or write the rows as prompt/completion pairs."
        )


def render_chat(tokenizer: Any, messages: Sequence[dict[str, str]], generation_prompt: bool) -> str:
    """A conversation as the tokenizer's chat template writes it, with the template's generation prompt (what
    opens an assistant turn) when asked; DataError when the template refuses the conversation."""
    from jinja2 import TemplateError

    try:
        text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=generation_prompt)
    except TemplateError as err:
        raise DataError(f"the chat template refused the conversation: {' '.join(str(err).split())}") from err
    return str(text)


def chat_ids(tokenizer: Any, text: str) -> list[int]:
    """Token ids of rendered chat text: the template writes the special tokens itself (as vLLM's and
    transformers' chat paths tokenize it)."""
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def chat_prompt_ids(tokenizer: Any, content: str) -> list[int]:
    """Token ids that ask the model to answer a one-message conversation, a user turn holding `content`: the
    same ids as the text before the first answer of a training row with that user turn, and the ids an
    OpenAI-style chat server sends the model."""
    return chat_ids(tokenizer, render_chat(tokenizer, [{"role": "user", "content": content}], generation_prompt=True))


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
    (InputError when that is None too)."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, default):
        if candidate is not None:
            return int(candidate)
    raise InputError("the tokenizer has neither a pad nor an end-of-sequence token to pad with.")


def tokenize(tokenizer: Any, example: Row, max_length: int, loss_on: str = "assistant") -> Sample:
    """Token ids of a row, cut to `max_length`, and their labels: with `loss_on="assistant"` only the answers
    (a completion and its EOS, a chat row's assistant turns) are labelled, with "all" every token.

    A prompt is tokenized with the tokenizer's special tokens (BOS), a completion without; a chat row's
    rendered text without (its template writes them).
    """
    if loss_on not in LOSS_ON:
        raise InputError(f"loss_on must be one of {', '.join(LOSS_ON)}, got {loss_on!r}.")
    if isinstance(example, ChatExample):
        ids, answer = _tokenize_chat(tokenizer, example, loss_on)
    else:
        eos = tokenizer.eos_token_id
        prompt = prompt_ids(tokenizer, example.prompt)
        completion = tokenizer(example.completion, add_special_tokens=False).input_ids
        if eos is not None:
            completion = completion + [eos]
        ids, answer = prompt + completion, [loss_on == "all"] * len(prompt) + [True] * len(completion)
    labels = [i if learnt else IGNORE_INDEX for i, learnt in zip(ids, answer, strict=True)]
    return Sample(ids[:max_length], labels[:max_length], example.line)


def _tokenize_chat(tokenizer: Any, example: ChatExample, loss_on: str) -> tuple[list[int], list[bool]]:
    """A chat row's token ids, and which of them are learnt. The rendered text is tokenized in pieces cut at
    the assistant turns' ends, so no token straddles a boundary and the text before a turn tokenizes as the
    prompt of that turn does; DataError when the template does not render the conversation turn by turn
    (then only `loss_on="all"` can use it)."""
    messages = example.as_messages()
    text = render_chat(tokenizer, messages, generation_prompt=False)
    if loss_on == "all":
        every = chat_ids(tokenizer, text)
        return every, [True] * len(every)
    cuts, spans = [0], []
    for i, (role, _) in enumerate(example.messages):
        if role != "assistant":
            continue
        before = render_chat(tokenizer, messages[:i], generation_prompt=True)
        through = render_chat(tokenizer, messages[: i + 1], generation_prompt=False)
        if not (through.startswith(before) and text.startswith(through) and len(before) >= cuts[-1]):
            raise DataError(
                f"the chat template does not render this conversation turn by turn (the text before assistant "
                f"message {i + 1} is not how the whole conversation begins), so its assistant turns cannot be "
                "told apart; train with --loss-on all, or fix the template."
            )
        spans.append(len(cuts))
        cuts += [len(before), len(through)]
    cuts.append(len(text))
    ids: list[int] = []
    answer: list[bool] = []
    for k in range(len(cuts) - 1):
        piece = chat_ids(tokenizer, text[cuts[k] : cuts[k + 1]]) if cuts[k + 1] > cuts[k] else []
        ids += piece
        answer += [k in spans] * len(piece)
    return ids, answer


def tokenize_all(
    tokenizer: Any, examples: Sequence[Row], max_length: int, loss_on: str = "assistant", source: str = "row"
) -> tuple[list[Sample], list[int]]:
    """Tokenize every example; returns the samples that keep at least one predicted label token
    within `max_length`, and the line numbers of those that do not (their prompt fills the window).
    A row the chat template cannot render is a DataError naming `source` and its line."""
    samples, dropped = [], []
    for example in examples:
        try:
            sample = tokenize(tokenizer, example, max_length, loss_on)
        except DataError as err:
            raise DataError(f"{source}:{example.line}: {err}") from err
        if any(label != IGNORE_INDEX for label in sample.labels[1:]):
            samples.append(sample)
        else:
            dropped.append(example.line)
    return samples, dropped


def load_samples(
    path: Union[str, os.PathLike], tokenizer: Any, max_length: int, loss_on: str = "assistant"
) -> list[Sample]:
    """Read and tokenize a JSONL file for training; DataError when no row keeps a completion token within
    `max_length` (or chat rows meet a tokenizer without a chat template), and a one-line warning on stderr
    naming the lines of the rows that were skipped."""
    name = os.fspath(path)
    rows = read_jsonl(name)
    require_chat_template(tokenizer, rows, name)
    samples, dropped = tokenize_all(tokenizer, rows, max_length, loss_on, source=name)
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
