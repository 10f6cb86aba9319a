"""The offline end-to-end walk-through, and the tiny model and tasks it is built on.

The base model is a small Llama over a character-level tokenizer, shipped with roadkit in
`demo_base/` (about 1.8 MB; `scripts/build_demo_base.py` rebuilds it from the functions here).
It was pretrained on short string operations named in the prompt, `copy: kitten -> kitten`,
`upper: kitten -> KITTEN`, `reverse: kitten -> nettik`, and on unnamed ones, `kitten -> kitten`:
with no operation named, it copies. Each demo task trains a RoAd adapter on the unnamed format
with another operation (upper-casing, reversal): the adapter changes what the model does by
default, with a few thousand parameters. Words are made-up syllable strings; a fixed hash sends
each word to the training or the held-out split, so held-out words are never trained on (by the
base model or an adapter).

Everything here is deterministic (fixed seeds) and needs no network: `build_tokenizer`,
`build_model`, `words`, `task_examples`, `pretraining_examples` and `load_base` are meant for
reuse by other experiments on the same model and tasks. The shipped base has no chat template;
`save_chat_base` writes a copy with `CHAT_TEMPLATE`, and `chat_rows` the tasks as conversations, for
trying chat training and serving on it.
"""

from __future__ import annotations

import copy
import json
import os
import random
import shutil
import string
import time
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Union, cast

import torch

from ..config import RoadConfig
from ..errors import InputError
from ..fileio import atomic_write_bytes
from ..model import RoadModel, get_peft_model
from .data import Example, tokenize_all

BASE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo_base")
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
ALPHABET = string.ascii_lowercase + string.ascii_uppercase + string.digits + " .,;:!?'\"-_=>()[]/\n"
CONSONANTS, VOWELS = "bcdfghjklmnprstvwz", "aeiou"

# The demo tasks: unnamed-format string operations, one adapter each.
TASKS: dict[str, Callable[[str], str]] = {"upper": str.upper, "reverse": lambda word: word[::-1]}
# What the base model learned when the prompt names the operation.
SKILLS: dict[str, Callable[[str], str]] = {"copy": lambda word: word, **TASKS}


@dataclass(frozen=True)
class DemoSettings:
    """Sizes of a demo run. `FULL` is the default; `FAST` is a smoke test that still shows learning."""

    steps: int
    batch_size: int
    lr: float
    train_rows: int
    eval_rows: int
    shown_words: int


FULL = DemoSettings(steps=300, batch_size=32, lr=2e-2, train_rows=4000, eval_rows=64, shown_words=4)
FAST = DemoSettings(steps=60, batch_size=16, lr=2e-2, train_rows=960, eval_rows=32, shown_words=2)
ADAPTER_CONFIG: dict[str, Any] = {"variant": "road_1", "group_size": 64, "target_modules": "all-linear"}
# A small chat template in the base's alphabet: "<s>user: kitten\nassistant: KITTEN</s>\n", one line per message.
# (Newlines are written as expressions: transformers renders templates with trim_blocks, which drops one after a tag.)
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] + ': ' + m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)


# ---- the model ---------------------------------------------------------------------------------


