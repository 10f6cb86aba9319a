"""roadkit against PEFT's RoAd under TRL's `SFTTrainer`: the same losses and adapter, and what a step costs.

    python -m benchmarks.trl_parity [--quick] [--rounds N] [--steps N] [--threads N] [--out DIR]
    python -m benchmarks.trl_parity --render benchmarks/results/trl_parity.json    # the markdown again

Both contenders fine-tune the same base, a Llama built from a transformers config (random weights, nothing
downloaded) with roadkit's character-level demo tokenizer, on the same generated prompt-completion rows (loss on the
completion), with the same `SFTConfig` (seed, AdamW, linear decay, batch, steps) and the same adapter (`road_1`,
group size 64, all seven projections):

* roadkit: `roadkit.road_trainer(SFTTrainer)(model=base, peft_config=roadkit.RoadConfig(...))`, which also checks
  the adapter after every step (`StopOnDivergence`, on by default);
* PEFT:    `SFTTrainer(model=base, peft_config=peft.RoadConfig(...))`.

One warmup run of each (2 steps, not recorded), then `rounds` rounds; every round trains each contender once from a
fresh copy of the base, in an order that alternates between rounds. Metrics: the loss at every step (the first
round's; every round checks that the losses agree), the largest difference between the two saved adapters
(`adapter_model.safetensors` after `save_model`, every round), the median time of a training step in each run
(wall clock from the Trainer's `on_step_begin` to `on_step_end`, first step left out), its median over rounds and the
ratio roadkit / PEFT taken inside each round, and the peak rise of the process's resident memory during `train()`
over its value before (after malloc_trim; sampled every 2 ms). Results go to `benchmarks/results/trl_parity.{json,md}`
(`--quick`: `benchmarks/results/quick/`). `peft` is imported here as the reference, never from `src/`.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any

from .contenders import build_llama
from .quality import PeakRss
from .settings import GROUP_SIZE, TARGET_MODULES, VARIANT, ModelSize
from .timing import log, summarize

CONTENDERS = ("roadkit", "peft")
WORDS = "north river stone apple quiet green window paper light seven cloud music table orange field".split()


@dataclass(frozen=True)
class Size:
    layers: int
    hidden: int
    intermediate: int
    heads: int
    steps: int
    batch: int
    rounds: int


FULL = Size(layers=4, hidden=256, intermediate=704, heads=4, steps=12, batch=8, rounds=5)
QUICK = Size(layers=2, hidden=128, intermediate=256, heads=4, steps=6, batch=4, rounds=2)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.trl_parity", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="2-layer hidden-128 model, 6 steps, 2 rounds: a smoke run")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (default: 5, quick: 2)")
    p.add_argument("--steps", type=int, default=None, help="training steps per run (default: 12, quick: 6)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default: 2)")
    p.add_argument("--out", default=None, help="output folder (default: benchmarks/results, quick: .../quick)")
    p.add_argument("--render", metavar="JSON", help="write the markdown of a results file again, and nothing else")
    return p.parse_args(argv)


def rows(count: int, seed: int = 0) -> list[dict[str, str]]:
    """Prompt-completion rows: reverse a list of 3 to 6 words."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        words = rng.sample(WORDS, rng.randint(3, 6))
        out.append({"prompt": f"Reverse: {' '.join(words)}\nAnswer:", "completion": " " + " ".join(words[::-1])})
    return out


