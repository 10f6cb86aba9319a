"""Rebuild the demo's base model (src/roadkit/app/demo_base/) from scratch: deterministic, offline, CPU.

    python scripts/build_demo_base.py [--steps 3000] [--output src/roadkit/app/demo_base]

A small Llama over characters (`roadkit.app.demo.build_model`) is pretrained on
`roadkit.app.demo.pretraining_examples`: named string operations ("upper: kitten -> KITTEN") and
unnamed copies ("kitten -> kitten"). It takes about 15 minutes on 2 CPU cores. The script prints
the exact-match rate of each operation on held-out words at the end.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from roadkit.app.data import tokenize_all
from roadkit.app.demo import BASE_DIR, SKILLS, build_model, build_tokenizer, pretraining_examples, prompt_for, words
from roadkit.app.generation import generate
from roadkit.app.outputs import check_output, staged_directory
from roadkit.app.runs import TrainConfig
from roadkit.app.training import TrainingRun


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--output", default=BASE_DIR)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args()
    check_output(args.output, args.overwrite)
    torch.set_num_threads(1)  # tiny matrices: one thread is as fast, and far faster on a busy machine
    tokenizer = build_tokenizer()
    model = build_model(tokenizer)
    samples, _ = tokenize_all(tokenizer, pretraining_examples(args.steps * 64 // 4), max_length=64)
    config = TrainConfig(lr=3e-3, max_steps=args.steps, batch_size=64, warmup_steps=100, weight_decay=0.01)
    TrainingRun(model, samples, config, tokenizer).fit()
    model.eval()
    held_out = words("eval", 64)
    for name, operation in [("", SKILLS["copy"]), *SKILLS.items()]:
        prompts = [f"{name}: {prompt_for(w)}" if name else prompt_for(w) for w in held_out]
        outputs = generate(model, tokenizer, prompts, None, max_new_tokens=12)
        score = sum(o.strip() == operation(w) for o, w in zip(outputs, held_out, strict=True)) / len(held_out)
        print(f"{name or '(unnamed)'}: exact match {score:.0%} on {len(held_out)} held-out words")
    with staged_directory(args.output) as stage:
        model.save_pretrained(stage)
        tokenizer.save_pretrained(stage)
    print(f"wrote {os.path.abspath(args.output)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
