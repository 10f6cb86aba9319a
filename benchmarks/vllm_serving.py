"""vLLM serving throughput: RoAd adapters (roadkit's vLLM plugin) vs vLLM's LoRA r=8 vs the base model.

``python -m benchmarks.vllm_serving [--quick] [--dtype D] [--rounds N] [--omp-wait-policy P] [--out DIR]``,
run with the Python that has vLLM and roadkit installed (the plugin loads through vLLM's
``vllm.general_plugins`` entry point). Every contender serves the same token prompts, greedily and to a fixed
number of output tokens, on engines built with the same settings; the contenders are interleaved over rounds.
Then the adapter memory of RoAd-only engines at several ``--max-loras``. One dtype per run (bfloat16 by
default, what people serve in); results go to ``vllm_serving_<dtype>.{json,md,png}``. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import gc
import itertools
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any

from .report import finish_figure
from .run import _cpu_name, _cpu_pressure, _loadavg, _set_omp_wait_policy
from .settings import GROUP_SIZE, LORA_ALPHA, LORA_RANK, VARIANT, ModelSize
from .settings import QUICK as DECODE_QUICK
from .timing import log, ratio_stats, run_interleaved, summarize

PLAIN = "base, engine without LoRA"
BASE = "base"
ROAD = "RoAd"
LORA = f"LoRA r={LORA_RANK}"
TARGET_VS_BASE = {"bfloat16": 0.97, "float32": 0.98}  # RoAd at 64 adapters: this share of the base's tokens/s
TARGET_VS_LORA = 2.0  # ... and at least this multiple of LoRA's tokens/s at the same adapter count
TARGET_FLAT = 0.97  # RoAd with the most adapters: at least this share of RoAd with one
BASENAME = "vllm_serving"


@dataclass(frozen=True)
class ServingSettings:
    """Workload and engine sizes of one run; every contender gets exactly these."""

    name: str
    model: ModelSize
    requests: int  # submitted at once, served max_num_seqs at a time
    prompt_len: int
    max_tokens: int  # every request generates exactly this many tokens (ignore_eos)
    max_num_seqs: int
    adapter_counts: tuple[int, ...]  # distinct adapters, spread round-robin over the requests
    rounds: int
    kv_cache_mib: int
    memory_slots: tuple[int, ...]  # --max-loras of the RoAd-only engines whose adapter memory is reported
    dtype: str = "bfloat16"
    warmup_max_tokens: int = 2  # the warmup round loads and activates every adapter, generating this much
    seed: int = 0


# A TinyLlama-wide model (hidden 2048, as wide as 2 CPU cores serve 256 requests in seconds), four layers
# deep: RoAd's cost per token grows with the width and a matmul's with its square, so the widest model
# that fits is the fairest stand-in for the models people serve. 256 requests, so that 256 distinct
# adapters share every decode step. 10 contenders x (warmup + 3 rounds).
SERVING_MODEL = ModelSize(layers=4, hidden=2048, intermediate=5632, heads=32, vocab=8192)
FULL = ServingSettings(
    name="full",
    model=SERVING_MODEL,
    requests=256,
    prompt_len=16,
    max_tokens=16,
    max_num_seqs=256,
    adapter_counts=(1, 16, 64, 256),
    rounds=3,
    kv_cache_mib=1024,
    memory_slots=(16, 64, 256),
)
QUICK = ServingSettings(
    name="quick",
    model=DECODE_QUICK.lm,
    requests=32,
    prompt_len=8,
    max_tokens=8,
    max_num_seqs=16,
    adapter_counts=(1, 4, 16),
    rounds=2,
    kv_cache_mib=64,
    memory_slots=(4, 16),
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.vllm_serving", description=__doc__)
    p.add_argument("--quick", action="store_true", help="small model and workload, 2 rounds: a smoke run (~1 min)")
    p.add_argument(
        "--dtype", choices=["bfloat16", "float32"], default="bfloat16", help="the engines' dtype (default bfloat16)"
    )
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (default: 3, quick: 2)")
    p.add_argument(
        "--omp-wait-policy",
        choices=["passive", "default", "active"],
        default="passive",
        help="OpenMP wait policy (default: passive, for a machine shared with other busy processes)",
    )
    p.add_argument(
        "--out", default=None, help="output folder (default: benchmarks/results, quick: benchmarks/results/quick)"
    )
    args = p.parse_args(argv)
    if args.rounds is not None and args.rounds < 1:
        p.error("--rounds must be >= 1")
    return args


# ---- adapters on disk ------------------------------------------------------------------------------


def write_checkpoints(settings: ServingSettings, root: str) -> dict[str, Any]:
    """Save the base model and max(adapter_counts) RoAd and LoRA adapters (PEFT layout) under `root`.

    Returns {"base": dir, ROAD: [dirs], LORA: [dirs]}. Adapters are non-identity (random RoAd angles
    and scales, random LoRA A and B), made by roadkit and PEFT and saved with their `save_pretrained`:
    one model per kind with one adapter, re-drawn from its own random init before each save (a model
    holding hundreds of adapters at once takes minutes to build).
    """
    import torch

    from . import contenders as C

    n = max(settings.adapter_counts)
    base = C.build_llama(settings.model, seed=settings.seed)
    paths: dict[str, Any] = {"base": os.path.join(root, "base")}
    base.save_pretrained(paths["base"])
    for label, sub, make in ((ROAD, "road", C.make_roadkit), (LORA, "lora", C.make_peft_lora)):
        model = make(base, 1)
        first = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
        paths[label] = []
        for i in range(n):
            generator = torch.Generator().manual_seed(settings.seed + i)
            with torch.no_grad():  # a fresh draw of the init's distribution: the first adapter's values, permuted
                for name, param in model.named_parameters():
                    if name in first:
                        flat = first[name].flatten()
                        param.copy_(flat[torch.randperm(flat.numel(), generator=generator)].view_as(param))
            folder = os.path.join(root, sub, C.adapter_name(i))
            model.save_pretrained(folder)
            paths[label].append(os.path.join(folder, C.adapter_name(0)))  # the adapter's own subfolder
    return paths


# ---- one contender ---------------------------------------------------------------------------------


class Workload:
    """The shared prompts served by one engine, request i with adapter i % k (or none)."""

    _ids = itertools.count()  # request ids, unique across engines and rounds

    def __init__(self, llm: Any, prompts: list[dict], adapters: list[Any]) -> None:
        self.llm, self.prompts = llm, prompts
        self.adapters = [adapters[i % len(adapters)] if adapters else None for i in range(len(prompts))]
        self.tokens: list[list[int]] = []  # each request's output tokens in the last call

    def run(self, params: Any) -> dict[str, float]:
        """Submit every request at once and step the engine until all finish.

        Returns the wall time ("seconds") and the mean over requests of submission-to-finish time
        ("latency"); raises if a request did not generate exactly `params.max_tokens` tokens.
        """
        engine = self.llm.llm_engine
        t0 = time.perf_counter()
        ids = [str(next(self._ids)) for _ in self.prompts]
        for rid, prompt, adapter in zip(ids, self.prompts, self.adapters, strict=True):
            engine.add_request(rid, prompt, params, lora_request=adapter)
        done: dict[str, tuple[float, list[int]]] = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = (time.perf_counter(), list(out.outputs[0].token_ids))
        wall = time.perf_counter() - t0
        self.tokens = [done[rid][1] for rid in ids]
        short = [len(t) for t in self.tokens if len(t) != params.max_tokens]
        if short:
            raise RuntimeError(
                f"{len(short)} requests generated {sorted(set(short))} tokens, not max_tokens={params.max_tokens}"
            )
        return {"seconds": wall, "latency": statistics.fmean(done[rid][0] - t0 for rid in ids)}


def build_engines(settings: ServingSettings, base_dir: str) -> dict[str, Any]:
    """The plain engine, and three LoRA-enabled engines (base, RoAd, LoRA) with identical settings.

    One engine per contender group keeps each group's adapters resident in its slots, so no timed
    round loads or evicts adapters, and the base model's requests run where no slot holds one.
    """
    from vllm import LLM

    common = dict(
        dtype=settings.dtype,
        seed=settings.seed,
        enforce_eager=True,
        skip_tokenizer_init=True,
        max_num_seqs=settings.max_num_seqs,
        max_model_len=settings.prompt_len + settings.max_tokens,
        kv_cache_memory_bytes=settings.kv_cache_mib * 2**20,
    )
    n = max(settings.adapter_counts)
    lora = dict(enable_lora=True, max_loras=n, max_cpu_loras=n, max_lora_rank=LORA_RANK)
    engines = {}
    for name, extra in ((PLAIN, {}), (BASE, lora), (ROAD, lora), (LORA, lora)):
        t0 = time.perf_counter()
        engines[name] = LLM(base_dir, **common, **extra)
        log(f"engine '{name}' built in {time.perf_counter() - t0:.1f} s")
    return engines


def engine_facts(llm: Any) -> dict[str, Any]:
    """The settings an engine actually runs with (after vLLM's platform defaults)."""
    cfg = llm.llm_engine.vllm_config
    lora = cfg.lora_config
    return {
        "dtype": str(cfg.model_config.dtype).removeprefix("torch."),
        "enforce_eager": cfg.model_config.enforce_eager,
        "max_num_seqs": cfg.scheduler_config.max_num_seqs,
        "max_num_batched_tokens": cfg.scheduler_config.max_num_batched_tokens,
        "max_model_len": cfg.model_config.max_model_len,
        "kv_cache_memory_bytes": cfg.cache_config.kv_cache_memory_bytes,
        "lora": None
        if lora is None
        else {"max_loras": lora.max_loras, "max_cpu_loras": lora.max_cpu_loras, "max_lora_rank": lora.max_lora_rank},
    }


def memory_rows(settings: ServingSettings, base_dir: str, paths: dict[str, Any]) -> list[dict[str, Any]]:
    """Adapter memory of RoAd-only engines at each of `memory_slots` (every slot holding a RoAd adapter),
    then of the largest with one LoRA adapter served beside them (vLLM's LoRA tensors come back)."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    from roadkit.integrations.vllm.manager import adapter_memory_on_worker

    params = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False)
    rows = []
    for n in settings.memory_slots:
        llm = LLM(
            base_dir,
            dtype=settings.dtype,
            enforce_eager=True,
            skip_tokenizer_init=True,
            max_num_seqs=n,
            max_model_len=settings.prompt_len + 2,
            kv_cache_memory_bytes=64 * 2**20,
            enable_lora=True,
            max_loras=n,
            max_cpu_loras=n,
            max_lora_rank=LORA_RANK,
        )
        loras = [LoRARequest(f"road-{i}", i + 1, path) for i, path in enumerate(paths[ROAD][:n])]
        prompts = [TokensPrompt(prompt_token_ids=[3] * settings.prompt_len) for _ in loras]
        llm.generate(prompts, params, lora_request=loras, use_tqdm=False)  # every slot holds a RoAd adapter
        rows.append({"max_loras": n, "served": f"{n} RoAd", **llm.collective_rpc(adapter_memory_on_worker)[0]})
        if n == max(settings.memory_slots):
            hybrid = loras[1:] + [LoRARequest("lora-0", n + 1, paths[LORA][0])]
            llm.generate(prompts, params, lora_request=hybrid, use_tqdm=False)
            memory = llm.collective_rpc(adapter_memory_on_worker)[0]
            rows.append({"max_loras": n, "served": f"{n - 1} RoAd + 1 LoRA", **memory})
        del llm
        gc.collect()
    return rows


def check_plugin() -> None:
    """Fail early unless roadkit's plugin replaced vLLM's adapter manager (vLLM loads plugins lazily)."""
    from vllm.plugins import load_general_plugins
    from vllm.v1.worker import lora_model_runner_mixin

    from roadkit.integrations.vllm.manager import RoadWorkerLoRAManager

    load_general_plugins()
    if lora_model_runner_mixin.LRUCacheWorkerLoRAManager is not RoadWorkerLoRAManager:
        raise RuntimeError(
            "roadkit's vLLM plugin is not active (is roadkit installed in this environment, and "
            "VLLM_PLUGINS unset or naming it?); see the log for roadkit's reason."
        )


# ---- the run ---------------------------------------------------------------------------------------


def measure(settings: ServingSettings, rounds: int, engines: dict[str, Any], paths: dict[str, Any]) -> dict:
    """Warm up every case once, time `rounds` interleaved rounds, summarize against the base."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    rng = random.Random(settings.seed)
    prompts = [
        TokensPrompt(prompt_token_ids=[rng.randrange(3, settings.model.vocab) for _ in range(settings.prompt_len)])
        for _ in range(settings.requests)
    ]
    adapters = {
        label: [LoRARequest(f"{label}-{i}", i + 1, path) for i, path in enumerate(paths[label])]
        for label in (ROAD, LORA)
    }
    cases: dict[str, dict[str, Any]] = {
        PLAIN: {"contender": PLAIN, "adapters": 0},
        BASE: {"contender": BASE, "adapters": 0},
    }
    workloads = {PLAIN: Workload(engines[PLAIN], prompts, []), BASE: Workload(engines[BASE], prompts, [])}
    for label in (ROAD, LORA):
        for k in settings.adapter_counts:
            name = f"{label}, {k} adapter{'s' if k > 1 else ''}"
            cases[name] = {"contender": label, "adapters": k}
            workloads[name] = Workload(engines[label], prompts, adapters[label][:k])

    def params(max_tokens: int) -> Any:
        return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, detokenize=False)

    timed = {name: functools.partial(w.run, params(settings.max_tokens)) for name, w in workloads.items()}
    warm = {name: functools.partial(w.run, params(settings.warmup_max_tokens)) for name, w in workloads.items()}
    raw = run_interleaved(timed, reps=rounds, warmup=1, label="vllm serving", warm_cases=warm)

    out_tokens = settings.requests * settings.max_tokens
    tps = {name: [out_tokens / s for s in t["seconds"]] for name, t in raw["times"].items()}
    lat = {name: t["latency"] for name, t in raw["times"].items()}
    summary = {
        name: {
            "tokens_per_s": summarize(tps[name]),
            "latency_s": summarize(lat[name]),
            "tokens_per_s_vs_base": ratio_stats(tps[name], tps[BASE]),
            "latency_vs_base": ratio_stats(lat[name], lat[BASE]),
        }
        for name in cases
    }
    base_tokens = workloads[BASE].tokens
    checks = {
        "plain_engine_matches_base": workloads[PLAIN].tokens == base_tokens,
        "share_of_requests_changed_by_adapter": {
            name: statistics.fmean(a != b for a, b in zip(workloads[name].tokens, base_tokens, strict=True))
            for name, meta in cases.items()
            if meta["adapters"]
        },
    }
    return {
        "cases": cases,
        "times": raw["times"],
        "tokens_per_s": tps,
        "orders": raw["orders"],
        "summary": summary,
        "checks": checks,
        "targets": targets(cases, tps, settings.dtype),
    }