def build_tokenizer() -> Any:
    """A character-level `PreTrainedTokenizerFast` (one token per character of `ALPHABET`, BOS first)."""
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *ALPHABET])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))  # no merges: characters
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def build_model(
    tokenizer: Any, hidden_size: int = 128, num_layers: int = 2, intermediate_size: int = 384, seed: int = 0
) -> Any:
    """A freshly initialised small Llama for `tokenizer` (every projection's width divides by 64)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config).eval()


def load_base(dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """(model, tokenizer) of the shipped demo base model, in eval mode."""
    from .loading import load_causal_lm, load_tokenizer, quiet_transformers

    quiet_transformers()
    return load_causal_lm(BASE_DIR, dtype=dtype), load_tokenizer(BASE_DIR)


def save_chat_base(directory: Union[str, os.PathLike]) -> str:
    """Copy the shipped base model to `directory` (which must not exist) with `CHAT_TEMPLATE` in its
    tokenizer_config.json; returns the directory."""
    target = os.fspath(directory)
    shutil.copytree(BASE_DIR, target)
    path = os.path.join(target, "tokenizer_config.json")
    with open(path, encoding="utf-8") as fh:
        config = json.load(fh)
    config["chat_template"] = CHAT_TEMPLATE
    atomic_write_bytes(path, (json.dumps(config, indent=2) + "\n").encode())
    return target


# ---- the data ----------------------------------------------------------------------------------


def make_word(rng: random.Random) -> str:
    """A made-up lowercase word of one to three syllables (consonant, vowel, sometimes a consonant)."""
    return "".join(
        rng.choice(CONSONANTS) + rng.choice(VOWELS) + (rng.choice(CONSONANTS) if rng.random() < 0.3 else "")
        for _ in range(rng.randint(1, 3))
    )


def split_of(word: str) -> str:
    """ "eval" for about a quarter of all words, "train" for the rest, fixed by a hash of the word."""
    return "eval" if zlib.crc32(word.encode()) % 4 == 0 else "train"


def words(split: str, count: int, seed: int = 0) -> list[str]:
    """`count` distinct words of `split` ("train" or "eval"), in a fixed order for each seed."""
    if split not in ("train", "eval"):
        raise InputError(f"split must be 'train' or 'eval', got {split!r}.")
    rng, seen, out = random.Random(f"{split}-{seed}"), set(), cast(list[str], [])
    while len(out) < count:
        word = make_word(rng)
        if word not in seen and split_of(word) == split:
            seen.add(word)
            out.append(word)
    return out


def prompt_for(word: str) -> str:
    """The unnamed-operation prompt the tasks use."""
    return f"{word} ->"


def task_examples(task: str, split: str, count: int, seed: int = 0) -> list[Example]:
    """`count` prompt/completion rows of a demo task: "kitten ->" / " KITTEN" for "upper"."""
    operation = TASKS[task]
    return [Example(prompt_for(w), f" {operation(w)}", i + 1) for i, w in enumerate(words(split, count, seed))]


def chat_rows(task: str, split: str, count: int, seed: int = 0) -> list[dict[str, Any]]:
    """`count` JSONL chat rows of a demo task: a user turn "kitten", an assistant turn "KITTEN" for "upper"."""
    operation = TASKS[task]
    return [
        {"messages": [{"role": "user", "content": w}, {"role": "assistant", "content": operation(w)}]}
        for w in words(split, count, seed)
    ]


def pretraining_examples(count: int, seed: int = 0) -> list[Example]:
    """Plain-text rows the base model is pretrained on: named operations, and unnamed copies."""
    rng = random.Random(f"pretrain-{seed}")
    names = [*SKILLS, ""]
    out = []
    for i, word in enumerate(words("train", count, seed)):
        name = rng.choice(names)
        text = f"{name}: {word} -> {SKILLS[name](word)}" if name else f"{prompt_for(word)} {word}"
        out.append(Example("", text, i + 1))
    return out


# ---- the walk-through --------------------------------------------------------------------------


def run_demo(
    output: Union[str, os.PathLike], fast: bool = False, overwrite: bool = False, say: Callable[[str], None] = print
) -> dict[str, Any]:
    """Train one adapter per task on the shipped base, compare held-out losses before and after,
    generate from both adapters and the base in one mixed batch, merge one adapter and check its
    logits, and write adapters, plots and a summary (JSON and markdown) to `output`.

    Returns the summary. `output` appears only when everything is written. Runs on one CPU thread:
    the model's matrices are too small to gain from more, and a busy machine makes more much slower.
    """
    from .outputs import check_output, staged_directory

    start = time.perf_counter()
    target = check_output(output, overwrite)
    say(f"roadkit demo{' (fast)' if fast else ''}: writing to {target}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with staged_directory(target) as stage:
            summary = _walk_through(stage, target, FAST if fast else FULL, say)
            summary.update(fast=fast, seconds=round(time.perf_counter() - start, 1))
            atomic_write_bytes(os.path.join(stage, "summary.json"), (json.dumps(summary, indent=2) + "\n").encode())
            atomic_write_bytes(os.path.join(stage, "summary.md"), _summary_markdown(summary).encode())
    finally:
        torch.set_num_threads(threads)
    say(
        f"\nwrote {target}: summary.md, summary.json, loss_curves.png, angles_*.png, adapters/ (upper, reverse), "
        f"merged-upper/, base/ ({summary['seconds']:.0f} s)"
    )
    word = words("eval", 1)[0]
    say(
        f"try: roadkit generate --model {os.path.join(output, 'base')} "
        f"--adapter upper={os.path.join(output, 'adapters', 'upper')} "
        f"--adapter reverse={os.path.join(output, 'adapters', 'reverse')} "
        f"--prompt 'upper:{prompt_for(word)}' --prompt 'reverse:{prompt_for(word)}' --prompt 'base:{prompt_for(word)}'"
    )
    return summary


def _walk_through(stage: str, target: str, settings: DemoSettings, say: Callable[[str], None]) -> dict[str, Any]:
    """The demo's work, written into `stage`, which becomes `target` (the adapters name `target/base` as
    their base model, the copy of the shipped base written there)."""
    from .plots import loss_curves

    base, tokenizer = load_base()
    n_base = sum(p.numel() for p in base.parameters())
    say(
        f"base model: a {n_base:,d}-parameter Llama over characters, pretrained on named string operations "
        "('upper: kitten -> KITTEN'); with no operation named ('kitten ->') it copies."
    )
    shutil.copytree(BASE_DIR, os.path.join(stage, "base"))
    summary: dict[str, Any] = {
        "settings": settings.__dict__,
        "adapter_config": ADAPTER_CONFIG,
        "base_parameters": n_base,
        "tasks": {},
    }
    logs = {}
    for task in TASKS:
        summary["tasks"][task], logs[task] = _train_task(
            task, base, tokenizer, settings, stage, os.path.join(target, "base"), say
        )
    loss_curves(logs, os.path.join(stage, "loss_curves.png"), title="RoAd adapters on the demo tasks")
    summary.update(_mixed_batch(base, tokenizer, settings, stage, say))
    summary["merge"] = _merge_check(base, tokenizer, summary["generated"]["upper"], stage, say)
    return summary


def _train_task(
    task: str,
    base: Any,
    tokenizer: Any,
    settings: DemoSettings,
    stage: str,
    base_path: str,
    say: Callable[[str], None],
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Train, save and plot one task's adapter; returns its numbers and its training log."""
    from .report import inspect_adapter, plot_report
    from .runs import COMPLETED, DIVERGED, TrainConfig
    from .training import TrainingRun, write_run

    say(f"\ntask {task!r}: {prompt_for('kitten')!r} -> {' ' + TASKS[task]('kitten')!r}")
    model = get_peft_model(copy.deepcopy(base), RoadConfig(**ADAPTER_CONFIG, base_model_name_or_path=base_path))
    train, _ = tokenize_all(tokenizer, task_examples(task, "train", settings.train_rows), 64)
    held_out, _ = tokenize_all(tokenizer, task_examples(task, "eval", settings.eval_rows), 64)
    config = TrainConfig(
        lr=settings.lr, max_steps=settings.steps, batch_size=settings.batch_size, eval_every=max(1, settings.steps // 5)
    )
    trainer = TrainingRun(model, train, config, tokenizer, held_out)
    trainable = sum(p.numel() for p in trainer.params)
    say(
        f"  training {trainable:,d} RoAd parameters ({100 * trainable / sum(p.numel() for p in base.parameters()):.2f}"
        f"% of the base) for {settings.steps} steps of {settings.batch_size} rows"
    )
    start = time.perf_counter()
    status = trainer.fit()
    if status == DIVERGED:
        raise ValueError(f"training the {task!r} adapter diverged at step {trainer.diverged_at}: {trainer.divergence}.")
    if status != COMPLETED:
        raise KeyboardInterrupt  # Ctrl-C: the demo stops, and writes nothing
    seconds = time.perf_counter() - start
    run_dir = os.path.join(stage, "adapters", task)
    write_run(run_dir, model, trainer, "completed", {"demo_task": task, **ADAPTER_CONFIG})
    plot_report(
        inspect_adapter(run_dir),
        os.path.join(stage, f"angles_{task}.png"),
        title=f"adapter {task!r}: RoAd angles and scales",
    )
    before, after = trainer.log["eval"][0]["loss"], trainer.log["eval"][-1]["loss"]
    say(
        f"  held-out loss (mean per completion token, {len(held_out)} unseen words): {before:.3f} before -> "
        f"{after:.3f} after ({seconds:.0f} s)"
    )
    numbers = {
        "eval_loss_before": before,
        "eval_loss_after": after,
        "trainable_parameters": trainable,
        "steps": settings.steps,
        "train_seconds": round(seconds, 1),
    }
    return numbers, trainer.log


def _mixed_batch(
    base: Any, tokenizer: Any, settings: DemoSettings, stage: str, say: Callable[[str], None]
) -> dict[str, Any]:
    """Both saved adapters and the base over every held-out word, in one `generate` call."""
    from .generation import generate

    served = RoadModel.from_pretrained(copy.deepcopy(base), os.path.join(stage, "adapters", "upper"), "upper")
    served.load_adapter(os.path.join(stage, "adapters", "reverse"), "reverse")
    eval_words, names = words("eval", settings.eval_rows), ["base", *TASKS]
    rows = [(name, w) for w in eval_words for name in names]
    outputs = generate(served, tokenizer, [prompt_for(w) for _, w in rows], [n for n, _ in rows], max_new_tokens=12)
    generated = {name: [out for (n, _), out in zip(rows, outputs, strict=True) if n == name] for name in names}
    exact = {
        task: {
            name: sum(out.strip() == TASKS[task](w) for out, w in zip(generated[name], eval_words, strict=True))
            / len(eval_words)
            for name in ("base", task)
        }
        for task in TASKS
    }
    shown = [
        {"prompt": prompt_for(w), **{n: generated[n][i] for n in names}}
        for i, w in enumerate(eval_words[: settings.shown_words])
    ]
    say(f"\none generate() call, {len(rows)} rows: each held-out word with the base, 'upper' and 'reverse'")
    say(_markdown_table(["prompt", *names], [[r["prompt"], *(r[n] for n in names)] for r in shown]))
    for task, scores in exact.items():
        say(
            f"  exact match on {len(eval_words)} held-out words, task {task!r}: base {scores['base']:.0%}, "
            f"adapter {scores[task]:.0%}"
        )
    return {"mixed_batch": shown, "exact_match": exact, "generated": generated}


def _merge_check(
    base: Any, tokenizer: Any, adapter_outputs: list[str], stage: str, say: Callable[[str], None]
) -> dict[str, Any]:
    """Merge the 'upper' adapter into a copy of the base; compare logits and generations."""
    from .export import merge_adapter, save_merged
    from .generation import generate

    merged, difference = merge_adapter(copy.deepcopy(base), os.path.join(stage, "adapters", "upper"))
    save_merged(merged, tokenizer, os.path.join(stage, "merged-upper"))
    prompts = [prompt_for(w) for w in words("eval", len(adapter_outputs))]
    same = generate(merged, tokenizer, prompts, None, max_new_tokens=12) == adapter_outputs
    say(
        f"\nmerged 'upper' into the base weights (merged-upper/): largest logit difference from base + adapter "
        f"{difference:.2g}; same generations on the held-out words: {'yes' if same else 'no'}"
    )
    return {"adapter": "upper", "max_abs_logit_difference": difference, "same_generations": same}


def _markdown_table(header: list[str], rows: list[list[str]]) -> str:
    cells = [header, *[[repr(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _summary_markdown(summary: dict[str, Any]) -> str:
    names = ["base", *TASKS]
    task_rows = [
        [
            t,
            f"{r['eval_loss_before']:.3f}",
            f"{r['eval_loss_after']:.3f}",
            f"{summary['exact_match'][t]['base']:.0%}",
            f"{summary['exact_match'][t][t]:.0%}",
            f"{r['trainable_parameters']:,d}",
            str(r["steps"]),
            f"{r['train_seconds']:.0f}",
        ]
        for t, r in summary["tasks"].items()
    ]
    merge = summary["merge"]
    return "\n".join(
        [
            "# roadkit demo" + (" (fast)" if summary["fast"] else ""),
            "",
            f"Base: a {summary['base_parameters']:,d}-parameter character-level Llama (`base/`), pretrained on named "
            "string operations (`upper: kitten -> KITTEN`); with no operation named (`kitten ->`) it copies. One RoAd "
            f"adapter per task ({', '.join(f'{k}={v}' for k, v in summary['adapter_config'].items())}), trained on the "
            "unnamed format; held-out words are never trained on.",
            "",
            "| task | held-out loss before | after | exact match, base | exact match, adapter | parameters | steps "
            "| seconds |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
            *["| " + " | ".join(r) + " |" for r in task_rows],
            "",
            "One mixed batch (one `generate` call, one adapter per row):",
            "",
            _markdown_table(
                ["prompt", *names], [[r["prompt"], *(r[n] for n in names)] for r in summary["mixed_batch"]]
            ),
            "",
            f"Merged `{merge['adapter']}` into the base weights (`merged-{merge['adapter']}/`): largest logit "
            f"difference {merge['max_abs_logit_difference']:.2g}; "
            f"same generations: {'yes' if merge['same_generations'] else 'no'}.",
            "",
            f"Total time: {summary['seconds']:.0f} s. Plots: `loss_curves.png`, `angles_*.png`.",
            "",
        ]
    )
