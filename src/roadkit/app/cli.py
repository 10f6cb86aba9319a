"""The `roadkit` command: argument parsing, one-line errors and exit codes; library modules do the work.

Every subcommand is a `Command` in `COMMANDS` (name, help, arguments, function); adding one is
writing its two functions and appending it there. A command returns its exit code. Errors a user
can fix print one line on stderr and exit with 1: the `RoadkitError`s roadkit raises on purpose (missing or
malformed files, a model that does not fit the adapter, an existing output), and the operating system's
refusals (a full disk, a permission denied). Any other exception is a bug: one line says so and exits with 1,
and `--debug` (or ROADKIT_DEBUG=1) prints its traceback. Ctrl-C exits with 130 (argparse's usage errors, with
2), and a closed output pipe (`roadkit inspect DIR | head -1`) with 141, quietly.
Commands that write a directory write it whole or not at all (`outputs.staged_directory`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

from ..errors import RoadkitError
from ..extras import MissingExtraError, require
from . import defaults
from .data import LOSS_ON
from .loading import is_local, one_line

EXIT_OK, EXIT_ERROR, EXIT_INTERRUPTED, EXIT_BROKEN_PIPE = 0, 1, 130, 141
DEBUG_ENV = "ROADKIT_DEBUG"  # set (to anything but "" or "0"): tracebacks, as --debug gives


class CommandError(RoadkitError):
    """A problem with the command line or its inputs, reported as one line."""


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


# ---- train -------------------------------------------------------------------------------------


def _train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="base model: a local directory, a .gguf file or a Hugging Face Hub id")
    p.add_argument(
        "--data",
        help='training data, JSONL: {"text": ...}, {"prompt": ..., "completion": ...} or {"messages": '
        '[{"role": ..., "content": ...}, ...]} (rendered with the chat template) per line',
    )
    p.add_argument("--eval-data", help="held-out JSONL data; its loss is reported during training")
    p.add_argument(
        "--output",
        required=True,
        help="run directory to write: the adapter (PEFT layout), "
        "training_log.json, loss_curve.png, checkpoint/ (for --resume)",
    )
    p.add_argument("--variant", help=f"road_1, road_2 or road_4 (default {defaults.VARIANT})")
    p.add_argument(
        "--group-size",
        type=int,
        help=f"features rotate in pairs inside groups of this size (default {defaults.GROUP_SIZE})",
    )
    p.add_argument(
        "--targets",
        help="comma-separated module names (e.g. q_proj,v_proj), or all-linear: every "
        f"linear layer but the output head (default {defaults.TARGETS})",
    )
    p.add_argument(
        "--subspace",
        metavar="SPEC",
        help="train only some rotation pairs of every layer, for "
        "`roadkit compose --mode union`: a shard k/n (e.g. 0/2), a "
        "fraction (e.g. 0.5, random pairs, seed 0) or comma-separated "
        "pair indices (default: all pairs)",
    )
    p.add_argument("--lr", type=float, help=f"peak learning rate (default {defaults.LR:g}), decayed linearly to 0")
    p.add_argument("--warmup-steps", type=int, help="linear warmup steps (default 0)")
    p.add_argument("--epochs", type=int, help="passes over the data, instead of the default step count")
    p.add_argument(
        "--max-steps",
        type=int,
        help=f"optimizer steps; overrides --epochs (default {defaults.MAX_STEPS} unless --epochs is given)",
    )
    p.add_argument(
        "--loss-on",
        choices=LOSS_ON,
        help="assistant: the loss covers the answers only (completions, assistant turns of chat rows); "
        "all: every token of every row (default assistant)",
    )
    p.add_argument("--batch-size", type=int, help=f"rows per optimizer step (default {defaults.BATCH_SIZE})")
    p.add_argument(
        "--gradient-accumulation-steps",
        type=int,
        metavar="N",
        help="compute each step's batch in N micro-batches: less memory, the same steps (default 1)",
    )
    p.add_argument(
        "--gradient-checkpointing",
        action=argparse.BooleanOptionalAction,
        help="recompute activations in the backward pass instead of keeping them: less memory, slower steps",
    )
    p.add_argument(
        "--packing",
        action="store_true",
        default=None,
        help="join each micro-batch's rows into one row without padding (attention stays inside rows; "
        "the same loss, less padding)",
    )
    quantize = p.add_mutually_exclusive_group()
    quantize.add_argument(
        "--load-in-4bit",
        dest="quantize",
        action="store_const",
        const="4bit",
        help="load the base model quantized to 4 bits (nf4, bitsandbytes; QLoRA style): the adapter trains in float32",
    )
    quantize.add_argument(
        "--load-in-8bit",
        dest="quantize",
        action="store_const",
        const="8bit",
        help="load the base model quantized to 8 bits (LLM.int8(), bitsandbytes)",
    )
    p.add_argument(
        "--report-to",
        metavar="NAMES",
        help="log to these comma-separated transformers integrations, e.g. tensorboard "
        "(events in OUTPUT/tensorboard); default none",
    )
    p.add_argument(
        "--max-length",
        type=int,
        help="tokens per row; longer rows are cut (default "
        f"{defaults.MAX_LENGTH}, or the "
        "model's context when that is shorter)",
    )
    p.add_argument(
        "--bf16", action="store_true", default=None, help="load the base model in bfloat16 (the adapter stays float32)"
    )
    p.add_argument("--eval-every", type=int, help="steps between evaluations (default: about 10 per run)")
    p.add_argument("--seed", type=int, help="seed of the data order (default 0)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the interrupted (or finished) run in --output; --max-steps / --epochs may extend it",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _report_to(value: Optional[str]) -> Optional[list[str]]:
    """--report-to: transformers' integration names, each installed (checked now, before the model loads)."""
    if value is None:
        return None
    from .loading import quiet_transformers

    quiet_transformers()  # importing the integrations imports bitsandbytes, which logs about optional kernels
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    names = list(dict.fromkeys(n.strip() for n in value.split(",") if n.strip()))
    if names == ["none"]:
        return []
    unknown = [n for n in names if n not in INTEGRATION_TO_CALLBACK]
    if not names or unknown:
        raise CommandError(
            f"--report-to {value!r}: expected comma-separated names among {', '.join(sorted(INTEGRATION_TO_CALLBACK))}"
            " (or none)."
        )
    for name in names:
        try:
            INTEGRATION_TO_CALLBACK[name]()  # what the Trainer builds: it fails when its package is missing
        except (ImportError, RuntimeError) as err:
            if name == "tensorboard":
                raise MissingExtraError(
                    "--report-to tensorboard needs tensorboard: pip install 'roadkit[tensorboard]'"
                ) from err
            raise CommandError(f"--report-to {name}: {one_line(err)}") from err
    return names