def targets(cases: dict[str, dict], tps: dict[str, list[float]], dtype: str) -> list[dict]:
    """The throughput targets: RoAd at 64 adapters (or the most below) vs the base model and vs LoRA, and
    RoAd with the most adapters vs RoAd with one (flat in the number of adapters)."""

    def case(label: str, k: int) -> str:
        return next(n for n, m in cases.items() if m["contender"] == label and m["adapters"] == k)

    counts = sorted({m["adapters"] for m in cases.values() if m["contender"] == ROAD})
    mid = max(k for k in counts if k <= 64)
    out = []
    for what, value, ref, goal in (
        (f"{ROAD} / base tokens/s, {mid} adapters", tps[case(ROAD, mid)], tps[BASE], TARGET_VS_BASE[dtype]),
        (f"{ROAD} / {LORA} tokens/s, {mid} adapters", tps[case(ROAD, mid)], tps[case(LORA, mid)], TARGET_VS_LORA),
        (
            f"{ROAD} {counts[-1]} adapters / 1 adapter tokens/s",
            tps[case(ROAD, counts[-1])],
            tps[case(ROAD, 1)],
            TARGET_FLAT,
        ),
    ):
        ratio = ratio_stats(value, ref)
        out.append(
            {
                "what": what,
                "goal": goal,
                "ratio_of_medians": ratio["of_medians"],
                "per_round_median": ratio["paired_median"],
                "met": ratio["of_medians"] >= goal,
            }
        )
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    omp_set_here = _set_omp_wait_policy(args.omp_wait_policy)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engines run in this process
    settings = dataclasses.replace(QUICK if args.quick else FULL, dtype=args.dtype)
    rounds = args.rounds or settings.rounds
    out_dir = args.out or os.path.join("benchmarks", "results", *(["quick"] if args.quick else []))
    t_start = time.perf_counter()
    meta: dict[str, Any] = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join(["python -m benchmarks.vllm_serving", *(sys.argv[1:] if argv is None else argv)]),
        "loadavg_start": _loadavg(),
        "cpu_pressure_start": _cpu_pressure(),
    }

    import peft
    import torch
    import transformers
    import vllm

    import roadkit

    check_plugin()
    with tempfile.TemporaryDirectory(prefix="vllm-serving-") as root:
        log(f"writing the base model and {max(settings.adapter_counts)} RoAd and LoRA adapters to {root}")
        paths = write_checkpoints(settings, root)
        engines = build_engines(settings, paths["base"])
        result = measure(settings, rounds, engines, paths)
        facts = {name: engine_facts(llm) for name, llm in engines.items()}
        engines.clear()
        gc.collect()
        log(f"adapter memory of RoAd-only engines at --max-loras {settings.memory_slots}")
        result["memory"] = memory_rows(settings, paths["base"], paths)
    meta.update(
        {
            "vllm": vllm.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "roadkit": getattr(roadkit, "__version__", "?"),
            "python": platform.python_version(),
            "cpu": _cpu_name(),
            "cpu_count": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
            "omp_wait_policy_set_by_harness": omp_set_here,
            "env": {k: v for k, v in os.environ.items() if k.startswith("VLLM_") or k in ("OMP_NUM_THREADS",)},
            "rounds": rounds,
            "loadavg_end": _loadavg(),
            "cpu_pressure_end": _cpu_pressure(),
            "total_seconds": time.perf_counter() - t_start,
        }
    )
    results = {
        "meta": meta,
        "settings": asdict(settings),
        "adapters": {
            ROAD: {"variant": VARIANT, "group_size": GROUP_SIZE},
            LORA: {"r": LORA_RANK, "lora_alpha": LORA_ALPHA},
        },
        "engines": facts,
        **result,
    }
    paths_written = write_all(results, out_dir)
    print(markdown(results))
    log(f"wrote {', '.join(paths_written)}; total {meta['total_seconds']:.0f} s")
    return 0


