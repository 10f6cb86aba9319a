"""The scenarios. Each returns a JSON-ready dict with raw timings, summaries and ratios.

Everything runs on the settings' device; every timed call ends with a device synchronisation, so
wall-clock time covers the work the call queued on a GPU.
"""

from __future__ import annotations

import copy
import statistics
import time
import warnings

import torch
from torch import nn

import roadkit

from . import contenders as C
from .memory import saved_tensor_bytes
from .settings import GROUP_SIZE, VARIANT, Settings, parity_tolerance
from .timing import log, ratio_stats, run_interleaved, summarize


def _summaries(times: dict, base_case: str | None, metric: str = "seconds") -> dict:
    out = {}
    for case, metrics in times.items():
        xs = metrics[metric]
        row = {"stats": summarize(xs)}
        if base_case is not None:
            row["ratio_to_base"] = ratio_stats(xs, times[base_case][metric])
        out[case] = row
    return out


def _sync(s: Settings) -> None:
    """Wait for the work queued on the settings' device (a no-op on CPU)."""
    if torch.device(s.device).type == "cuda":
        torch.cuda.synchronize()


def _names(batch: int, k: int) -> list[str]:
    """Rows assigned round-robin to k adapters."""
    return [C.adapter_name(i % k) for i in range(batch)]


# ---- shared by decode and prefill: one set of contenders, built once ---------------------------------

_LM_CACHE: dict = {}


def _n_adapters(s: Settings) -> int:
    ks = [k for k in s.decode_ks if k <= s.decode_batch] + [k for k in s.prefill_ks if k <= s.prefill_batch]
    return max(ks)


def lm_contenders(s: Settings) -> tuple[dict[str, nn.Module], dict, int]:
    """Base, roadkit, PEFT RoAd and PEFT LoRA on the same base weights, each with every adapter the
    decode and prefill scenarios use loaded; checked for roadkit/PEFT RoAd parity once."""
    key = (s.name, s.lm, s.seed)
    if key not in _LM_CACHE:
        _LM_CACHE.clear()
        n = _n_adapters(s)
        base = C.build_llama(s.lm, s.seed, s.device, getattr(torch, s.dtype))
        models = C.build_inference_contenders(base, n, s.seed)
        del base
        atol, rel = parity_tolerance(s.dtype)
        parity = C.check_inference_parity(models, s.lm.vocab, n, s.seed, atol=atol, rel=rel)
        log(
            f"contenders built ({n} adapters each); roadkit vs PEFT RoAd logits: mixed "
            f"{parity['max_abs_diff_mixed']:.2e}, single {parity['max_abs_diff_single']:.2e}"
        )
        _LM_CACHE[key] = (models, parity, n)
    return _LM_CACHE[key]


def release() -> None:
    _LM_CACHE.clear()


# ---- 1. decode --------------------------------------------------------------------------------------


def decode(s: Settings, reps: int, warmup: int) -> dict:
    return _generate_cases(
        s,
        reps,
        warmup,
        "decode",
        [k for k in s.decode_ks if k <= s.decode_batch],
        warm_new_tokens=min(s.warmup_new_tokens, s.new_tokens),
        extra={},
    )