def _model_ref(name: str) -> str:
    return os.path.abspath(name) if is_local(name) else name


def _targets(value: Optional[str]) -> Any:
    if value is None or value == "all-linear":
        return value
    names = [n.strip() for n in value.split(",") if n.strip()]
    if not names:
        raise CommandError("--targets needs module names, e.g. --targets q_proj,v_proj, or all-linear.")
    return names


def _subspace(value: Optional[str]) -> Optional[dict[str, Any]]:
    """--subspace: "k/n" (a shard), a fraction ("0.5"), or comma-separated pair indices ("0,3,5"), normalised."""
    from ..subspace import normalize_spec

    if value is None:
        return None
    text = value.strip()
    try:
        if "/" in text:
            spec: Any = text
        elif any(c in text for c in ".eE"):
            spec = float(text)
        else:
            spec = [int(p) for p in text.split(",")]
        return normalize_spec(spec)
    except (ValueError, TypeError):
        raise CommandError(
            f"--subspace {value!r}: expected a shard k/n (e.g. 0/2), a fraction in (0, 1] (e.g. "
            "0.5) or comma-separated pair indices (e.g. 0,1,5)."
        ) from None


def _train_run_settings(args: argparse.Namespace) -> tuple[dict[str, Any], Optional[dict[str, Any]]]:
    """The run's settings (fresh, or those of the run being resumed) and, when resuming, its saved state."""
    from ..config import normalize_variant
    from .outputs import check_output
    from .runs import RUN_DEFAULTS, run_settings

    given = {key: getattr(args, key) for key in (*RUN_DEFAULTS, "model", "data")}
    if given["model"] is not None:
        given["model"] = _model_ref(given["model"])
    for key in ("data", "eval_data"):
        if given[key] is not None:
            given[key] = os.path.abspath(given[key])
    if given["variant"] is not None:
        given["variant"] = normalize_variant(given["variant"])
    given["targets"] = _targets(given["targets"])
    given["subspace"] = _subspace(given["subspace"])
    given["report_to"] = _report_to(given["report_to"])
    if not args.resume:
        missing = [f"--{k}" for k in ("model", "data") if given[k] is None]
        if missing:
            raise CommandError(f"{' and '.join(missing)} required (or --resume to continue a run).")
        hint = "pass --resume to continue it or --overwrite to replace it"
        inputs = [given[k] for k in ("model", "data", "eval_data") if given[k] is not None]
        check_output(args.output, args.overwrite, inputs=inputs, hint=hint)
    elif not os.path.isdir(args.output):
        raise CommandError(f"--resume: no run directory {args.output!r} to continue.")
    return run_settings(given, args.output, args.resume)


