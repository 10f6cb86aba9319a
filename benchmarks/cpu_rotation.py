"""The CPU serving rotation against its floor: roadkit's C kernel, the torch path it replaces, and a copy.

``python -m benchmarks.cpu_rotation [--reps N] [--out DIR]``: one vLLM layer's output of n tokens x d features,
each token rotated by its adapter's row of a slot table (`SlotTable.forward`). The floor is one read and one
write of that output at memory bandwidth, measured as a plain copy of the same tensor (`x.clone()`). Cases are
interleaved; medians over repetitions and ratios to the copy. Writes cpu_rotation.{json,md} to
benchmarks/results (or DIR).
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from typing import Any

import torch

from roadkit.integrations.vllm.slots import SlotTable
from roadkit.kernels import c_ops, torch_ops

from .report import _write_text, write_json
from .run import _cpu_name, _loadavg
from .timing import log, ratio_stats, run_interleaved, summarize

# (tokens, features, distinct adapters): a decode step of 64 and 256 requests at a TinyLlama-wide layer's
# output (2048: q, o, down; 11264: gate and up together), and a 2048-token prefill of one adapter.
SHAPES = ((64, 2048, 64), (64, 11264, 64), (256, 11264, 256), (64, 11264, 1), (2048, 2048, 1))
DTYPES = (torch.bfloat16, torch.float32)
GROUP_SIZE = 64


def table(k: int, d: int, dtype: torch.dtype) -> SlotTable:
    out = SlotTable(k, d, serving_dtype=dtype)
    gen = torch.Generator().manual_seed(k)
    for slot in range(k):
        theta, alpha = 0.1 * torch.randn(d, generator=gen), 1 + 0.1 * torch.randn(d, generator=gen)
        out.set(slot, alpha * theta.cos(), alpha * theta.sin(), GROUP_SIZE)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.cpu_rotation", description=__doc__)
    p.add_argument("--reps", type=int, default=200, help="timed repetitions per case (default 200)")
    p.add_argument("--out", default=os.path.join("benchmarks", "results"), help="output folder")
    args = p.parse_args(argv)
    c_ops.library()  # fail here, with the reason, if the C kernel cannot be built
    rows: list[dict[str, Any]] = []
    for dtype in DTYPES:
        for n, d, k in SHAPES:
            slots = table(k, d, dtype)
            x = torch.randn(n, d).to(dtype)
            index = torch.arange(n) % k
            runs = None if k > 1 else [(0, 0, n)]  # one adapter: the torch path's run-by-run fast case
            cases = {
                "copy": lambda x=x: x.clone(),
                "C kernel": lambda x=x, s=slots, i=index: c_ops.forward_slots(x, s, i),
                "torch path": lambda x=x, s=slots, i=index, r=runs: torch_ops.forward_slots(x, s, i, r),
            }
            label = f"{str(dtype).removeprefix('torch.')} n={n} d={d} k={k}"
            times = run_interleaved(cases, reps=args.reps, warmup=5, label=label)["times"]
            secs = {name: t["seconds"] for name, t in times.items()}
            rows.append(
                {
                    "dtype": str(dtype).removeprefix("torch."),
                    "tokens": n,
                    "features": d,
                    "adapters": k,
                    "median_us": {name: summarize(v)["median"] * 1e6 for name, v in secs.items()},
                    "vs_copy": {name: ratio_stats(v, secs["copy"])["of_medians"] for name, v in secs.items()},
                }
            )
    meta = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join(["python -m benchmarks.cpu_rotation", *(sys.argv[1:] if argv is None else argv)]),
        "cpu": _cpu_name(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "loadavg_end": _loadavg(),
    }
    lines = [
        "# CPU serving rotation vs a copy of the same tensor",
        "",
        f"- date: {meta['date']}, run: `{meta['command']}`; {meta['cpu']}, torch {meta['torch']} with "
        f"{meta['threads']} threads (the C kernel splits large calls' rows over them), load average at end "
        f"{meta['loadavg_end']}",
        f"- n tokens x d features, token t rotated by adapter t mod k (road_1, group size {GROUP_SIZE}); "
        "interleaved cases, medians of the repetitions",
        "",
        "| dtype | n x d, adapters | copy (us) | C kernel (us) | × copy | torch path (us) | × copy |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        us, ratio = r["median_us"], r["vs_copy"]
        lines.append(
            f"| {r['dtype']} | {r['tokens']} x {r['features']}, {r['adapters']} | {us['copy']:.1f} | "
            f"{us['C kernel']:.1f} | **{ratio['C kernel']:.2f}** | {us['torch path']:.1f} | {ratio['torch path']:.2f} |"
        )
    os.makedirs(args.out, exist_ok=True)
    write_json({"meta": meta, "rows": rows}, os.path.join(args.out, "cpu_rotation.json"))
    _write_text(os.path.join(args.out, "cpu_rotation.md"), "\n".join(lines) + "\n")
    print("\n".join(lines))
    log(f"wrote {args.out}/cpu_rotation.{{json,md}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