def _generate_cases(
    s: Settings,
    reps: int,
    warmup: int,
    label: str,
    ks: list[int],
    warm_new_tokens: int,
    extra: dict,
    mixed: tuple[str, ...] = C.ADAPTER_CONTENDERS,
    after_warmup=None,
    check_eager: bool = False,
) -> dict:
    """Interleaved greedy `generate` calls of base, floor, each contender's single adapter and, for
    the `mixed` contenders, each k of mixed adapters, with `extra` generate kwargs. With
    `check_eager`, each case is run once more without them, and the share of identical greedy
    tokens is reported (`greedy_token_agreement_with_eager`)."""
    models, parity, n_loaded = lm_contenders(s)

    g = torch.Generator().manual_seed(s.seed + 11)
    ids = torch.randint(3, s.lm.vocab, (s.decode_batch, s.prompt_len), generator=g).to(s.device)
    mask = torch.ones_like(ids)
    outputs: dict[str, torch.Tensor] = {}

    def generate(label: str, model: nn.Module, names, n_new: int, kwargs: dict) -> torch.Tensor:
        kw = {} if names is None else {"adapter_names": names}
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=n_new,
                min_new_tokens=n_new,
                do_sample=False,
                **kwargs,
                **kw,
            )
        _sync(s)
        if tuple(out.shape) != (s.decode_batch, s.prompt_len + n_new):
            raise RuntimeError(f"{label}: generate returned shape {tuple(out.shape)}")
        return out[:, s.prompt_len :]

    def case(label: str, model: nn.Module, names, n_new: int):
        def fn():
            out = generate(label, model, names, n_new, extra)
            if n_new == s.new_tokens:
                outputs[label] = out

        return fn

    specs, info = {}, {}
    specs["base"] = (models[C.BASE], None)
    info["base"] = {"contender": C.BASE, "k": 0, "mode": "base"}
    specs[C.FLOOR] = (models[C.FLOOR], None)
    info[C.FLOOR] = {"contender": C.FLOOR, "k": 1, "mode": "floor"}
    for c in (C.ROADKIT, C.PEFT_ROAD):
        case_label = f"{c} (1 adapter, unmerged)"
        specs[case_label] = (models[c], None)
        info[case_label] = {"contender": c, "k": 1, "mode": "single"}
    for k in ks:
        for c in mixed:
            case_label = f"{c} (k={k})"
            specs[case_label] = (models[c], _names(s.decode_batch, k))
            info[case_label] = {"contender": c, "k": k, "mode": "mixed"}
    cases = {lb: case(lb, m, names, s.new_tokens) for lb, (m, names) in specs.items()}
    warm = {lb: case(lb, m, names, warm_new_tokens) for lb, (m, names) in specs.items()}

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run = run_interleaved(cases, reps, warmup, label=label, warm_cases=warm, after_warmup=after_warmup)
        eager = {lb: generate(lb, m, names, s.new_tokens, {}) for lb, (m, names) in specs.items() if check_eager}

    # Same computation => same greedy tokens (up to float ties): report agreement, do not assert.
    agree = {}
    for case_label, meta in info.items():
        twin = case_label.replace(C.ROADKIT, C.PEFT_ROAD)
        if meta["contender"] == C.ROADKIT and twin in outputs:
            agree[case_label.replace(C.ROADKIT + " ", "")] = _agreement(outputs[case_label], outputs[twin])
    result = {
        "setup": {
            "model": s.lm.as_dict(),
            "dtype": s.dtype,
            "batch": s.decode_batch,
            "prompt_len": s.prompt_len,
            "new_tokens": s.new_tokens,
            "warmup_new_tokens": warm_new_tokens,
            "ks": ks,
            "adapters_loaded": n_loaded,
            "call": (
                "model.generate(input_ids, attention_mask, adapter_names=..., "
                "max_new_tokens=N, min_new_tokens=N, do_sample=False"
                + "".join(f", {k}={v!r}" for k, v in extra.items() if isinstance(v, str))
                + ") under torch.inference_mode()"
            ),
        },
        "parity": parity,
        "greedy_token_agreement_roadkit_vs_peft_road": agree,
        "cases": info,
        "raw": run["times"],
        "orders": run["orders"],
        "summary": _summaries(run["times"], "base"),
    }
    if check_eager:
        result["greedy_token_agreement_with_eager"] = {lb: _agreement(outputs[lb], eager[lb]) for lb in eager}
    return result


def _agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """Share of positions where two greedy generations picked the same token."""
    return (a == b).float().mean().item()


# ---- 2. step: a serving loop's decode step -----------------------------------------------------------

STEP_ROUNDS_PER_REP = 8  # one step is short: each repetition times this many interleaved rounds