def _steps(n: int) -> str:
    """ "1 step", "2 steps"."""
    return f"{n} step" if n == 1 else f"{n} steps"


def _max_length(model: Any, run: dict[str, Any], given: Optional[int]) -> int:
    """--max-length, capped at the model's context (with a warning when it was given explicitly)."""
    from .generation import context_length

    context = context_length(model)
    if context is None or run["max_length"] <= context:
        return run["max_length"]
    if given is not None:
        print(
            f"warning: --max-length {run['max_length']} exceeds the model's context of {context} tokens; "
            f"rows are cut at {context}.",
            file=sys.stderr,
        )
    return context


def _diverged(trainer: Any, output: str, lr: float, resumed: bool) -> str:
    """The one line that reports a diverged run: the step, why, which adapter the run directory holds."""
    if trainer.step > trainer.first_step:
        kept = f"kept the adapter of step {trainer.step} in {output}"
    elif resumed:
        kept = f"kept the run's adapter of step {trainer.step} in {output}"
    else:
        kept = f"saved no adapter (no step before it was usable), only the log, in {output}"
    return (
        f"training diverged at step {trainer.diverged_at}: {trainer.divergence}; {kept}; "
        f"try a lower --lr (was {lr:g}), with --overwrite to replace the run."
    )


def _train(args: argparse.Namespace) -> int:
    """`roadkit train`, in one process or in each of several (torchrun, accelerate launch: DDP), where only the
    first process prints and writes the run directory (every process reports its errors)."""
    first = int(os.environ.get("RANK", "0")) == 0
    with contextlib.ExitStack() as quiet:
        if not first:
            devnull = quiet.enter_context(open(os.devnull, "w"))
            quiet.enter_context(contextlib.redirect_stdout(devnull))
            quiet.enter_context(contextlib.redirect_stderr(devnull))
        code = _train_run(args, first)
    _end_processes()
    return code


