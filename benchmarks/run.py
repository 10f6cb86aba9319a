"""Entry point: ``python -m benchmarks.run [--quick | --gpu] [--scenarios a,b,...] [--reps N] [--dtype D]
[--threads N] [--baseline LABEL=SRC] [--keep-going] [--out DIR]``; scenarios: decode, step, prefill, compiled,
train, merge, kernels, overhead, run in the order given. The results are rewritten after every scenario, so a
run cut short keeps what it finished. See benchmarks/README.md."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import platform
import sys
import time
import traceback

SCENARIOS = ("decode", "step", "prefill", "compiled", "train", "merge", "kernels", "overhead")
LM_SCENARIOS = ("decode", "step", "prefill", "compiled")  # these share one set of models


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__)
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="small model and few reps: a smoke run (< 1 minute)")
    size.add_argument(
        "--gpu", action="store_true", help="on CUDA: a ~1.2B-parameter Llama in bfloat16, 256 MiB kernel tensors"
    )
    p.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        help=f"comma-separated subset of {','.join(SCENARIOS)}, run in this order (default: all)",
    )
    p.add_argument("--reps", type=int, default=None, help="timed repetitions per case (default: 5, quick: 3)")
    p.add_argument("--warmup", type=int, default=None, help="warmup rounds before timing (default: 1)")
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default=None,
        help="dtype of the decode/step/prefill model and the kernels tensors (default: float32; --gpu: bfloat16)",
    )
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default: 2)")
    p.add_argument(
        "--omp-wait-policy",
        choices=["default", "passive", "active"],
        default="default",
        help="OpenMP wait policy; 'passive' for machines shared with other busy processes",
    )
    p.add_argument(
        "--baseline",
        action="append",
        default=[],
        metavar="LABEL=SRC",
        help="another roadkit source tree (a checkout's src/ directory, e.g. an older commit's git worktree) "
        "timed beside this one in the overhead scenario; repeatable",
    )
    p.add_argument(
        "--keep-going",
        action="store_true",
        help="a scenario that fails is recorded (its error in the results) and the next one runs; "
        "the exit status is 1 if any failed",
    )
    p.add_argument(
        "--out", default=None, help="output folder (default: benchmarks/results, quick: benchmarks/results/quick)"
    )
    args = p.parse_args(argv)
    args.scenarios = [x.strip() for x in args.scenarios.split(",") if x.strip()]
    bad = [x for x in args.scenarios if x not in SCENARIOS]
    if bad or not args.scenarios:
        p.error(f"unknown scenario(s) {bad}; choose from {', '.join(SCENARIOS)}")
    repeated = sorted({x for x in args.scenarios if args.scenarios.count(x) > 1})
    if repeated:
        p.error(f"scenario(s) named twice: {', '.join(repeated)}")
    if args.reps is not None and args.reps < 1:
        p.error("--reps must be >= 1")
    if args.threads < 1:
        p.error("--threads must be >= 1")
    baselines = {}
    for item in args.baseline:
        label, sep, src = item.partition("=")
        if not sep or not label or not src:
            p.error(f"--baseline takes LABEL=SRC (e.g. old=../old/src), got {item!r}")
        if not os.path.isfile(os.path.join(src, "roadkit", "__init__.py")):
            p.error(f"--baseline {item}: {src} holds no roadkit/__init__.py (give a checkout's src/ directory)")
        baselines[label] = os.path.abspath(src)
    args.baselines = baselines
    return args


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _gpu_info(torch) -> dict:
    props = torch.cuda.get_device_properties(0)
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "name": props.name,
        "memory_gib": round(props.total_memory / 2**30, 1),
        "cuda": torch.version.cuda,
        "triton": triton_version,
    }


def _loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def _cpu_pressure() -> str:
    """Linux PSI line for CPU ("some avg10=..."): how often runnable tasks waited for a core."""
    try:
        with open("/proc/pressure/cpu") as f:
            return f.readline().strip()
    except OSError:
        return "n/a"


def _set_omp_wait_policy(policy: str) -> bool:
    """Apply --omp-wait-policy (must run before torch is imported); True if this set the variable.

    "default" leaves OpenMP as it is (what users run). On a machine shared with other busy
    processes, spinning OpenMP threads stall on descheduled peers (the same generate call took
    10-50x longer and varied wildly on the 2-core machine this suite was written on): "passive"
    makes waiting threads sleep, at the price of a wake-up per parallel op.
    """
    if policy == "default" or "OMP_WAIT_POLICY" in os.environ or "torch" in sys.modules:
        return False
    os.environ["OMP_WAIT_POLICY"] = policy.upper()
    return True


def main(argv=None) -> int:
    args = parse_args(argv)
    omp_set_here = _set_omp_wait_policy(args.omp_wait_policy)
    t_start = time.perf_counter()
    load_start = _loadavg()
    psi_start = _cpu_pressure()

    import peft
    import torch
    import transformers

    import roadkit

    from . import report, scenarios
    from .settings import FULL, GPU, QUICK
    from .timing import log

    settings = QUICK if args.quick else GPU if args.gpu else FULL
    if args.dtype is not None:
        settings = dataclasses.replace(settings, dtype=args.dtype)
    if args.baselines:
        settings = dataclasses.replace(settings, baselines=args.baselines)
    reps = args.reps if args.reps is not None else settings.reps
    warmup = args.warmup if args.warmup is not None else settings.warmup
    sub = [settings.name] if settings.name != FULL.name else []
    out_dir = args.out or os.path.join("benchmarks", "results", *sub)
    torch.set_num_threads(args.threads)
    if settings.device == "cuda" and not torch.cuda.is_available():
        print("error: --gpu needs a CUDA device, and torch.cuda.is_available() is False here.", file=sys.stderr)
        return 2

    results = {
        "meta": {
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": " ".join(["python -m benchmarks.run", *(sys.argv[1:] if argv is None else argv)]),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "roadkit": getattr(roadkit, "__version__", "?"),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpu": _cpu_name(),
            "cpu_count": os.cpu_count(),
            "device": settings.device,
            "dtype": settings.dtype,
            "gpu": _gpu_info(torch) if settings.device == "cuda" else None,
            "threads": torch.get_num_threads(),
            "reps": reps,
            "warmup": warmup,
            "scenarios": args.scenarios,
            "settings": dataclasses.asdict(settings),
            "loadavg_start": load_start,
            "cpu_pressure_start": psi_start,
            "env": {
                k: os.environ.get(k)
                for k in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
                if os.environ.get(k) is not None
            },
            "omp_wait_policy_set_by_harness": omp_set_here,
        },
        "scenarios": {},
    }

    last_lm = next((x for x in reversed(args.scenarios) if x in LM_SCENARIOS), None)
    failed = []
    for name in args.scenarios:
        log(f"=== {name} ({settings.name}, reps {reps}, warmup {warmup}, threads {torch.get_num_threads()}) ===")
        t0 = time.perf_counter()
        try:
            results["scenarios"][name] = getattr(scenarios, name)(settings, reps, warmup)
        except KeyboardInterrupt:  # e.g. `timeout --signal=INT`: what finished is already written
            log(
                f"=== interrupted during {name}; the results of {list(results['scenarios']) or 'no scenario'} "
                f"are in {out_dir} ==="
            )
            return 130
        except Exception as exc:
            if not args.keep_going:
                raise
            failed.append(name)
            results["scenarios"][name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        results["scenarios"][name]["seconds"] = seconds = time.perf_counter() - t0
        log(
            f"=== {name} FAILED after {seconds:.0f} s: {results['scenarios'][name]['error']} ==="
            if name in failed
            else f"=== {name} done in {seconds:.0f} s ==="
        )
        if name == last_lm:
            scenarios.release()  # the models the LM scenarios share are no longer needed
        done = len(results["scenarios"]) == len(args.scenarios)
        paths = _write(results, out_dir, t_start, complete=done)

    print(report.markdown(results))
    log(
        f"wrote {', '.join(paths)}; total {results['meta']['total_seconds']:.0f} s"
        + (f"; failed: {', '.join(failed)}" if failed else "")
    )
    return 1 if failed else 0


def _write(results: dict, out_dir: str, t_start: float, complete: bool) -> list[str]:
    """Write the results so far (every file replaced atomically), stamped with the time and load now."""
    from . import report

    results["meta"]["complete"] = complete
    results["meta"]["scenarios_done"] = list(results["scenarios"])
    results["meta"]["loadavg_end"] = _loadavg()
    results["meta"]["cpu_pressure_end"] = _cpu_pressure()
    results["meta"]["total_seconds"] = time.perf_counter() - t_start
    return report.write_all(results, out_dir)


if __name__ == "__main__":
    sys.exit(main())
