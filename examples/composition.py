"""Composability experiment: two RoAd adapters trained in disjoint subspaces, joined without training.

On the demo's base model (a small character-level Llama shipped with roadkit):

* adapter A learns task 1 ("kitten ->" -> " KITTEN") in shard 0 of 2 of every layer's rotation pairs;
* adapter B learns task 2 ("<- kitten ->" -> " nettik") in shard 1 of 2;
* `roadkit.compose(model, ["A", "B"], "union", mode="union")` joins them, no training;
* a "joint" adapter (all pairs) trains on both tasks at once, as the reference a user would otherwise train.

With `--replay N`, each adapter also trains on up to N rows of the base model's own pretraining text
(rehearsal), minus rows of the same form as its own task's prompts, so it learns to leave other
inputs alone. With `--cross N`, each adapter also trains on N prompts of the other task, completed as
the base model completes them: it learns to leave the other adapter's inputs alone, which is what
lets their union answer both.

It reports, on both tasks, held-out loss (mean per completion token) and the share of held-out prompts
answered right (greedy) for base, A, B, union and joint, and the share of A's improvement on task 1 (and
of B's on task 2) that the union keeps.

    python examples/composition.py [--fast] [--steps N] [--lr LR] [--replay N] [--cross N] [--variant V]
                                   [--output composition.json] [--save-adapters DIR]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from typing import Callable

import torch

from roadkit import RoadConfig, compose, get_peft_model
from roadkit.app.data import Example, tokenize_all
from roadkit.app.demo import TASKS, load_base, pretraining_examples, words
from roadkit.app.generation import generate
from roadkit.app.runs import TrainConfig
from roadkit.app.training import TrainingRun

PROMPTS: dict[str, Callable[[str], str]] = {"upper": lambda w: f"{w} ->", "reverse": lambda w: f"<- {w} ->"}
ADAPTER = {"variant": "road_1", "group_size": 64, "target_modules": "all-linear"}
SETTINGS = {  # steps, batch size, learning rate, train words, held-out words, replay rows
    "full": {"steps": 300, "batch_size": 32, "lr": 5e-3, "train": 4000, "eval": 128, "replay": 0, "cross": 0},
    "fast": {"steps": 30, "batch_size": 16, "lr": 1e-2, "train": 480, "eval": 32, "replay": 0, "cross": 0},
}


def examples(task: str, split: str, count: int) -> list[Example]:
    """Prompt/completion rows of `task`, on words of `split`, with the task's own prompt form."""
    return [Example(PROMPTS[task](w), f" {TASKS[task](w)}", i + 1) for i, w in enumerate(words(split, count))]


def replay(count: int, own: list[str]) -> list[Example]:
    """Pretraining rows for rehearsal, without the unnamed rows shaped like the `own` tasks' prompts."""
    markers = tuple(PROMPTS[t]("").strip() for t in own)
    return [ex for ex in pretraining_examples(count, seed=1) if not ex.completion.partition(" ")[2].startswith(markers)]


def base_answers(base: torch.nn.Module, tokenizer: object, task: str, count: int) -> list[Example]:
    """`count` prompts of `task` on training words, each completed with the base model's greedy answer."""
    prompts = [PROMPTS[task](w) for w in words("train", count, seed=1)]
    answers = [
        a for i in range(0, count, 256) for a in generate(base, tokenizer, prompts[i : i + 256], max_new_tokens=16)
    ]
    return [Example(p, a, i + 1) for i, (p, a) in enumerate(zip(prompts, answers, strict=True))]