def _end_processes() -> None:
    """In a multi-process run, wait for every process, then stop the process group (gloo's threads, left running,
    can abort a process at exit)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _train_device(requested: Optional[str]) -> Any:
    """--device, in a multi-process run the process's own GPU (LOCAL_RANK) when it is a CUDA device."""
    import torch

    from .loading import pick_device

    device = pick_device(requested)
    if device.type == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if requested is not None and ":" in requested:
            raise CommandError(
                f"--device {requested}: with several processes each uses its own GPU (LOCAL_RANK); "
                "give --device cuda, or leave it out."
            )
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def _train_run(args: argparse.Namespace, first: bool) -> int:
    import torch

    from ..config import RoadConfig
    from ..model import RoadModel, get_peft_model
    from .data import load_samples, read_jsonl, require_chat_template
    from .loading import load_causal_lm, load_tokenizer, quiet_transformers
    from .outputs import staged_directory
    from .runs import COMPLETED, DIVERGED, TrainConfig, deferred_stop_signals

    run, state = _train_run_settings(args)
    data = {path: read_jsonl(path) for path in filter(None, (run["data"], run["eval_data"]))}  # fails before loading
    config = RoadConfig(
        variant=run["variant"], group_size=run["group_size"], target_modules=run["targets"], subspace=run["subspace"]
    )
    train_config = TrainConfig(
        lr=run["lr"],
        epochs=run["epochs"],
        max_steps=run["max_steps"],
        batch_size=run["batch_size"],
        warmup_steps=run["warmup_steps"],
        eval_every=run["eval_every"],
        seed=run["seed"],
        gradient_accumulation_steps=run["gradient_accumulation_steps"],
        gradient_checkpointing=run["gradient_checkpointing"],
        packing=run["packing"],
        report_to=tuple(run["report_to"]),
    )
    device = _train_device(args.device)
    quiet_transformers()
    tokenizer = load_tokenizer(run["model"])
    for path, rows in data.items():
        require_chat_template(tokenizer, rows, path, run["model"])
    base = load_causal_lm(
        run["model"], dtype=torch.bfloat16 if run["bf16"] else None, device=device, quantize=run["quantize"]
    )
    model = RoadModel.from_pretrained(base, args.output, is_trainable=True) if state else get_peft_model(base, config)
    max_length = _max_length(base, run, args.max_length)
    train = load_samples(run["data"], tokenizer, max_length, run["loss_on"])
    held_out = load_samples(run["eval_data"], tokenizer, max_length, run["loss_on"]) if run["eval_data"] else None
    from .training import TrainingRun, write_run  # transformers' Trainer: imported once the inputs have been checked

    trainer = TrainingRun(model, train, train_config, tokenizer, held_out)
    if state:
        trainer.resume(state)
        if trainer.step >= trainer.total_steps:
            done = (
                f"has done all its {_steps(trainer.step)}"
                if trainer.step == trainer.total_steps
                else f"already did {_steps(trainer.step)}, more than the {_steps(trainer.total_steps)} asked for"
            )
            print(
                f"nothing to do: the run in {args.output} {done}; pass a larger --max-steps or --epochs to continue it."
            )
            return EXIT_OK
    trainable = sum(p.numel() for p in trainer.params)
    first_step = trainer.step
    print(
        f"training {trainable:,d} adapter parameters for {_steps(trainer.total_steps)} "
        f"({len(train)} rows, {_batch(train_config, trainer.processes)})"
        + (f", from step {trainer.step}" if state else "")
        + "; Ctrl-C saves a checkpoint.",
        flush=True,
    )
    if trainer.tensorboard_dir is not None:
        print(f"TensorBoard events: {trainer.tensorboard_dir} (copied to {args.output}/tensorboard at the end)")
    start = time.perf_counter()
    # Signals are only recorded from here until the run directory is in place (fit() handles its own:
    # a first Ctrl-C or SIGTERM stops training to save a checkpoint), so none can throw a run away mid-save.
    with deferred_stop_signals():
        status = trainer.fit(progress=False if args.no_progress else None)
        seconds = time.perf_counter() - start
        if first:
            with staged_directory(
                args.output, keep_existing=bool(state), replace=bool(state) or args.overwrite
            ) as stage:
                write_run(stage, model, trainer, status, run)
    if status == DIVERGED:
        print(f"roadkit train: error: {_diverged(trainer, args.output, run['lr'], bool(state))}", file=sys.stderr)
        return EXIT_ERROR
    if status != COMPLETED:
        print(
            f"interrupted at step {trainer.step}/{trainer.total_steps}; checkpoint saved in {args.output}. "
            f"Continue with: roadkit train --output {args.output} --resume",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    last = trainer.log["train"][-1]["loss"] if trainer.log["train"] else float("nan")
    summary = f"done: {_steps(trainer.step - first_step)} in {seconds:.1f} s"
    if first_step:
        summary += f" (steps {first_step + 1}-{trainer.step} of the run)"
    summary += f", last train loss {last:.4f}"
    if trainer.log["eval"]:
        summary += (
            f", eval loss {trainer.log['eval'][0]['loss']:.4f} before training -> {trainer.log['eval'][-1]['loss']:.4f}"
        )
    print(f"{summary}\nwrote {args.output}")
    return EXIT_OK


def _batch(config: Any, processes: int) -> str:
    """ "batch 8", "batch 8 in 2 micro-batches", "batch 8 over 2 processes"."""
    text = f"batch {config.batch_size}"
    if config.gradient_accumulation_steps > 1:
        text += f" in {config.gradient_accumulation_steps} micro-batches"
    if processes > 1:
        text += f" over {processes} processes"
    return text


# ---- merge -------------------------------------------------------------------------------------


def _merge_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", required=True, help="base model: a local directory, a .gguf file or a Hugging Face Hub id"
    )
    p.add_argument("--adapter", required=True, help="adapter directory (PEFT layout)")
    p.add_argument("--output", required=True, help="directory for the merged model (safetensors + tokenizer)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output directory")


