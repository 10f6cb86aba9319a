"""Interleaved timing: every repetition runs every case once, in an order that rotates between
repetitions, so slow drift of the machine (thermal, background load) hits all cases alike."""

from __future__ import annotations

import gc
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

# A case is a zero-argument callable. It returns None (the runner times the whole call) or a dict
# {metric: seconds} when it times its own phases (e.g. merge and unmerge separately).
Case = Callable[[], dict | None]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _timed(fn: Case) -> dict:
    gc_was = gc.isenabled()
    gc.disable()
    try:
        t0 = time.perf_counter()
        out = fn()
        dt = time.perf_counter() - t0
    finally:
        if gc_was:
            gc.enable()
    return out if isinstance(out, dict) else {"seconds": dt}


def run_interleaved(
    cases: dict[str, Case],
    reps: int,
    warmup: int,
    label: str = "",
    warm_cases: dict[str, Case] | None = None,
    after_warmup: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Warm up every case `warmup` times (with `warm_cases[name]` when given, e.g. a shorter
    generate through the same code paths), call `after_warmup`, then `reps` rounds of every case
    once, rotating the order.

    Returns {"times": {case: {metric: [seconds per rep]}}, "orders": [[case, ...] per rep]}.
    """
    names = list(cases)
    warm_cases = warm_cases or {}
    for w in range(warmup):
        for n in names:
            _timed(warm_cases.get(n, cases[n]))
        log(f"{label}: warmup {w + 1}/{warmup} done")
    if after_warmup is not None:
        after_warmup()
    times: dict[str, dict[str, list[float]]] = {n: {} for n in names}
    orders = []
    for r in range(reps):
        shift = r % len(names)
        order = names[shift:] + names[:shift]
        gc.collect()
        for n in order:
            for metric, sec in _timed(cases[n]).items():
                times[n].setdefault(metric, []).append(sec)
        orders.append(order)
        log(f"{label}: rep {r + 1}/{reps} done")
    return {"times": times, "orders": orders}


def summarize(xs: list[float]) -> dict:
    """Median and spread (min, max, quartiles) of one case's repetitions."""
    s = sorted(xs)
    if len(s) >= 2:
        q1, _, q3 = statistics.quantiles(s, n=4, method="inclusive")
    else:
        q1 = q3 = s[0]
    return {"n": len(s), "median": statistics.median(s), "min": s[0], "max": s[-1], "q1": q1, "q3": q3}


def ratio_stats(xs: list[float], base: list[float]) -> dict:
    """Ratio to the base case of the same run: of the medians, and per repetition (paired)."""
    paired = sorted(x / b for x, b in zip(xs, base, strict=True))
    st = summarize(paired)
    return {
        "of_medians": statistics.median(xs) / statistics.median(base),
        "paired_median": st["median"],
        "paired_min": st["min"],
        "paired_max": st["max"],
        "paired_q1": st["q1"],
        "paired_q3": st["q3"],
    }