# ---- report ----------------------------------------------------------------------------------------


def markdown(results: dict) -> str:
    """The results as a markdown page: setup, one table, the targets and the checks."""
    from .report import _busy, _fmt, _row

    meta, su, eng = results["meta"], results["settings"], results["engines"][BASE]
    m, lora = su["model"], eng["lora"]
    lines = [
        "# vLLM serving: RoAd (roadkit plugin) vs LoRA vs the base model",
        "",
        f"- date: {meta['date']}, run: `{meta['command']}` ({su['name']} settings), "
        f"total runtime {meta['total_seconds']:.0f} s",
        f"- vllm {meta['vllm']}, torch {meta['torch']}, transformers {meta['transformers']}, peft {meta['peft']}, "
        f"roadkit {meta['roadkit']}, python {meta['python']}",
        f"- CPU: {meta['cpu']} ({meta['cpu_count']} cores visible), torch threads {meta['threads']}, "
        f"OMP_WAIT_POLICY={meta['omp_wait_policy']}; load average at start {meta['loadavg_start']}, at end "
        f"{meta['loadavg_end']}; CPU pressure at start `{meta['cpu_pressure_start']}`, at end "
        f"`{meta['cpu_pressure_end']}`",
        f"- model: random-weight Llama, {m['layers']} layers, hidden {m['hidden']}, intermediate "
        f"{m['intermediate']}, {m['heads']} heads, vocab {m['vocab']}",
        f"- engines (all four identical but for `enable_lora`): dtype {eng['dtype']}, eager "
        f"(`enforce_eager={eng['enforce_eager']}`: vLLM on CPU runs LoRA-enabled engines eagerly anyway, so the "
        f"plain engine is eager too), max_num_seqs {eng['max_num_seqs']}, max_num_batched_tokens "
        f"{eng['max_num_batched_tokens']}, max_model_len {eng['max_model_len']}, KV cache "
        f"{eng['kv_cache_memory_bytes'] / 2**20:.0f} MiB; LoRA-enabled: max_loras {lora['max_loras']}, "
        f"max_cpu_loras {lora['max_cpu_loras']}, max_lora_rank {lora['max_lora_rank']}",
        f"- workload: {su['requests']} requests submitted at once, prompts of {su['prompt_len']} random token ids, "
        f"{su['max_tokens']} output tokens each (temperature 0, `ignore_eos`); request i uses adapter i mod k",
        f"- adapters: RoAd `{results['adapters'][ROAD]['variant']}` group_size "
        f"{results['adapters'][ROAD]['group_size']} (roadkit `save_pretrained`, served by the plugin), LoRA "
        f"r={results['adapters'][LORA]['r']} alpha={results['adapters'][LORA]['lora_alpha']} (PEFT "
        "`save_pretrained`, random A and B, served by vLLM); all on q,k,v,o,gate,up,down projections. One engine "
        "per group (base, RoAd, LoRA), each adapter loaded once in the warmup round and resident thereafter",
        f"- {meta['rounds']} timed rounds after one warmup round; each round runs every case once, the order "
        "rotated by one case per round. Tokens/s = output tokens / wall time of the round; latency = mean over "
        'requests of submission to finish. "× base" = median / the base\'s median (LoRA-enabled engine, no '
        'adapter); "per round" = the ratio within each round',
    ]
    if _busy(meta):
        lines.append(
            "- **note: other processes were competing for the CPU during this run** (load average above "
            "the thread count or CPU pressure above 10%): absolute numbers are inflated and noisy; "
            "compare the per-round ratios"
        )
    lines += [
        "",
        "| case | output tokens/s: median | min – max | × base | × base per round: median [min – max] "
        "| mean latency (s): median | latency × base |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name in results["cases"]:
        s = results["summary"][name]
        t, r, lat = s["tokens_per_s"], s["tokens_per_s_vs_base"], s["latency_s"]
        lines.append(
            _row(
                [
                    name,
                    _fmt(t["median"]),
                    f"{_fmt(t['min'])} – {_fmt(t['max'])}",
                    f"**{r['of_medians']:.3f}**",
                    f"{r['paired_median']:.3f} [{r['paired_min']:.3f} – {r['paired_max']:.3f}]",
                    _fmt(lat["median"]),
                    f"{s['latency_vs_base']['of_medians']:.3f}",
                ]
            )
        )
    lines += ["", "## Targets", ""]
    for t in results["targets"]:
        lines.append(
            f"- {t['what']}: **{t['ratio_of_medians']:.3f}** (per-round median {t['per_round_median']:.3f}),"
            f" goal ≥ {t['goal']}: **{'met' if t['met'] else 'NOT met'}**"
        )
    lines += [
        "",
        "## Adapter memory",
        "",
        "RoAd-only engines, every slot holding a RoAd adapter (then one LoRA adapter beside them): vLLM's LoRA "
        "tensors and roadkit's RoAd slot tables (c and s in float32; c - 1 and the signed sines in bfloat16 for "
        "16-bit activations, else float32; group sizes), MiB.",
        "",
        "| --max-loras | served | vLLM LoRA tensors | RoAd tables | all / RoAd tables |",
        "|---:|---|---:|---:|---:|",
    ]
    for row in results["memory"]:
        lora_mib, road_mib = row["lora_tensors"] / 2**20, row["road_tables"] / 2**20
        lines.append(
            f"| {row['max_loras']} | {row['served']} | {lora_mib:.1f} | {road_mib:.1f} | "
            f"{(lora_mib + road_mib) / road_mib:.2f} |"
        )
    checks = results["checks"]
    changed = checks["share_of_requests_changed_by_adapter"]
    lines += [
        "",
        "## Checks",
        "",
        f"- plain engine's tokens identical to the LoRA-enabled engine's base tokens: "
        f"{checks['plain_engine_matches_base']}",
        "- share of requests whose tokens differ from the base model's (the adapters are applied): "
        + ", ".join(f"{name} {share:.2f}" for name, share in changed.items()),
        "",
    ]
    return "\n".join(lines)


def plot(results: dict, path: str) -> None:
    """Output tokens/s vs distinct adapters for RoAd and LoRA (bars: min–max over rounds), the base as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary, cases = results["summary"], results["cases"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, color in ((ROAD, "tab:blue"), (LORA, "tab:green")):
        rows = sorted(
            (meta["adapters"], summary[name]["tokens_per_s"])
            for name, meta in cases.items()
            if meta["contender"] == label
        )
        ks, stats = [k for k, _ in rows], [st for _, st in rows]
        ys = [st["median"] for st in stats]
        err = [[st["median"] - st["min"] for st in stats], [st["max"] - st["median"] for st in stats]]
        ax.errorbar(ks, ys, yerr=err, marker="o", capsize=3, color=color, label=label)
    ax.axhline(
        summary[BASE]["tokens_per_s"]["median"],
        color="gray",
        linestyle="--",
        linewidth=1,
        label="base (LoRA-enabled engine, no adapter)",
    )
    ax.axhline(
        summary[PLAIN]["tokens_per_s"]["median"],
        color="black",
        linestyle=":",
        linewidth=1,
        label="base (engine without LoRA)",
    )
    ks_all = results["settings"]["adapter_counts"]
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks_all, [str(k) for k in ks_all])
    ax.set_ylim(bottom=0)
    ax.set_xlabel("distinct adapters over the requests")
    ax.set_ylabel("output tokens/s (median; bars: min–max over rounds)")
    su, m = results["settings"], results["settings"]["model"]
    ax.set_title(
        f"vLLM {results['meta']['vllm']} on CPU, {su['requests']} requests x {su['max_tokens']} tokens; "
        f"Llama {m['layers']}L h{m['hidden']}, {results['engines'][BASE]['dtype']}",
        fontsize=10,
    )
    finish_figure(fig, ax, path)


def write_all(results: dict, out_dir: str) -> list[str]:
    """Write vllm_serving_<dtype>.{json,md,png} to `out_dir`, each replaced atomically."""
    from .report import _write_text, write_json

    os.makedirs(out_dir, exist_ok=True)
    stem = f"{BASENAME}_{results['settings']['dtype']}"
    paths = [os.path.join(out_dir, f"{stem}.{ext}") for ext in ("json", "md", "png")]
    write_json(results, paths[0])
    _write_text(paths[1], markdown(results))
    plot(results, paths[2])
    return paths


if __name__ == "__main__":
    sys.exit(main())