def _merge(args: argparse.Namespace) -> int:
    from ..checkpoint import read_adapter
    from .export import merge_adapter, save_merged
    from .loading import load_causal_lm, load_tokenizer, quiet_transformers
    from .outputs import check_output, staged_directory

    check_output(args.output, args.overwrite, inputs=[args.model, args.adapter])
    _check_adapter_dir(args.adapter)
    read_adapter(args.adapter)  # a broken adapter fails now, before the model loads
    _warn_if_other_base(args.adapter, args.model)
    quiet_transformers()
    tokenizer = load_tokenizer(args.model, required=False)
    base = load_causal_lm(args.model, dtype="auto")
    merged, difference = merge_adapter(base, args.adapter)
    with staged_directory(args.output, replace=args.overwrite) as stage:
        save_merged(merged, tokenizer, stage)
    print(
        f"merged {args.adapter} into {args.model}; largest logit difference from base + adapter on a probe "
        f"batch: {difference:.3g}\nwrote {args.output}" + ("" if tokenizer is not None else " (no tokenizer)")
    )
    return EXIT_OK


def _check_adapter_dir(path: str) -> None:
    if os.path.isfile(path):
        raise CommandError(
            f"{path!r} is a file; an adapter is a directory (adapter_config.json and adapter_model.safetensors)."
        )
    if not os.path.isdir(path):
        raise CommandError(f"adapter directory {path!r} does not exist.")


def _warn_if_other_base(adapter: str, model: str) -> None:
    """A one-line warning when the adapter records a base model other than --model (not an error: the same
    model may live at another path, or be a copy)."""
    from ..config import CONFIG_NAME
    from .loading import same_model

    try:
        with open(os.path.join(adapter, CONFIG_NAME), encoding="utf-8") as fh:
            recorded = json.load(fh).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        return  # reading the adapter reports a broken config
    if isinstance(recorded, str) and recorded and not same_model(recorded, model):
        print(
            f"warning: adapter {adapter} was trained on {recorded}, not on --model {model}; loading it anyway.",
            file=sys.stderr,
        )


# ---- export-base -------------------------------------------------------------------------------

DTYPES = ("float32", "bfloat16", "float16")


def _export_base_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", required=True, help="base model: a .gguf file (or a local directory or Hugging Face Hub id)"
    )
    p.add_argument(
        "--output", required=True, help="directory to write: config.json, model.safetensors, tokenizer files"
    )
    p.add_argument(
        "--dtype",
        choices=DTYPES,
        default="float32",
        help="weight type to write (default float32: the weights `roadkit train --model` trains on)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output directory")


