"""Write the results: JSON (everything), markdown tables, and the decode plot."""

from __future__ import annotations

import json
import os
from typing import Any

from . import contenders as C
from .settings import GROUP_SIZE, LORA_ALPHA, LORA_RANK, VARIANT

MB = 1024 * 1024


def _write_text(path: str, text: str) -> None:
    """Replace `path` atomically: a run killed mid-write leaves the previous file, never half of one."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_json(results: dict, path: str) -> None:
    _write_text(path, json.dumps(results, indent=1, sort_keys=False))


def _fmt(x: float, scale: float = 1.0, digits: int = 3) -> str:
    return f"{x * scale:.{digits}g}" if abs(x * scale) < 10**digits else f"{x * scale:.0f}"


def _row(cells: list[str]) -> str:
    """One row of a markdown table."""
    return "| " + " | ".join(cells) + " |"


def _timing_table(res: dict, unit: str, scale: float, first_col: str = "case") -> list[str]:
    lines = [
        (
            f"| {first_col} | median ({unit}) | min – max ({unit}) | IQR ({unit}) | × base "
            "| × base per rep: median [min – max] |"
        ),
        "|---|---:|---:|---:|---:|---:|",
    ]
    for case, row in res["summary"].items():
        st, r = row["stats"], row["ratio_to_base"]
        cells = [
            case,
            _fmt(st["median"], scale),
            f"{_fmt(st['min'], scale)} – {_fmt(st['max'], scale)}",
            f"{_fmt(st['q1'], scale)} – {_fmt(st['q3'], scale)}",
            f"**{r['of_medians']:.3f}**",
            f"{r['paired_median']:.3f} [{r['paired_min']:.3f} – {r['paired_max']:.3f}]",
        ]
        lines.append(_row(cells))
    return lines


def _psi_avg10(line):
    try:
        return float(line.split("avg10=")[1].split()[0])
    except (AttributeError, IndexError, ValueError):
        return None


def _para(*parts: str) -> str:
    return " ".join(parts)


def _device(meta: dict) -> str:
    gpu = meta.get("gpu")
    if not gpu:
        return meta.get("device", "cpu")
    return f"{gpu['name']} ({gpu['memory_gib']} GiB), CUDA {gpu['cuda']}, Triton {gpu['triton']}"


def _busy(meta: dict) -> bool:
    psi = [_psi_avg10(meta.get(k)) for k in ("cpu_pressure_start", "cpu_pressure_end")]
    load = [meta[k][0] for k in ("loadavg_start", "loadavg_end") if meta.get(k)]
    return any(p is not None and p > 10 for p in psi) or any(x > meta["threads"] + 0.5 for x in load)


def _meta_lines(meta: dict) -> list[str]:
    env = ", ".join(f"{k}={v}" for k, v in meta.get("env", {}).items()) or "none set"
    if meta.get("omp_wait_policy_set_by_harness"):
        env += " (set by --omp-wait-policy)"
    out = [
        _para(
            f"- date: {meta['date']}, run: `{meta['command']}` ({meta['settings']['name']} settings),",
            f"total runtime {meta['total_seconds']:.0f} s"
            + (
                ""
                if meta.get("complete", True)
                else f" (**incomplete**: written after {len(meta['scenarios_done'])} of {len(meta['scenarios'])}"
                " scenarios; a later write replaces this)"
            ),
        ),
        _para(
            f"- torch {meta['torch']}, transformers {meta['transformers']}, peft {meta['peft']},",
            f"roadkit {meta['roadkit']}, python {meta['python']}",
        ),
        _para(
            f"- CPU: {meta['cpu']} ({meta['cpu_count']} cores visible), torch threads {meta['threads']},",
            f"threading env: {env}",
        ),
        _para(
            f"- device: {_device(meta)}; model and kernel dtype {meta.get('dtype', 'float32')}",
            "(train and merge: float32)",
        ),
        _para(
            f"- machine load: load average at start {meta['loadavg_start']}, at end {meta['loadavg_end']};",
            f"CPU pressure (PSI) at start `{meta.get('cpu_pressure_start')}`,",
            f"at end `{meta.get('cpu_pressure_end')}`",
        ),
    ]
    if _busy(meta):
        out.append(
            _para(
                "- **note: other processes were competing for the CPU during this run**",
                "(load average above the thread count or CPU pressure > 10%): absolute times are",
                "inflated and noisy; the ratios are taken within the same interleaved rounds, but",
                "treat small differences with care.",
            )
        )
    out.append(
        _para(
            f"- {meta['reps']} timed repetitions after {meta['warmup']} warmup round(s); contenders",
            "interleaved (each repetition runs every case once, order rotated per repetition).",
            '"× base" = median / median of the base model in the same run;',
            '"per rep" = ratio within each repetition.',
        )
    )
    out.append(
        _para(
            f"- adapters: RoAd `{VARIANT}` group_size {GROUP_SIZE} (roadkit and PEFT, identical",
            f"numbers), LoRA r={LORA_RANK} alpha={LORA_ALPHA}; all on q,k,v,o,gate,up,down;",
            "non-identity init.",
        )
    )
    return out + [""]


def _model(m: dict, dtype: str = "float32") -> str:
    return (
        f"Llama {m['layers']} layers, hidden {m['hidden']}, intermediate {m['intermediate']}, "
        f"{m['heads']} heads, vocab {m['vocab']}, {dtype}"
    )


def _decode_section(r: dict) -> list[str]:
    su, par = r["setup"], r["parity"]
    title = f"## decode: generate {su['new_tokens']} tokens, batch {su['batch']}, prompt {su['prompt_len']}"
    out = [
        title,
        "",
        _para(
            f"{_model(su['model'], su.get('dtype', 'float32'))};",
            f"{su['adapters_loaded']} adapters loaded per adapter model;",
            "rows round-robin over k adapters (`adapter_names=`);",
            '"1 adapter, unmerged" = the active adapter, no `adapter_names`.',
            f"Warmup calls generate {su['warmup_new_tokens']} tokens.",
            "Parity roadkit vs PEFT RoAd (logits, max abs diff):",
            f"mixed {par['max_abs_diff_mixed']:.1e},",
            f"single {par['max_abs_diff_single']:.1e}.",
        ),
        "",
    ]
    out += _timing_table(r, "s", 1.0)
    agree = r["greedy_token_agreement_roadkit_vs_peft_road"]
    out += [
        "",
        "Greedy tokens identical between roadkit and PEFT RoAd: "
        + ", ".join(f"{k} {100 * v:.1f}%" for k, v in agree.items()),
        "",
    ]
    return out


def _compiled_section(r: dict) -> list[str]:
    su, cc, graphs = r["setup"], r["setup"]["compile"], r["graphs_compiled"]
    title = (
        f"## compiled: decode as above, forward compiled by generate (static cache, {cc['backend']}, mode {cc['mode']})"
    )
    out = [
        title,
        "",
        _para(
            f"{_model(su['model'], su.get('dtype', 'float32'))}; batch {su['batch']}, "
            f"{su['new_tokens']} tokens. Call: `{su['call']}` with a `CompileConfig`",
            f"(fullgraph {cc['fullgraph']}, dynamic {cc['dynamic']}). The warmup generates the full",
            f"length and compiled {graphs['warmup']} graphs; {graphs['timed']} were compiled while timed.",
            "PEFT's mixed batches are left out: compiled, their decode steps can drop the routing",
            "(see `scenarios.compiled`).",
        ),
        "",
    ]
    out += _timing_table(r, "s", 1.0)
    same = r["greedy_token_agreement_with_eager"]
    out += [
        "",
        "Greedy tokens identical to the same model's eager generate: "
        + ", ".join(f"{k} {100 * v:.1f}%" for k, v in same.items()),
        "",
    ]
    return out


def _step_section(r: dict) -> list[str]:
    su = r["setup"]
    out = [
        f"## step: one decode step of a serving loop, batch {su['batch']}, cache of {su['cache_len']} tokens",
        "",
        _para(
            f"Same model and loaded adapters as decode. Each call: `{su['call']}`; routing is set on",
            "every call, as a server stepping its own batch does (generate sets it once).",
            f"{su['rounds']} interleaved rounds.",
        ),
        "",
    ]
    return out + _timing_table(r, "ms", 1e3) + [""]


def _prefill_section(r: dict) -> list[str]:
    su, par = r["setup"], r["parity"]
    out = [
        f"## prefill: forward of batch {su['batch']} x {su['seq_len']} tokens",
        "",
        _para(
            f"Same model as decode; `logits_to_keep=1`. k = {su['ks']} (mixed: one adapter per row, at",
            f"most batch-many distinct adapters). Parity: mixed {par['max_abs_diff_mixed']:.1e},",
            f"single {par['max_abs_diff_single']:.1e}.",
        ),
        "",
    ]
    return out + _timing_table(r, "ms", 1e3) + [""]


def _train_section(r: dict) -> list[str]:
    su, par = r["setup"], r["parity"]
    m = su["model"]
    out = [
        f"## train: one step, batch {su['batch']} x {su['seq_len']}",
        "",
        _para(
            f"Llama {m['layers']} layers, hidden {m['hidden']}, intermediate {m['intermediate']},",
            f"vocab {m['vocab']}. Step = forward + backward + AdamW step on adapter parameters.",
            "The base row is the frozen model's forward + backward to its input embeddings",
            "(no weight gradients, no optimizer).",
            f"Parity: logits {par['max_abs_diff_logits']:.1e}, adapter grads (rel)",
            f"{par['max_rel_diff_adapter_grads']:.1e}.",
        ),
        "",
    ]
    out += _timing_table(r, "ms", 1e3, first_col="contender")
    v = r["roadkit_over_peft_road"]
    out += [
        "",
        _para(
            f"roadkit's step time over PEFT RoAd's, {r['rounds']} interleaved rounds: per-round ratio",
            f"median **{v['paired_median']:.3f}** (quartiles {v['paired_q1']:.3f} – {v['paired_q3']:.3f}),",
            f"ratio of medians {v['of_medians']:.3f}.",
        ),
    ]
    b = r.get("bound")
    if b is not None:
        z = b["zero_cost_adapter_over_peft_road"]
        out += [
            "",
            _para(
                "An adapter that cost nothing would take the base row's time: against PEFT RoAd that is",
                f"**{z['paired_median']:.3f}** per round (quartiles {z['paired_q1']:.3f} –",
                f"{z['paired_q3']:.3f}), the best ratio any adapter can reach here. roadkit's own",
                "cost (its median step minus the base's) is",
                f"**{b['roadkit_overhead_over_peft_road_overhead']:.2f}x** PEFT RoAd's.",
            ),
        ]
    out += [
        "",
        "Bytes saved for backward during the forward (unique storages; parameters excluded):",
        "",
        (
            "| contender | trainable params | adapter layers "
            "| saved inside adapter layers, outside base layer (MB) "
            "| total saved, whole forward (MB) | total − base (MB) |"
        ),
        "|---|---:|---:|---:|---:|---:|",
    ]
    for case, mem in r["memory"].items():
        tp = r["cases"][case].get("trainable_params", 0)
        cells = [
            case,
            f"{tp:,d}",
            str(mem["adapter_layers"]),
            f"{mem['adapter_bytes'] / MB:.1f}",
            f"{mem['total_bytes'] / MB:.1f}",
            f"{mem['extra_vs_base_bytes'] / MB:+.1f}",
        ]
        out.append(_row(cells))
    return out + [""]


def _merge_section(r: dict) -> list[str]:
    su = r["setup"]
    out = [
        f"## merge: {su['layer']}",
        "",
        _para(
            f"{su['adapter']}; {su['timed']}. Merged weights roadkit vs PEFT: max abs diff",
            f"{r['parity']['max_abs_diff_merged_weights']:.1e}.",
        ),
        "",
        (
            "| contender | merge median (ms) [min – max] | unmerge median (ms) [min – max] "
            "| max rel. error after unmerge, W (b) |"
        ),
        "|---|---:|---:|---:|",
    ]
    for c, summ in r["summary"].items():
        mg, um, e = summ["merge"], summ["unmerge"], r["unmerge_error"][c]
        cells = [
            c,
            f"{_fmt(mg['median'], 1e3)} [{_fmt(mg['min'], 1e3)} – {_fmt(mg['max'], 1e3)}]",
            f"{_fmt(um['median'], 1e3)} [{_fmt(um['min'], 1e3)} – {_fmt(um['max'], 1e3)}]",
            f"{e['weight_rel']:.1e} ({e['bias_rel']:.1e})",
        ]
        out.append(_row(cells))
    sp = r["speedup_peft_over_roadkit"]
    out += [
        "",
        _para(
            f"Speedup of roadkit over PEFT (ratio of medians): merge **{sp['merge']:.1f}x**,",
            f"unmerge **{sp['unmerge']:.1f}x**, merge+unmerge {sp['merge+unmerge']:.1f}x.",
            "Relative error = max |W_after_unmerge − W_original| / max |W_original| over",
            "repetitions.",
        ),
        "",
    ]
    return out


def _kernels_section(r: dict) -> list[str]:
    su = r["setup"]
    out = [
        f"## kernels: one ({su['shape'][0]} x {su['shape'][1]}) {su['dtype']} tensor on {su['device']}",
        "",
        _para(
            f"Implementation: **{su['implementation']}**; {su['adapter']}; each sample times",
            f"{su['calls_per_sample']} calls. Bandwidth = {su['bytes']}, over the median time.",
            "Largest error against a float64 reference (relative to the largest value):",
            ", ".join(f"{k} {v:.1e}" for k, v in r["max_rel_error_vs_float64"].items()) + ".",
        ),
        "",
        "| op | median (ms) | min – max (ms) | bytes moved (MiB) | GB/s | × copy bandwidth |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label, row in r["summary"].items():
        st = row["stats"]
        cells = [
            label,
            _fmt(st["median"], 1e3),
            f"{_fmt(st['min'], 1e3)} – {_fmt(st['max'], 1e3)}",
            f"{row['bytes'] / MB:.0f}",
            f"{row['gb_per_s']:.1f}",
            f"**{row['fraction_of_copy_bandwidth']:.2f}**",
        ]
        out.append(_row(cells))
    return out + [""]


def _overhead_section(r: dict) -> list[str]:
    su = r["setup"]
    out = [
        f"## overhead: {su['layers']} tiny layers, the fixed cost of a wrapper per call",
        "",
        _para(
            f"nn.Sequential of {su['layers']} nn.Linear({su['width']}, {su['width']}) on {su['rows']} rows",
            f"({su['device']}): the arithmetic is negligible, so (time − base) / {su['layers']} is what each",
            "adapted layer adds to every call (Python, dispatch, launches). Mixed cases pass",
            f"`adapter_names` on every call, one of {su['adapters']} adapters per row.",
            f"{su['calls_per_sample']} calls per sample, {su['rounds']} interleaved rounds.",
        ),
        "",
        "| case | median per call (µs) | IQR (µs) | × base | added per adapted layer (µs) |",
        "|---|---:|---:|---:|---:|",
    ]
    for case, row in r["summary"].items():
        st = row["stats"]
        cells = [
            case,
            _fmt(st["median"], 1e6),
            f"{_fmt(st['q1'], 1e6)} – {_fmt(st['q3'], 1e6)}",
            f"**{row['ratio_to_base']['of_medians']:.2f}**",
            f"{row['per_layer_seconds'] * 1e6:.1f}",
        ]
        out.append(_row(cells))
    for label, source in su.get("baselines", {}).items():
        lines = []
        for kind in ("1 adapter", f"{su['adapters']} adapters mixed, routed per call"):
            new = r["summary"].get(f"roadkit RoAd ({kind})")
            old = r["summary"].get(f"roadkit RoAd ({label}) ({kind})")
            if new and old:
                ratio = new["stats"]["median"] / old["stats"]["median"]
                added = f"{new['per_layer_seconds'] * 1e6:.1f} vs {old['per_layer_seconds'] * 1e6:.1f} µs per layer"
                lines.append(f"{kind}: **{ratio:.3f}x** its time per call ({added})")
        out += ["", f"This roadkit against `{label}` ({source}): " + "; ".join(lines) + "."]
    return out + [""]


def _failed_section(name: str, r: dict) -> list[str]:
    return [f"## {name}: failed", "", f"After {r['seconds']:.0f} s: `{r['error']}` (traceback in results.json).", ""]


def markdown(results: dict) -> str:
    out = ["# roadkit benchmark results", ""] + _meta_lines(results["meta"])
    sections = {
        "decode": _decode_section,
        "step": _step_section,
        "prefill": _prefill_section,
        "compiled": _compiled_section,
        "train": _train_section,
        "merge": _merge_section,
        "kernels": _kernels_section,
        "overhead": _overhead_section,
    }
    for name, r in results["scenarios"].items():
        out += _failed_section(name, r) if "error" in r else sections[name](r)
    return "\n".join(out)


def plot_decode(results: dict, path: str) -> bool:
    r = results["scenarios"].get("decode")
    if r is None or "error" in r:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = {C.ROADKIT: "tab:blue", C.PEFT_ROAD: "tab:orange", C.PEFT_LORA: "tab:green"}
    for c in C.ADAPTER_CONTENDERS:
        rows = sorted(
            (meta["k"], r["summary"][case]["ratio_to_base"])
            for case, meta in r["cases"].items()
            if meta["contender"] == c and meta["mode"] == "mixed"
        )
        ks = [k for k, _ in rows]
        ys = [q["of_medians"] for _, q in rows]
        lo = [q["of_medians"] - q["paired_q1"] for _, q in rows]
        hi = [q["paired_q3"] - q["of_medians"] for _, q in rows]
        ax.errorbar(
            ks,
            ys,
            yerr=[[max(v, 0) for v in lo], [max(v, 0) for v in hi]],
            marker="o",
            capsize=3,
            color=colors[c],
            label=f"{c} (adapter_names, k distinct)",
        )
        for case, meta in r["cases"].items():
            if meta["contender"] == c and meta["mode"] == "single":
                ax.plot(
                    [1],
                    [r["summary"][case]["ratio_to_base"]["of_medians"]],
                    marker="s",
                    mfc="none",
                    ms=9,
                    color=colors[c],
                    linestyle="none",
                    label=f"{c} (1 adapter, unmerged)",
                )
    ax.axhline(1.0, color="gray", linestyle="--", linewidth=1, label="base model")
    if C.FLOOR in r["summary"]:
        ax.axhline(
            r["summary"][C.FLOOR]["ratio_to_base"]["of_medians"],
            color="black",
            linestyle=":",
            linewidth=1,
            label="floor: one elementwise multiply per adapted layer",
        )
    lo_y, hi_y = ax.get_ylim()
    ax.set_ylim(min(lo_y, 0.9), max(hi_y, 1.1))
    ax.set_xscale("log", base=2)
    ks_all = r["setup"]["ks"]
    ax.set_xticks(ks_all, [str(k) for k in ks_all])
    ax.set_xlabel("distinct adapters in the batch (k)")
    ax.set_ylabel("generate time / base model\n(ratio of medians; bars: IQR of per-rep ratios)")
    su = r["setup"]
    m = su["model"]
    ax.set_title(
        f"decode {su['new_tokens']} tokens, batch {su['batch']}; Llama {m['layers']}L "
        f"h{m['hidden']}; {results['meta']['threads']} threads",
        fontsize=10,
    )
    finish_figure(fig, ax, path)
    return True


def finish_figure(fig: Any, ax: Any, path: str) -> None:
    """Grid, legend and layout, then write the PNG atomically (to a temporary file, renamed over `path`)."""
    import matplotlib.pyplot as plt

    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(f"{path}.tmp", dpi=120, format="png")
    os.replace(f"{path}.tmp", path)
    plt.close(fig)


def write_all(results: dict, out_dir: str) -> list[str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, "results.json"), os.path.join(out_dir, "results.md")]
    write_json(results, paths[0])
    _write_text(paths[1], markdown(results))
    png = os.path.join(out_dir, "decode_vs_adapters.png")
    if plot_decode(results, png):
        paths.append(png)
    return paths


if __name__ == "__main__":  # re-render results.md and the plot from a results.json
    import sys

    path = sys.argv[1] if len(sys.argv) > 1 else os.path.join("benchmarks", "results", "results.json")
    with open(path) as f:
        print("\n".join(write_all(json.load(f), os.path.dirname(path) or ".")))