def run(s: dict = SETTINGS["full"], say: Callable[[str], None] = print, save_adapters: str | None = None) -> dict:
    """Train A, B and joint with settings `s` (see SETTINGS); compose union(A, B); return held-out
    losses of every model on both tasks. With `save_adapters`, A and B are saved there (DIR/A, DIR/B):
    an adapter store for `scripts/serve_compose_demo.sh`."""
    torch.manual_seed(0)
    base, tokenizer = load_base()
    data = {
        task: {split: tokenize_all(tokenizer, examples(task, split, s[split]), 64)[0] for split in ("train", "eval")}
        for task in PROMPTS
    }
    task1, task2 = PROMPTS
    for task, other in ((task1, task2), (task2, task1)):
        cross = base_answers(base, tokenizer, other, s["cross"]) if s.get("cross") else []
        data[task]["cross"] = tokenize_all(tokenizer, cross, 64)[0] if cross else []
    if s["replay"]:
        for task, own in ((task1, [task1]), (task2, [task2]), ("both", [task1, task2])):
            data.setdefault(task, {})["replay"] = tokenize_all(tokenizer, replay(s["replay"], own), 64)[0]
    else:
        for task in (task1, task2, "both"):
            data.setdefault(task, {})["replay"] = []
    adapter = {**ADAPTER, "variant": s.get("variant", ADAPTER["variant"])}
    model = get_peft_model(copy.deepcopy(base), RoadConfig(**adapter, subspace="0/2"), "A")
    model.add_adapter("B", RoadConfig(**adapter, subspace="1/2"))
    model.add_adapter("joint", RoadConfig(**adapter))
    runs = {
        "A": data[task1]["train"] + data[task1]["replay"] + data[task1]["cross"],
        "B": data[task2]["train"] + data[task2]["replay"] + data[task2]["cross"],
        "joint": data[task1]["train"] + data[task2]["train"] + data["both"]["replay"],
    }
    config = TrainConfig(lr=s["lr"], max_steps=s["steps"], batch_size=s["batch_size"])
    trainable = {}
    for name, train in runs.items():
        model.set_adapter(name)
        trainer = TrainingRun(model, train, config, tokenizer)
        trainable[name] = sum(p.numel() for p in trainer.params)
        start = time.perf_counter()
        trainer.fit(progress=False)
        say(
            f"trained {name} ({trainable[name]:,d} parameters, {s['steps']} steps) in "
            f"{time.perf_counter() - start:.0f} s"
        )
    compose(model, ["A", "B"], "union", mode="union")
    if save_adapters:
        model.save_pretrained(save_adapters, selected_adapters=["A", "B"])
        say(f"saved A and B in {save_adapters}")

    evaluator = TrainingRun(model, runs["A"], config, tokenizer)
    losses: dict[str, dict[str, float]] = {}
    with model.disable_adapter():
        losses["base"] = {t: evaluator.evaluate(data[t]["eval"]) for t in PROMPTS}
    for name in ("A", "B", "union", "joint"):
        model.set_adapter(name)
        losses[name] = {t: evaluator.evaluate(data[t]["eval"]) for t in PROMPTS}
    model.set_adapter(["A", "B"])  # disjoint pairs commute: union == both active, exactly
    losses["A then B"] = {t: evaluator.evaluate(data[t]["eval"]) for t in PROMPTS}

    model.eval()
    held_out = words("eval", s["eval"])
    right: dict[str, dict[str, float]] = {}
    for name in ("base", "A", "B", "union", "joint"):
        right[name] = {t: _share_right(model, tokenizer, name, t, held_out) for t in PROMPTS}

    kept = {task1: _kept(losses, "A", task1), task2: _kept(losses, "B", task2)}
    return {
        "settings": s,
        "adapter": adapter,
        "trainable_parameters": trainable,
        "losses": losses,
        "right": right,
        "union_keeps": kept,
        "goal_met": all(v >= 0.9 for v in kept.values()),
    }


def _share_right(model: torch.nn.Module, tokenizer: object, name: str, task: str, held_out: list[str]) -> float:
    """The share of held-out prompts of `task` whose greedy answer under adapter `name` ("base": none)
    starts with the right one."""
    prompts = [PROMPTS[task](w) for w in held_out]
    wanted = [f" {TASKS[task](w)}" for w in held_out]
    texts = generate(model, tokenizer, prompts, adapter_names=[name] * len(prompts), max_new_tokens=16)
    return sum(t.startswith(w) for t, w in zip(texts, wanted, strict=True)) / len(held_out)


def _kept(losses: dict[str, dict[str, float]], single: str, task: str) -> float:
    """The union's improvement over base on `task`, as a share of the single adapter's."""
    gain = losses["base"][task] - losses[single][task]
    return (losses["base"][task] - losses["union"][task]) / gain if gain else float("nan")


def markdown(result: dict) -> str:
    """The result as the table README quotes."""
    tasks = list(PROMPTS)
    header = " | ".join(f"{t} loss" for t in tasks) + " | " + " | ".join(f"{t} right" for t in tasks)
    lines = [f"| model | {header} |", "|---|" + "---|" * 2 * len(tasks)]
    for name, row in result["losses"].items():
        right = result["right"].get(name)
        answers = " | ".join(f"{right[t]:.0%}" if right else "" for t in tasks)
        lines.append(f"| {name} | " + " | ".join(f"{row[t]:.3f}" for t in tasks) + f" | {answers} |")
    kept = ", ".join(f"{t}: {v:.0%}" for t, v in result["union_keeps"].items())
    return "\n".join(lines) + f"\n\nunion keeps of the single adapters' improvement: {kept}\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fast", action="store_true", help="a reduced run (for tests)")
    parser.add_argument("--replay", type=int, default=0, metavar="N", help="rehearse up to N pretraining rows")
    parser.add_argument(
        "--cross",
        type=int,
        default=0,
        metavar="N",
        help="train on N of the other task's prompts, answered as the base does",
    )
    parser.add_argument("--steps", type=int, help="training steps per adapter (default: 300, or 30 with --fast)")
    parser.add_argument("--lr", type=float, help="peak learning rate (default: 5e-3, or 1e-2 with --fast)")
    parser.add_argument(
        "--variant", choices=["road_1", "road_2", "road_4"], default="road_1", help="RoAd variant (default road_1)"
    )
    parser.add_argument("--output", help="write the result as JSON here")
    parser.add_argument("--save-adapters", metavar="DIR", help="save adapters A and B in DIR/A and DIR/B")
    args = parser.parse_args(argv)
    settings = {
        **SETTINGS["fast" if args.fast else "full"],
        "replay": args.replay,
        "cross": args.cross,
        "variant": args.variant,
    }
    steps = {"steps": args.steps or settings["steps"], "lr": args.lr or settings["lr"]}
    result = run({**settings, **steps}, save_adapters=args.save_adapters)
    print(markdown(result))
    if args.output:
        with open(args.output, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