def _export_base(args: argparse.Namespace) -> int:
    import torch

    from .export import save_base
    from .loading import is_gguf, load_causal_lm, load_tokenizer, quiet_transformers
    from .outputs import check_output, staged_directory

    check_output(args.output, args.overwrite, inputs=[args.model])
    quiet_transformers()
    tokenizer = load_tokenizer(args.model, required=False)  # a missing model fails here, at once
    print(f"reading {args.model}" + (" (dequantizing)" if is_gguf(args.model) else ""), flush=True)
    model = load_causal_lm(args.model, dtype=getattr(torch, args.dtype))
    with staged_directory(args.output, replace=args.overwrite) as stage:
        save_base(model, tokenizer, stage)
    if tokenizer is None:
        print(f"warning: {args.model} has no tokenizer; give vLLM one with --tokenizer.", file=sys.stderr)
    else:
        print("tokenizer" + (" and chat template" if tokenizer.chat_template else " (no chat template)") + " included")
    print(f"wrote {args.output} ({type(model).__name__}, {args.dtype})")
    return EXIT_OK


# ---- generate ----------------------------------------------------------------------------------


def _generate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", required=True, help="base model: a local directory, a .gguf file or a Hugging Face Hub id"
    )
    p.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="load the adapter in DIR under NAME (repeatable)",
    )
    p.add_argument(
        "--prompt",
        action="append",
        required=True,
        metavar="[NAME:]TEXT",
        help="a prompt, optionally prefixed by the adapter it uses (base or __base__ for none); "
        "without a prefix it uses the only adapter, or the base when there is none. "
        "Repeatable: all prompts run in one mixed batch",
    )
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate per prompt (default 32)")
    p.add_argument("--bf16", action="store_true", help="load the base model in bfloat16")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument(
        "--chat",
        action="store_true",
        help="each prompt is a user message, rendered with the tokenizer's chat template (generation prompt added)",
    )
    p.add_argument("--json", action="store_true", help="print a JSON list of {adapter, prompt, completion}")


def _parse_adapters(specs: Sequence[str]) -> dict[str, str]:
    from .generation import BASE_ALIASES

    adapters: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise CommandError(f"--adapter {spec!r}: expected NAME=DIR, e.g. --adapter upper=runs/upper.")
        if name in BASE_ALIASES or "." in name or ":" in name:
            raise CommandError(f"--adapter {spec!r}: {name!r} cannot name an adapter.")
        if name in adapters:
            raise CommandError(f"--adapter: the name {name!r} is given twice.")
        _check_adapter_dir(path)
        adapters[name] = path
    return adapters


def _parse_prompts(specs: Sequence[str], adapters: Sequence[str]) -> list[tuple[str, str]]:
    """(adapter name, prompt) pairs; a prefix counts as an adapter only if it names one (or the base)."""
    from .generation import BASE_ALIASES

    out = []
    for spec in specs:
        name, sep, text = spec.partition(":")
        if sep and (name in adapters or name in BASE_ALIASES):
            out.append((name, text))
        elif len(adapters) > 1:
            raise CommandError(
                f"--prompt {spec!r} does not say which adapter it uses; write NAME:TEXT with NAME "
                f"one of {', '.join([*adapters, 'base'])}."
            )
        else:
            out.append((adapters[0] if adapters else "base", spec))
    return out


def _generate(args: argparse.Namespace) -> int:
    import torch

    from ..model import RoadModel
    from .data import has_chat_template
    from .generation import generate
    from .loading import load_causal_lm, load_tokenizer, pick_device, quiet_transformers

    if args.max_new_tokens < 1:
        raise CommandError("--max-new-tokens must be at least 1.")
    adapters = _parse_adapters(args.adapter)
    prompts = _parse_prompts(args.prompt, list(adapters))
    device = pick_device(args.device)
    for path in adapters.values():
        _warn_if_other_base(path, args.model)
    quiet_transformers()
    tokenizer = load_tokenizer(args.model)
    if args.chat and not has_chat_template(tokenizer):
        raise CommandError(f"--chat: the tokenizer of {args.model} has no chat template to render the prompts with.")
    model = load_causal_lm(args.model, dtype=torch.bfloat16 if args.bf16 else None, device=device)
    names = None
    if adapters:
        items = iter(adapters.items())
        first, path = next(items)
        model = RoadModel.from_pretrained(model, path, adapter_name=first)
        for name, path in items:
            model.load_adapter(path, adapter_name=name)
        names = [name for name, _ in prompts]
    texts = generate(model, tokenizer, [text for _, text in prompts], names, args.max_new_tokens, chat=args.chat)
    rows = [
        {"adapter": name, "prompt": text, "completion": out} for (name, text), out in zip(prompts, texts, strict=True)
    ]
    if args.json:
        print(json.dumps(rows, indent=2, ensure_ascii=False))
    else:
        width = max(len(r["adapter"]) for r in rows)
        for r in rows:
            print(f"{r['adapter']:<{width}} | {r['prompt']!r} -> {r['completion']!r}")
    return EXIT_OK