def step(s: Settings, reps: int, warmup: int) -> dict:
    """One decode step as a serving loop runs it: `model(next_tokens, past_key_values=cache,
    adapter_names=...)` on every call, so each call pays its own routing (generate sets it once).

    The cache holds the prompt (prefilled once per case, untimed); each timed call appends one token
    and the cache is cropped back, so every call sees the same length. Many short, interleaved
    rounds give tighter ratios than a few long generate calls on a noisy machine.
    """
    ks = [k for k in s.decode_ks if k <= s.decode_batch]
    models, parity, n_loaded = lm_contenders(s)
    g = torch.Generator().manual_seed(s.seed + 19)
    ids = torch.randint(3, s.lm.vocab, (s.decode_batch, s.prompt_len), generator=g).to(s.device)
    nxt = torch.randint(3, s.lm.vocab, (s.decode_batch, 1), generator=g).to(s.device)

    def case(model: nn.Module, names):
        kw = {} if names is None else {"adapter_names": names}
        with torch.inference_mode():
            cache = model(input_ids=ids, use_cache=True, **kw).past_key_values

        def fn():
            with torch.inference_mode():
                model(input_ids=nxt, past_key_values=cache, use_cache=True, **kw)
                cache.crop(-1)
            _sync(s)

        return fn

    cases = {"base": case(models[C.BASE], None), C.FLOOR: case(models[C.FLOOR], None)}
    info = {
        "base": {"contender": C.BASE, "k": 0, "mode": "base"},
        C.FLOOR: {"contender": C.FLOOR, "k": 1, "mode": "floor"},
    }
    for c in (C.ROADKIT, C.PEFT_ROAD):
        label = f"{c} (1 adapter, unmerged)"
        cases[label] = case(models[c], None)
        info[label] = {"contender": c, "k": 1, "mode": "single"}
    for k in ks:
        for c in C.ADAPTER_CONTENDERS:
            label = f"{c} (k={k})"
            cases[label] = case(models[c], _names(s.decode_batch, k))
            info[label] = {"contender": c, "k": k, "mode": "mixed"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run = run_interleaved(cases, reps * STEP_ROUNDS_PER_REP, warmup, label="step")
    return {
        "setup": {
            "model": s.lm.as_dict(),
            "batch": s.decode_batch,
            "cache_len": s.prompt_len,
            "ks": ks,
            "adapters_loaded": n_loaded,
            "rounds": reps * STEP_ROUNDS_PER_REP,
            "call": (
                "model(input_ids=next_tokens, past_key_values=cache, use_cache=True"
                "[, adapter_names=...]) under torch.inference_mode(); cache.crop(-1)"
            ),
        },
        "parity": parity,
        "cases": info,
        "raw": run["times"],
        "orders": run["orders"],
        "summary": _summaries(run["times"], "base"),
    }


# ---- 3. prefill -------------------------------------------------------------------------------------


def prefill(s: Settings, reps: int, warmup: int) -> dict:
    ks = [k for k in s.prefill_ks if k <= s.prefill_batch]
    models, parity, n_loaded = lm_contenders(s)
    g = torch.Generator().manual_seed(s.seed + 13)
    ids = torch.randint(3, s.lm.vocab, (s.prefill_batch, s.prefill_len), generator=g).to(s.device)
    mask = torch.ones_like(ids)

    def case(model, names):
        def fn():
            kw = {} if names is None else {"adapter_names": names}
            with torch.inference_mode():
                model(input_ids=ids, attention_mask=mask, logits_to_keep=1, **kw)
            _sync(s)

        return fn

    cases = {"base": case(models[C.BASE], None), C.FLOOR: case(models[C.FLOOR], None)}
    info = {
        "base": {"contender": C.BASE, "k": 0, "mode": "base"},
        C.FLOOR: {"contender": C.FLOOR, "k": 1, "mode": "floor"},
    }
    for c in C.ADAPTER_CONTENDERS:
        label = f"{c} (1 adapter, unmerged)"
        cases[label] = case(models[c], None)
        info[label] = {"contender": c, "k": 1, "mode": "single"}
    for k in ks:
        for c in C.ADAPTER_CONTENDERS:
            if k == 1:
                continue
            label = f"{c} (k={k})"
            cases[label] = case(models[c], _names(s.prefill_batch, k))
            info[label] = {"contender": c, "k": k, "mode": "mixed"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run = run_interleaved(cases, reps, warmup, label="prefill")
    return {
        "setup": {
            "model": s.lm.as_dict(),
            "batch": s.prefill_batch,
            "seq_len": s.prefill_len,
            "ks": ks,
            "adapters_loaded": n_loaded,
            "call": "model(input_ids, attention_mask, logits_to_keep=1[, adapter_names=...]) "
            "under torch.inference_mode()",
        },
        "parity": parity,
        "cases": info,
        "raw": run["times"],
        "orders": run["orders"],
        "summary": _summaries(run["times"], "base"),
    }


# ---- 4. compiled: decode with the forward compiled -------------------------------------------------


COMPILE_CACHE_LIMIT = 64  # compiled graphs per function: every contender and adapter list adds some


def compiled(s: Settings, reps: int, warmup: int) -> dict:
    """`decode` with each model's forward compiled by `generate` itself (a static KV cache plus a
    `CompileConfig`: inductor; on CUDA its default mode, CUDA graphs). Compiling fuses roadkit's
    rotation into one pass over each layer output, which eager PyTorch cannot. k = 1 and the largest
    decode k; the warmup generates the full length, so the timed calls run the graphs it compiled
    (the result records how many graphs were compiled during the timed calls: 0 is expected).
    Every case is checked against the same model's eager generate (identical greedy tokens).

    PEFT's mixed batches are left out. PEFT passes `adapter_names` to its layers through forward
    pre-hooks, and torch.compile does not guard on hooks by default
    (`torch._dynamo.config.skip_nnmodule_hook_guards`): once the forward was compiled without
    `adapter_names`, a mixed call's decode steps reuse that graph and drop the routing. Measured on
    the quick model: 27% of PEFT RoAd's greedy tokens matched its eager mixed batch (roadkit: 100%,
    whichever call compiled first). Compiling PEFT LoRA's mixed batch did not finish in 10 minutes
    on CPU either.
    """
    from torch._dynamo.utils import counters
    from transformers.generation.configuration_utils import CompileConfig

    config = CompileConfig(fullgraph=False, dynamic=False)
    config._compile_all_devices = True  # transformers compiles generate's forward only on accelerators otherwise
    dynamo = torch._dynamo.config
    limit_name = "recompile_limit" if hasattr(dynamo, "recompile_limit") else "cache_size_limit"
    ks = sorted({1, max(k for k in s.decode_ks if k <= s.decode_batch)})
    graphs = [counters["stats"]["unique_graphs"]]
    with dynamo.patch({limit_name: COMPILE_CACHE_LIMIT}):
        result = _generate_cases(
            s,
            reps,
            warmup,
            "compiled",
            ks,
            warm_new_tokens=s.new_tokens,
            extra={"cache_implementation": "static", "compile_config": config},
            mixed=(C.ROADKIT,),
            check_eager=True,
            after_warmup=lambda: graphs.append(counters["stats"]["unique_graphs"]),
        )
    graphs.append(counters["stats"]["unique_graphs"])
    result["setup"]["compile"] = {
        "backend": config.backend,
        "mode": config.mode,
        "fullgraph": config.fullgraph,
        "dynamic": config.dynamic,
        limit_name: COMPILE_CACHE_LIMIT,
    }
    result["graphs_compiled"] = {"warmup": graphs[1] - graphs[0], "timed": graphs[2] - graphs[1]}
    log(
        f"compiled: {result['graphs_compiled']['warmup']} graphs compiled in warmup, "
        f"{result['graphs_compiled']['timed']} while timed"
    )
    return result


# ---- 5. train ---------------------------------------------------------------------------------------


def _adapter_types(contender: str) -> tuple[type, ...]:
    if contender == C.ROADKIT:
        return (roadkit.RoadLayer,)
    if contender in (C.PEFT_ROAD, C.PEFT_LORA):
        from peft.tuners.tuners_utils import BaseTunerLayer

        return (BaseTunerLayer,)
    return ()


TRAIN_ROUNDS_PER_REP = 4  # a step is short next to its run-to-run noise: more rounds, tighter ratios


def train(s: Settings, reps: int, warmup: int) -> dict:
    """One optimizer step of each contender, interleaved, plus the bytes each saves for backward.

    Besides the ratios to the frozen base model, reports roadkit's step time over PEFT RoAd's per
    round (paired), the comparison the training-speed target is stated in.
    """
    base = C.build_llama(s.train_model, s.seed, s.device)
    torch.manual_seed(s.seed + 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rk = C.make_roadkit(base, 1)
        pr = C.make_peft_road_like(rk, base, 1)
        lo = C.make_peft_lora(base, 1, seed=s.seed + 2)
    models = {C.BASE: copy.deepcopy(base), C.ROADKIT: rk, C.PEFT_ROAD: pr, C.PEFT_LORA: lo}
    del base
    models[C.BASE].requires_grad_(False)  # frozen like the adapted models' base weights
    for m in models.values():
        m.train()
    g = torch.Generator().manual_seed(s.seed + 17)
    ids = torch.randint(3, s.train_model.vocab, (s.train_batch, s.train_len), generator=g).to(s.device)

    # Parity in training mode: same loss, logits and adapter gradients before any optimizer step.
    outs = {}
    for c in (C.ROADKIT, C.PEFT_ROAD):
        out = models[c](input_ids=ids, labels=ids)
        out.loss.backward()
        prefix = "model." if c == C.ROADKIT else "base_model.model."
        grads = {
            n.removeprefix(prefix): p.grad.detach().clone() for n, p in models[c].named_parameters() if p.requires_grad
        }
        outs[c] = (out.loss.detach(), out.logits.detach(), grads)
        models[c].zero_grad(set_to_none=True)
    (la, xa, ga), (lb, xb, gb) = outs[C.ROADKIT], outs[C.PEFT_ROAD]
    if set(ga) != set(gb):
        raise AssertionError(f"trainable parameters differ: {sorted(set(ga) ^ set(gb))[:6]}")
    grad_rel = max((ga[n] - gb[n]).abs().max().item() / max(gb[n].abs().max().item(), 1e-30) for n in gb)
    parity = {
        "loss_abs_diff": abs(la - lb).item(),
        "max_abs_diff_logits": (xa - xb).abs().max().item(),
        "trainable_tensors": {c: len(o[2]) for c, o in outs.items()},
        "max_rel_diff_adapter_grads": grad_rel,
    }
    if not (parity["max_abs_diff_logits"] <= 1e-4 and grad_rel <= 1e-3):
        raise AssertionError(f"roadkit and PEFT RoAd disagree in training mode, refusing to benchmark: {parity}")
    log(f"train: parity ok, logits {parity['max_abs_diff_logits']:.2e}, grads rel {grad_rel:.2e}")
    del outs

    opts = {
        c: torch.optim.AdamW([p for p in models[c].parameters() if p.requires_grad], lr=1e-3)
        for c in C.ADAPTER_CONTENDERS
    }
    trainable = {c: sum(p.numel() for p in models[c].parameters() if p.requires_grad) for c in C.ADAPTER_CONTENDERS}

    def base_forward():
        m = models[C.BASE]
        emb = m.get_input_embeddings()(ids).detach().requires_grad_(True)
        return m(inputs_embeds=emb, labels=ids)

    def base_step():
        base_forward().loss.backward()
        _sync(s)

    def adapter_step(c):
        model, opt = models[c], opts[c]

        def fn():
            opt.zero_grad(set_to_none=True)
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            _sync(s)

        return fn

    labels = {C.BASE: "base (frozen; fwd+bwd to input embeddings, no optimizer)"}
    cases = {labels[C.BASE]: base_step}
    info = {labels[C.BASE]: {"contender": C.BASE}}
    for c in C.ADAPTER_CONTENDERS:
        cases[c] = adapter_step(c)
        info[c] = {"contender": c, "trainable_params": trainable[c]}

    # Saved-for-backward bytes, measured on a separate (untimed) forward of every contender.
    memory = {}
    for label, meta in info.items():
        c = meta["contender"]
        fwd = base_forward if c == C.BASE else (lambda m=models[c]: m(input_ids=ids, labels=ids))
        memory[label] = saved_tensor_bytes(models[c], _adapter_types(c), fwd)
    base_total = memory[labels[C.BASE]]["total_bytes"]
    for mem in memory.values():
        mem["extra_vs_base_bytes"] = mem["total_bytes"] - base_total
    log("train: saved-tensor accounting done")

    run = run_interleaved(cases, reps * TRAIN_ROUNDS_PER_REP, warmup, label="train")
    t = {c: run["times"][c]["seconds"] for c in (C.ROADKIT, C.PEFT_ROAD)}
    t_base = run["times"][labels[C.BASE]]["seconds"]
    vs_peft = ratio_stats(t[C.ROADKIT], t[C.PEFT_ROAD])
    # What any adapter could reach against PEFT RoAd: one that cost nothing would take the base
    # model's step. And roadkit's own cost (its step minus the base's) as a share of PEFT RoAd's.
    medians = {c: statistics.median(xs) for c, xs in (*t.items(), ("base", t_base))}
    bound = {
        "zero_cost_adapter_over_peft_road": ratio_stats(t_base, t[C.PEFT_ROAD]),
        "roadkit_overhead_over_peft_road_overhead": (medians[C.ROADKIT] - medians["base"])
        / (medians[C.PEFT_ROAD] - medians["base"]),
    }
    models.clear()
    opts.clear()
    return {
        "setup": {
            "model": s.train_model.as_dict(),
            "batch": s.train_batch,
            "seq_len": s.train_len,
            "step": (
                "zero_grad; model(input_ids, labels=input_ids).loss.backward(); "
                "AdamW(lr=1e-3).step() on the adapter parameters"
            ),
        },
        "rounds": reps * TRAIN_ROUNDS_PER_REP,
        "parity": parity,
        "cases": info,
        "memory": memory,
        "roadkit_over_peft_road": vs_peft,
        "bound": bound,
        "raw": run["times"],
        "orders": run["orders"],
        "summary": _summaries(run["times"], labels[C.BASE]),
    }


# ---- 6. merge ---------------------------------------------------------------------------------------


def merge(s: Settings, reps: int, warmup: int) -> dict:
    d = s.merge_dim
    torch.manual_seed(s.seed + 3)
    lin = nn.Linear(d, d, device=s.device)
    w0, b0 = lin.weight.detach().clone(), lin.bias.detach().clone()
    torch.manual_seed(s.seed + 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rk = C.make_roadkit(nn.Sequential(lin), 1, targets=["0"], task_type=None)
        pr = C.make_peft_road_like(rk, nn.Sequential(lin), 1, targets=["0"], task_type=None)
    models = {C.ROADKIT: rk, C.PEFT_ROAD: pr}
    layers = {
        C.ROADKIT: next(layer for _, layer in rk.road_layers()).get_base_layer(),
        C.PEFT_ROAD: pr.get_base_model()[0].get_base_layer(),
    }
    for c, layer in layers.items():
        assert layer is not lin and torch.equal(layer.weight, w0), c
    x = torch.randn(4, d, device=s.device)
    with torch.no_grad():
        ya, yb = rk(x), pr(x)
    parity = {"max_abs_diff_outputs": (ya - yb).abs().max().item()}
    if parity["max_abs_diff_outputs"] > 1e-4:
        raise AssertionError(f"roadkit and PEFT RoAd disagree on the merge layer: {parity}")

    errors = {c: {"weight_rel": [], "bias_rel": []} for c in models}
    merged_weights: dict[str, torch.Tensor] = {}

    def case(c):
        model, layer = models[c], layers[c]

        def fn():
            with torch.no_grad():  # start every repetition from the original weights
                layer.weight.data.copy_(w0)
                layer.bias.data.copy_(b0)
            _sync(s)
            t0 = time.perf_counter()
            model.merge_adapter()
            _sync(s)
            t1 = time.perf_counter()
            if c not in merged_weights:
                merged_weights[c] = layer.weight.detach().clone()
            t2 = time.perf_counter()
            model.unmerge_adapter()
            _sync(s)
            t3 = time.perf_counter()
            with torch.no_grad():
                errors[c]["weight_rel"].append(((layer.weight - w0).abs().max() / w0.abs().max()).item())
                errors[c]["bias_rel"].append(((layer.bias - b0).abs().max() / b0.abs().max()).item())
            return {"merge": t1 - t0, "unmerge": t3 - t2, "merge+unmerge": (t1 - t0) + (t3 - t2)}

        return fn

    cases = {c: case(c) for c in models}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run = run_interleaved(cases, reps, warmup, label="merge")
    diff = merged_weights[C.ROADKIT] - merged_weights[C.PEFT_ROAD]
    parity["max_abs_diff_merged_weights"] = diff.abs().max().item()
    summary = {c: {m: summarize(v) for m, v in run["times"][c].items()} for c in models}
    speedup = {
        m: summary[C.PEFT_ROAD][m]["median"] / summary[C.ROADKIT][m]["median"]
        for m in ("merge", "unmerge", "merge+unmerge")
    }
    return {
        "setup": {
            "layer": f"nn.Linear({d}, {d}) with bias, in nn.Sequential, target_modules=['0']",
            "adapter": f"{VARIANT}, group_size {GROUP_SIZE}, init_weights=False",
            "timed": ("merge_adapter() and unmerge_adapter(), weights reset to the original before each rep"),
        },
        "parity": parity,
        "raw": run["times"],
        "orders": run["orders"],
        "summary": summary,
        "speedup_peft_over_roadkit": speedup,
        "unmerge_error": {c: {k: max(v) for k, v in e.items()} for c, e in errors.items()},
        "unmerge_error_all_reps": errors,
    }


# ---- 7. kernels -------------------------------------------------------------------------------------

KERNEL_ADAPTERS = 64  # rows of the coefficient table in the mixed-batch kernel


def kernels(s: Settings, reps: int, warmup: int) -> dict:
    """roadkit's rotation kernels against a device-to-device copy of the same tensor.

    Every kernel here is memory-bound: it reads x (and gy) once and writes one tensor, so its
    speed is best stated as effective bandwidth, the bytes it must move over its time, next to
    `y.copy_(x)`, which moves the same bytes with no arithmetic. On CUDA the Triton kernels run;
    elsewhere the torch path (the one the inference cache feeds: coefficients packed once).
    """
    from roadkit import functional as F
    from roadkit import kernels as K
    from roadkit.kernels import torch_ops

    rows, d = s.kernel_shape
    dtype = getattr(torch, s.dtype)
    torch.manual_seed(s.seed + 23)
    x = torch.randn(rows, d, device=s.device).to(dtype)
    gy = torch.randn(rows, d, device=s.device).to(dtype)
    y = torch.empty_like(x)
    n_par = F.parameter_length(VARIANT, d)
    theta = 0.5 * torch.randn(KERNEL_ADAPTERS, n_par, device=s.device)
    alpha = 1 + 0.1 * torch.randn(KERNEL_ADAPTERS, n_par, device=s.device)
    coeffs = [F.coefficients(VARIANT, GROUP_SIZE, t, a) for t, a in zip(theta, alpha, strict=True)]
    c, sn = coeffs[0]
    tables = (torch.stack([q[0] for q in coeffs]), torch.stack([q[1] for q in coeffs]))
    shifted, shifted_table = F.prepare((c, sn), GROUP_SIZE), F.prepare(tables, GROUP_SIZE)
    index = torch.randint(0, KERNEL_ADAPTERS, (rows,), device=s.device)
    # vLLM serving (roadkit.integrations.vllm): one table row per slot plus the identity, half the slots at half
    # the group size, each row's group size read by the kernel; slot -1 (no adapter) included.
    from roadkit.kernels import custom_ops

    slot_c = torch.cat((tables[0], torch.ones(1, d, device=s.device))).float().contiguous()
    slot_s = torch.cat((tables[1], torch.zeros(1, d, device=s.device))).float().contiguous()
    slot_half = torch.tensor(
        [GROUP_SIZE // 2 >> (i % 2) for i in range(KERNEL_ADAPTERS)] + [1], dtype=torch.int32, device=s.device
    )
    slot_index = torch.randint(-1, KERNEL_ADAPTERS, (rows,), device=s.device)
    slots_label = f"roadkit::rotate_slots (vLLM), {KERNEL_ADAPTERS} slots, 2 group sizes mixed"

    ops = {
        "copy: y.copy_(x)": (lambda: y.copy_(x), 2),
        "roadkit forward": (lambda: K.forward(x, c, sn, GROUP_SIZE, -1, shifted), 2),
        f"roadkit forward, {KERNEL_ADAPTERS} adapters mixed (one per row)": (
            lambda: K.forward_indexed(x, *tables, index, GROUP_SIZE, -1, shifted_table),
            2,
        ),
        "roadkit backward (dx, dc, ds)": (lambda: K.backward(gy, x, c, sn, GROUP_SIZE, -1, True), 3),
        slots_label: (lambda: custom_ops.rotate_slots(x, slot_c, slot_s, slot_half, slot_index), 2),
    }

    # The kernels must be right before they are fast: each against the reference torch
    # implementation in float64 (on CUDA that compares Triton with torch).
    x64, gy64, c64, s64 = x.double(), gy.double(), c.double(), sn.double()
    ref = {
        "roadkit forward": torch_ops.rotate_values(x64, c64, s64, GROUP_SIZE),
        f"roadkit forward, {KERNEL_ADAPTERS} adapters mixed (one per row)": torch_ops.rotate_values(
            x64, tables[0].double()[index], tables[1].double()[index], GROUP_SIZE
        ),
        "roadkit backward (dx, dc, ds)": torch_ops.backward(gy64, x64, c64, s64, GROUP_SIZE, 1, True),
        slots_label: torch_ops.rotate_slot_rows(
            x64, slot_c.double(), slot_s.double(), slot_half, torch.where(slot_index < 0, KERNEL_ADAPTERS, slot_index)
        ),
    }
    errors = {}
    for label, want in ref.items():
        got = ops[label][0]()
        pairs = zip(got, want, strict=True) if isinstance(want, tuple) else [(got, want)]
        errors[label] = max(((g.double() - w).abs().max() / w.abs().max()).item() for g, w in pairs)
    if max(errors.values()) > (1e-5 if dtype == torch.float32 else 1e-2):
        raise AssertionError(f"kernel results disagree with the float64 reference: {errors}")

    def case(fn):
        def timed():
            _sync(s)
            t0 = time.perf_counter()
            for _ in range(s.kernel_calls):
                fn()
            _sync(s)
            return {"seconds": (time.perf_counter() - t0) / s.kernel_calls}

        return timed

    run = run_interleaved({label: case(fn) for label, (fn, _) in ops.items()}, reps, warmup, label="kernels")
    tensor_bytes = x.numel() * x.element_size()
    summary = {}
    for label, (_, n_tensors) in ops.items():
        st = summarize(run["times"][label]["seconds"])
        summary[label] = {
            "stats": st,
            "bytes": n_tensors * tensor_bytes,
            "gb_per_s": n_tensors * tensor_bytes / st["median"] / 1e9,
        }
    copy_bw = summary["copy: y.copy_(x)"]["gb_per_s"]
    for row in summary.values():
        row["fraction_of_copy_bandwidth"] = row["gb_per_s"] / copy_bw
    return {
        "setup": {
            "shape": [rows, d],
            "dtype": s.dtype,
            "device": s.device,
            "implementation": K.implementation(x),
            "calls_per_sample": s.kernel_calls,
            "adapter": f"{VARIANT}, group_size {GROUP_SIZE}",
            "bytes": "tensors each op must read or write, times their size (coefficients not counted)",
        },
        "max_rel_error_vs_float64": errors,
        "raw": run["times"],
        "orders": run["orders"],
        "summary": summary,
    }


# ---- 8. overhead ------------------------------------------------------------------------------------


def _describe_source(src: str) -> str:
    """`src` and, when it is in a git checkout, its commit."""
    import subprocess

    try:
        out = subprocess.run(["git", "-C", src, "log", "-1", "--format=%h %s"], capture_output=True, text=True)
    except OSError:
        return src
    return f"{src} (commit {out.stdout.strip()[:100]})" if out.returncode == 0 else src


OVERHEAD_LAYERS, OVERHEAD_WIDTH, OVERHEAD_ROWS, OVERHEAD_ADAPTERS = 28, 128, 4, 4
OVERHEAD_CALLS = 50  # forward calls per timed sample
OVERHEAD_ROUNDS_PER_REP = 8


def overhead(s: Settings, reps: int, warmup: int) -> dict:
    """The fixed cost of an adapter wrapper per call: Python, op dispatch and, on a GPU, launches.

    A stack of 28 tiny nn.Linear(128, 128) layers (as many as the decode model adapts) runs on 4
    rows, so the arithmetic is negligible and (time - base time) / 28 is what each adapted layer
    adds to every call. This is what bounds eager decoding on a GPU, where the weights stream
    fast and every step pays it once per adapted layer. Mixed cases pass `adapter_names` on every
    call, one of 4 adapters per row, as a serving loop does.
    """
    targets = [str(i) for i in range(OVERHEAD_LAYERS)]
    torch.manual_seed(s.seed + 29)
    base = nn.Sequential(*[nn.Linear(OVERHEAD_WIDTH, OVERHEAD_WIDTH) for _ in range(OVERHEAD_LAYERS)])
    base = base.to(s.device).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rk = C.make_roadkit(base, OVERHEAD_ADAPTERS, targets=targets, task_type=None).eval()
        pr = C.make_peft_road_like(rk, base, OVERHEAD_ADAPTERS, targets=targets, task_type=None).eval()
        lo = C.make_peft_lora(base, OVERHEAD_ADAPTERS, targets=targets, task_type=None, seed=s.seed + 2).eval()
        baselines = {}  # other roadkit versions, with roadkit's adapter values
        for label, src in s.baselines.items():
            package = C.load_baseline(label, src)
            old = C.make_roadkit(base, OVERHEAD_ADAPTERS, targets=targets, task_type=None, package=package)
            old.load_state_dict(rk.state_dict())
            baselines[f"{C.ROADKIT} ({label})"] = old.eval()
    floor = C.make_floor(base, targets=targets).eval()
    x = torch.randn(OVERHEAD_ROWS, OVERHEAD_WIDTH, device=s.device)
    names = _names(OVERHEAD_ROWS, OVERHEAD_ADAPTERS)
    with torch.inference_mode():
        parity = {
            "max_abs_diff_single": (rk(x) - pr(x)).abs().max().item(),
            "max_abs_diff_mixed": (rk(x, adapter_names=names) - pr(x, adapter_names=names)).abs().max().item(),
        }
        for case, old in baselines.items():
            parity[f"max_abs_diff_single vs {case}"] = (rk(x) - old(x)).abs().max().item()
            parity[f"max_abs_diff_mixed vs {case}"] = (
                (rk(x, adapter_names=names) - old(x, adapter_names=names)).abs().max().item()
            )
    if max(parity.values()) > 1e-4:
        raise AssertionError(f"roadkit and PEFT RoAd disagree on the overhead stack: {parity}")

    def case(model: nn.Module, mixed: bool):
        kw = {"adapter_names": names} if mixed else {}

        def fn():
            with torch.inference_mode():
                _sync(s)
                t0 = time.perf_counter()
                for _ in range(OVERHEAD_CALLS):
                    model(x, **kw)
                _sync(s)
                return {"seconds": (time.perf_counter() - t0) / OVERHEAD_CALLS}

        return fn

    cases = {"base": case(base, False), C.FLOOR: case(floor, False)}
    contenders = [(C.ROADKIT, rk), *baselines.items(), (C.PEFT_ROAD, pr), (C.PEFT_LORA, lo)]
    for c, model in contenders:
        cases[f"{c} (1 adapter)"] = case(model, False)
    for c, model in contenders:
        cases[f"{c} ({OVERHEAD_ADAPTERS} adapters mixed, routed per call)"] = case(model, True)
    run = run_interleaved(cases, reps * OVERHEAD_ROUNDS_PER_REP, warmup, label="overhead")
    summary = _summaries(run["times"], "base")
    base_median = summary["base"]["stats"]["median"]
    for row in summary.values():
        row["per_layer_seconds"] = (row["stats"]["median"] - base_median) / OVERHEAD_LAYERS
    return {
        "setup": {
            "layers": OVERHEAD_LAYERS,
            "width": OVERHEAD_WIDTH,
            "rows": OVERHEAD_ROWS,
            "adapters": OVERHEAD_ADAPTERS,
            "calls_per_sample": OVERHEAD_CALLS,
            "rounds": reps * OVERHEAD_ROUNDS_PER_REP,
            "device": s.device,
            "baselines": {label: _describe_source(src) for label, src in s.baselines.items()},
        },
        "parity": parity,
        "raw": run["times"],
        "orders": run["orders"],
        "summary": summary,
    }