def step_timer() -> Any:
    """A TrainerCallback that records the wall-clock seconds of every training step."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.seconds: list[float] = []
            self._start = 0.0

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self._start = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.seconds.append(time.perf_counter() - self._start)

    return StepTimer()


def train_once(contender: str, base: Any, tokenizer: Any, data: Any, steps: int, batch: int, out_dir: str) -> dict:
    """Train one contender from a copy of `base`; its losses, step times, memory rise and saved adapter."""
    import peft
    from safetensors.torch import load_file
    from trl import SFTConfig, SFTTrainer

    import roadkit

    args = SFTConfig(
        output_dir=out_dir,
        max_steps=steps,
        per_device_train_batch_size=batch,
        learning_rate=3e-3,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
    )
    settings = dict(variant=VARIANT, group_size=GROUP_SIZE, target_modules=TARGET_MODULES)
    timer = step_timer()
    kwargs = dict(args=args, train_dataset=data, processing_class=tokenizer, callbacks=[timer])
    if contender == "roadkit":
        trainer = roadkit.road_trainer(SFTTrainer)(
            model=copy.deepcopy(base), peft_config=roadkit.RoadConfig(**settings), **kwargs
        )
    else:
        trainer = SFTTrainer(model=copy.deepcopy(base), peft_config=peft.RoadConfig(**settings), **kwargs)
    with PeakRss() as memory:
        trainer.train()
    trainer.save_model(os.path.join(out_dir, "final"))
    return {
        "losses": [e["loss"] for e in trainer.state.log_history if "loss" in e],
        "step_seconds": timer.seconds,
        "peak_rss_rise_mib": memory.rise_mib,
        "adapter": load_file(os.path.join(out_dir, "final", "adapter_model.safetensors")),
    }


def max_difference(a: dict, b: dict) -> float:
    if set(a) != set(b):
        raise AssertionError(f"the saved adapters hold different tensors: {sorted(set(a) ^ set(b))[:4]}")
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def max_change(adapter: dict) -> float:
    """How far training moved the adapter from its identity start (angles 0, scales 1)."""
    return max(float((t - (0.0 if k.endswith("road_theta") else 1.0)).abs().max()) for k, t in adapter.items())


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def run(size: Size, threads: int, out_dir: str, command: str) -> dict[str, Any]:
    """Warm up, then the rounds; the results files are rewritten after every round (`complete` false until the
    last), so a run cut short keeps the rounds it finished."""
    import huggingface_hub.constants
    import peft
    import torch
    import transformers
    import trl
    from datasets import Dataset

    import roadkit
    from roadkit.app.demo import build_tokenizer

    huggingface_hub.constants.HF_HUB_DISABLE_TELEMETRY = True  # TRL's trainers report their use to the Hub
    torch.set_num_threads(threads)
    tokenizer = build_tokenizer()
    shape = ModelSize(size.layers, size.hidden, size.intermediate, size.heads, len(tokenizer))
    base = build_llama(shape, seed=0).train()
    data = Dataset.from_list(rows(size.steps * size.batch))
    results: dict[str, Any] = {
        "meta": {
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": command,
            "versions": {
                "roadkit": roadkit.__version__,
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "trl": trl.__version__,
                "peft": peft.__version__,
                "python": platform.python_version(),
            },
            "threads": threads,
            "cpu": cpu_name(),
            "loadavg_start": list(os.getloadavg()),
            "size": asdict(size),
            "adapter": {"variant": VARIANT, "group_size": GROUP_SIZE, "target_modules": TARGET_MODULES},
            "parameters": sum(p.numel() for p in base.parameters()),
        },
        "rounds": [],
    }
    with tempfile.TemporaryDirectory() as work:
        for contender in CONTENDERS:
            train_once(contender, base, tokenizer, data, 2, size.batch, os.path.join(work, f"warmup-{contender}"))
        log("warmup done")
        for r in range(size.rounds):
            order = CONTENDERS if r % 2 == 0 else CONTENDERS[::-1]
            runs = {
                c: train_once(c, base, tokenizer, data, size.steps, size.batch, os.path.join(work, f"{r}-{c}"))
                for c in order
            }
            record = {
                "order": list(order),
                "max_adapter_difference": max_difference(runs["roadkit"]["adapter"], runs["peft"]["adapter"]),
                "max_adapter_change": max_change(runs["peft"]["adapter"]),
                "max_loss_difference": max(
                    abs(a - b) for a, b in zip(runs["roadkit"]["losses"], runs["peft"]["losses"], strict=True)
                ),
            }
            for c in CONTENDERS:
                record[c] = {k: v for k, v in runs[c].items() if k != "adapter"}
                record[c]["median_step_seconds"] = statistics.median(runs[c]["step_seconds"][1:])
            results["rounds"].append(record)
            write(results, out_dir, complete=r + 1 == size.rounds)
            log(f"round {r + 1}/{size.rounds} done")
    return results


def write(results: dict[str, Any], out_dir: str, complete: bool) -> list[str]:
    """trl_parity.json and trl_parity.md in `out_dir`, each replaced atomically."""
    from roadkit.fileio import atomic_write_bytes

    results["meta"]["complete"] = complete
    results["meta"]["loadavg_end"] = list(os.getloadavg())
    results["summary"] = summary(results["rounds"])
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, "trl_parity.json"), os.path.join(out_dir, "trl_parity.md")]
    atomic_write_bytes(paths[0], (json.dumps(results, indent=1) + "\n").encode())
    atomic_write_bytes(paths[1], markdown(results).encode())
    return paths


def summary(rounds: list[dict]) -> dict[str, Any]:
    out: dict[str, Any] = {c: {} for c in CONTENDERS}
    for c in CONTENDERS:
        out[c]["step_seconds"] = summarize([r[c]["median_step_seconds"] for r in rounds])
        out[c]["peak_rss_rise_mib"] = summarize([r[c]["peak_rss_rise_mib"] for r in rounds])
    out["step_ratio"] = summarize(
        [r["roadkit"]["median_step_seconds"] / r["peft"]["median_step_seconds"] for r in rounds]
    )
    out["max_adapter_difference"] = max(r["max_adapter_difference"] for r in rounds)
    out["max_adapter_change"] = max(r["max_adapter_change"] for r in rounds)
    out["max_loss_difference"] = max(r["max_loss_difference"] for r in rounds)
    return out


def markdown(results: dict[str, Any]) -> str:
    meta, s, first = results["meta"], results["summary"], results["rounds"][0]
    size = meta["size"]
    versions = ", ".join(f"{k} {v}" for k, v in meta["versions"].items())
    lines = [
        "# roadkit vs PEFT RoAd under TRL's SFTTrainer",
        "",
        *([] if meta["complete"] else [f"Incomplete: {len(results['rounds'])} of {size['rounds']} rounds.", ""]),
        f"{meta['date']}, `{meta['command']}`; {versions}; {meta['threads']} thread(s) on "
        f"{meta['cpu']}, load average {meta['loadavg_start'][0]:.2f} at start, {meta['loadavg_end'][0]:.2f} at end.",
        f"Llama from a config: {size['layers']} layers, hidden {size['hidden']}, intermediate {size['intermediate']}, "
        f"{size['heads']} heads, {meta['parameters'] / 1e6:.1f}M parameters, float32, CPU; `{VARIANT}`, group size "
        f"{GROUP_SIZE}, all seven projections; batch {size['batch']}, {size['steps']} steps, lr 3e-3; "
        f"{size['rounds']} rounds, alternating order.",
        "",
        "| | roadkit | PEFT RoAd | roadkit / PEFT |",
        "|---|---:|---:|---:|",
    ]
    rk, pf, ratio = s["roadkit"], s["peft"], s["step_ratio"]
    lines.append(
        f"| training step, median of rounds (ms) | {rk['step_seconds']['median'] * 1e3:.1f} | "
        f"{pf['step_seconds']['median'] * 1e3:.1f} | {ratio['median']:.3f} [{ratio['min']:.3f} – {ratio['max']:.3f}] |"
    )
    lines.append(
        f"| peak RSS rise during train(), median (MiB) | {rk['peak_rss_rise_mib']['median']:.1f} | "
        f"{pf['peak_rss_rise_mib']['median']:.1f} | "
        f"{rk['peak_rss_rise_mib']['median'] / max(pf['peak_rss_rise_mib']['median'], 1e-9):.3f} |"
    )
    lines += [
        "",
        "The ratio column of the step is the median [min – max] over rounds of the ratio inside each round.",
        f"Largest difference between the saved adapters over all rounds: {s['max_adapter_difference']:.2e} "
        f"(training moved the adapter by up to {s['max_adapter_change']:.2e}); between the losses at any step: "
        f"{s['max_loss_difference']:.2e}. From identity adapters the first step agrees exactly; once the adapters "
        "move, the two implementations round differently (float32, different order of operations), and AdamW, "
        "which divides each update by the gradient's running scale, carries those differences on.",
        "",
        "Loss at every step (first round):",
        "",
        "| step | roadkit | PEFT RoAd | difference |",
        "|---:|---:|---:|---:|",
    ]
    for step, (a, b) in enumerate(zip(first["roadkit"]["losses"], first["peft"]["losses"], strict=True), start=1):
        lines.append(f"| {step} | {a:.6f} | {b:.6f} | {abs(a - b):.1e} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render:
        from roadkit.fileio import atomic_write_bytes

        with open(args.render) as f:
            text = markdown(json.load(f))
        atomic_write_bytes(os.path.splitext(args.render)[0] + ".md", text.encode())
        print(text)
        return 0
    size = QUICK if args.quick else FULL
    size = Size(
        **{**asdict(size), **{k: v for k, v in (("rounds", args.rounds), ("steps", args.steps)) if v is not None}}
    )
    out_dir = args.out or os.path.join("benchmarks", "results", *(["quick"] if args.quick else []))
    argv = sys.argv[1:] if argv is None else argv
    results = run(size, args.threads, out_dir, " ".join(["python -m benchmarks.trl_parity", *argv]))
    print(markdown(results))
    log(f"wrote trl_parity.json and trl_parity.md in {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