# ---- compose -----------------------------------------------------------------------------------


def _compose_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--adapter",
        action="append",
        required=True,
        metavar="NAME=DIR",
        help="an input adapter directory (repeatable; for sequential, applied in the order given)",
    )
    p.add_argument(
        "--mode",
        choices=("sequential", "union", "interpolate"),
        default="sequential",
        help="sequential: one adapter equal to applying each in turn (default); union: adapters "
        "trained in disjoint subspaces, each pair from its owner; interpolate: weighted angles "
        "and log-scales",
    )
    p.add_argument("--weights", help="interpolate only: comma-separated weights, one per --adapter (default: equal)")
    p.add_argument("--output", required=True, help="directory for the composed adapter (PEFT layout)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output directory")


def _compose(args: argparse.Namespace) -> int:
    from ..checkpoint import read_adapter, write_adapter
    from ..composition import SavedAdapter, compose_adapters
    from .outputs import check_output, staged_directory

    adapters = _parse_adapters(args.adapter)
    check_output(args.output, args.overwrite, inputs=list(adapters.values()))
    weights = None
    if args.weights is not None:
        try:
            weights = [float(w) for w in args.weights.split(",")]
        except ValueError:
            raise CommandError(f"--weights {args.weights!r}: expected comma-separated numbers, e.g. 0.5,0.5.") from None
    inputs = [SavedAdapter(name, *read_adapter(path)) for name, path in adapters.items()]
    config, tensors = compose_adapters(inputs, args.mode, weights)
    with staged_directory(args.output, replace=args.overwrite) as stage:
        write_adapter(stage, config, tensors)
    print(
        f"composed {', '.join(adapters)} ({args.mode}) into a {config.variant} adapter over {len(tensors) // 2} "
        f"layers\nwrote {args.output}"
    )
    return EXIT_OK


# ---- inspect -----------------------------------------------------------------------------------


def _inspect_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("adapter", metavar="DIR", help="adapter directory (PEFT layout)")
    p.add_argument("--plot", metavar="PNG", help="write heatmaps of angles and scales by layer and feature group")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --plot file")


def _inspect(args: argparse.Namespace) -> int:
    from .report import format_table, inspect_adapter, plot_report

    _check_adapter_dir(args.adapter)
    if args.plot:
        if os.path.exists(args.plot) and not args.overwrite:
            raise CommandError(f"--plot {args.plot!r} already exists; pass --overwrite to replace it.")
        if not os.path.isdir(os.path.dirname(os.path.abspath(args.plot))):
            raise CommandError(f"--plot {args.plot!r}: its directory does not exist.")
    report = inspect_adapter(args.adapter)
    print(format_table(report))
    if args.plot:
        plot_report(
            report, args.plot, title=f"{args.adapter}: {report.config.variant}, group_size {report.config.group_size}"
        )
        print(f"wrote {args.plot}")
    problem = report.value_problem()
    if problem:  # the table is shown all the same; the exit code tells scripts the adapter is broken
        sys.stdout.flush()
        print(
            f"roadkit inspect: error: adapter {args.adapter} cannot be served: {problem}; the training that wrote "
            "it probably diverged (roadkit and the vLLM plugin refuse to load it).",
            file=sys.stderr,
        )
        return EXIT_ERROR
    return EXIT_OK


# ---- demo --------------------------------------------------------------------------------------


def _demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", default="roadkit-demo", help="directory to write (default: ./roadkit-demo)")
    p.add_argument("--fast", action="store_true", help="a shorter run (fewer steps), for smoke tests")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output directory")


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(args.output, fast=args.fast, overwrite=args.overwrite)
    return EXIT_OK


# ---- entry point -------------------------------------------------------------------------------

COMMANDS = [
    Command("train", "train a RoAd adapter on JSONL data", _train_arguments, _train),
    Command(
        "merge", "merge an adapter into its base model, as a standalone transformers model", _merge_arguments, _merge
    ),
    Command(
        "export-base",
        "write a base model (a .gguf file, dequantized) as a transformers directory that vLLM serves",
        _export_base_arguments,
        _export_base,
    ),
    Command(
        "generate", "generate from several adapters (and the base) in one mixed batch", _generate_arguments, _generate
    ),
    Command(
        "compose", "compose saved adapters into one (sequential, union or interpolate)", _compose_arguments, _compose
    ),
    Command("inspect", "per-layer table (and heatmaps) of a saved adapter", _inspect_arguments, _inspect),
    Command("demo", "offline end-to-end demo on a tiny model (about a minute on 2 CPU cores)", _demo_arguments, _demo),
]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with one subparser per entry of `COMMANDS`; every command takes --debug."""
    from .. import __version__

    parser = argparse.ArgumentParser(prog="roadkit", description="Train, inspect, merge and serve RoAd adapters.")
    parser.add_argument("--version", action="version", version=f"roadkit {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--debug",
        action="store_true",
        help=f"print the traceback of an error, not only its line (also: {DEBUG_ENV}=1 in the environment)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        p = sub.add_parser(command.name, help=command.help, description=command.help, parents=[common])
        command.add_arguments(p)
        p.set_defaults(run=command.run)
    return parser


def _user_message(err: BaseException) -> Optional[str]:
    """The one line for an error the user can act on; None for a bug. Besides the `RoadkitError`s roadkit raises
    on purpose, that is the operating system refusing something (an OSError with an errno: permissions, a full
    disk) and running out of memory, which a smaller batch fixes."""
    if isinstance(err, RoadkitError) or (isinstance(err, OSError) and err.errno is not None):
        return one_line(err)
    torch = sys.modules.get("torch")
    out_of_memory = getattr(torch, "OutOfMemoryError", None) or getattr(
        getattr(torch, "cuda", None), "OutOfMemoryError", None
    )
    if out_of_memory is not None and isinstance(err, out_of_memory):
        return (
            f"out of memory ({one_line(err)[:200]}); try a smaller --batch-size, --gradient-accumulation-steps, "
            "--gradient-checkpointing or --load-in-4bit."
        )
    return None


def _report(command: str, err: BaseException, debug: bool) -> int:
    """Print `err` as one line on stderr (after its traceback when debugging); returns the exit code."""
    if debug:
        traceback.print_exception(type(err), err, err.__traceback__)
    message = _user_message(err)
    if message is not None:
        print(f"roadkit {command}: error: {message}", file=sys.stderr)
    else:
        hint = "" if debug else f" Rerun with --debug (or {DEBUG_ENV}=1) for the traceback."
        print(
            f"roadkit {command}: unexpected error, probably a bug in roadkit: {type(err).__name__}: "
            f"{one_line(err).rstrip('.')}.{hint}",
            file=sys.stderr,
        )
    return EXIT_ERROR


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run `roadkit ARGS`; returns the exit code (0 ok, 1 error, 2 bad usage, 130 interrupted, 141 closed pipe)."""
    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    try:
        require("cli", f"roadkit {args.command}")
        code = args.run(args)
        sys.stdout.flush()  # a closed pipe shows here, not at exit
        return code
    except BrokenPipeError:
        # The reader went away (`roadkit inspect DIR | head -1`): say nothing, and exit as a process
        # killed by SIGPIPE would. Python's documented recipe: point stdout at devnull so the flush at
        # exit does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt:
        print(f"roadkit {args.command}: interrupted; nothing was written.", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:
        return _report(args.command, err, debug)
