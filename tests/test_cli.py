"""The `roadkit` command line, run as `python -m roadkit ...` subprocesses on a tiny model in tmp_path.

Each subprocess pays for importing torch (and transformers where a model loads), so runs are shared:
one training run serves the inspect, merge, generate and peft tests, and the bad-input cases run
side by side.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch

from roadkit.app.demo import build_model, build_tokenizer, task_examples

# One thread per subprocess: the models are tiny, and the cases run side by side on a few cores.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
PNG = b"\x89PNG\r\n\x1a\n"
TRAIN_ARGS = ["--targets", "all-linear", "--max-steps", "6", "--batch-size", "4", "--lr", "1e-2", "--eval-every", "3"]


def roadkit(*args: str, cwd, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "roadkit", *map(str, args)],
        cwd=cwd,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start(*args: str, cwd) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "roadkit", *map(str, args)],
        cwd=cwd,
        env=ENV,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A tiny Llama with a character tokenizer, and prompt/completion data, in one directory."""
    root = tmp_path_factory.mktemp("cli")
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, hidden_size=64, num_layers=1, intermediate_size=128)
    model.save_pretrained(root / "tiny")
    tokenizer.save_pretrained(root / "tiny")
    for split, n in (("train", 24), ("eval", 8)):
        write_jsonl(
            root / f"{split}.jsonl",
            [{"prompt": e.prompt, "completion": e.completion} for e in task_examples("upper", split, n)],
        )
    return root


@pytest.fixture(scope="module")
def trained(work):
    """One `roadkit train` run (6 steps, all-linear)."""
    result = roadkit(
        "train",
        "--model",
        "tiny",
        "--data",
        "train.jsonl",
        "--eval-data",
        "eval.jsonl",
        "--output",
        "run",
        *TRAIN_ARGS,
        cwd=work,
    )
    assert result.returncode == 0, result.stderr
    return work / "run", result


def load_tiny(work):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(work / "tiny").eval()


def probe():
    return torch.randint(4, 60, (2, 10), generator=torch.Generator().manual_seed(1))


def test_train_writes_a_run_that_roadkit_and_peft_load(work, trained):
    run, result = trained
    assert {
        "adapter_config.json",
        "adapter_model.safetensors",
        "training_log.json",
        "loss_curve.png",
        "checkpoint",
    } <= set(os.listdir(run))
    assert "wrote run" in result.stdout
    log = json.loads((run / "training_log.json").read_text())
    assert log["status"] == "completed" and log["step"] == log["total_steps"] == 6
    assert [e["step"] for e in log["train"]] == [1, 2, 3, 4, 5, 6]
    assert [e["step"] for e in log["eval"]] == [0, 3, 6]
    assert log["eval"][-1]["loss"] < log["eval"][0]["loss"]
    assert (run / "loss_curve.png").read_bytes().startswith(PNG)

    from peft import PeftModel

    from roadkit import RoadModel

    ours = RoadModel.from_pretrained(load_tiny(work), run)
    theirs = PeftModel.from_pretrained(load_tiny(work), run).eval()
    with torch.no_grad():
        adapted, base = ours(input_ids=probe()).logits, load_tiny(work)(input_ids=probe()).logits
        torch.testing.assert_close(theirs(input_ids=probe()).logits, adapted, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(adapted, base)


def test_inspect_prints_a_table_and_writes_heatmaps(work, trained):
    result = roadkit("inspect", "run", "--plot", "heat.png", cwd=work)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:4] == ["layer", "d_out", "theta/alpha", "variant"]
    rows = [line for line in lines if line.startswith("model.layers.")]
    assert len(rows) == 7 and all("road_1" in r for r in rows)  # q k v o gate up down
    assert "7 RoAd layers" in result.stdout
    assert (work / "heat.png").read_bytes().startswith(PNG)


def test_merge_writes_a_model_that_reproduces_the_adapted_logits(work, trained):
    result = roadkit("merge", "--model", "tiny", "--adapter", "run", "--output", "merged", cwd=work)
    assert result.returncode == 0, result.stderr
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from roadkit import RoadModel

    merged = AutoModelForCausalLM.from_pretrained(work / "merged").eval()
    assert any(name.endswith(".safetensors") for name in os.listdir(work / "merged"))
    assert AutoTokenizer.from_pretrained(work / "merged")("ab").input_ids == build_tokenizer()("ab").input_ids
    adapted = RoadModel.from_pretrained(load_tiny(work), work / "run")
    with torch.no_grad():
        torch.testing.assert_close(
            merged(input_ids=probe()).logits, adapted(input_ids=probe()).logits, rtol=1e-5, atol=1e-5
        )


def test_generate_mixed_batch_equals_single_runs(work, trained):
    from roadkit import RoadConfig, RoadModel, get_peft_model
    from roadkit.app.generation import generate

    torch.manual_seed(0)  # a second, random (not identity) adapter, so routing visibly matters
    get_peft_model(load_tiny(work), RoadConfig(target_modules="all-linear", init_weights=False)).save_pretrained(
        work / "random"
    )
    prompts = [("a", "kitten ->"), ("b", "kitten ->"), ("base", "kitten ->"), ("b", "bo ->"), ("__base__", "mu ->")]
    result = roadkit(
        "generate",
        "--model",
        "tiny",
        "--adapter",
        "a=run",
        "--adapter",
        "b=random",
        "--json",
        "--max-new-tokens",
        "6",
        *[x for name, text in prompts for x in ("--prompt", f"{name}:{text}")],
        cwd=work,
    )
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [(r["adapter"], r["prompt"]) for r in rows] == prompts
    tokenizer = build_tokenizer()
    for (name, text), row in zip(prompts, rows, strict=True):
        if name in ("base", "__base__"):
            model = load_tiny(work)
        else:
            model = RoadModel.from_pretrained(load_tiny(work), work / ("run" if name == "a" else "random"))
        assert generate(model, tokenizer, [text], None, max_new_tokens=6) == [row["completion"]], (name, text)
    assert rows[1]["completion"] != rows[2]["completion"]


TRAIN_1 = ["train", "--model", "tiny", "--data", "train.jsonl", "--max-steps", "1"]
BAD_INPUTS = {  # name: (arguments, what the one-line message says, an output directory that must not appear)
    "missing data": (
        ["train", "--model", "tiny", "--data", "nope.jsonl", "--output", "o1"],
        "nope.jsonl: no such file",
        "o1",
    ),
    "malformed jsonl": (
        ["train", "--model", "tiny", "--data", "bad.jsonl", "--output", "o2"],
        "bad.jsonl:3: not valid JSON",
        "o2",
    ),
    "missing model": (
        ["train", "--model", "./nomodel", "--data", "train.jsonl", "--output", "o3"],
        "nomodel' does not exist",
        "o3",
    ),
    "absent targets": ([*TRAIN_1, "--targets", "nonexistent_proj", "--output", "o4"], "nonexistent_proj", "o4"),
    "group size": ([*TRAIN_1, "--group-size", "48", "--output", "o5"], "not divisible by group_size=48", "o5"),
    "existing output": ([*TRAIN_1, "--output", "taken"], "already exists", None),
    "missing adapter": (
        ["merge", "--model", "tiny", "--adapter", "noadapter", "--output", "o6"],
        "'noadapter' does not exist",
        "o6",
    ),
    "not an adapter": (
        ["merge", "--model", "tiny", "--adapter", "tiny", "--output", "o7"],
        "no adapter_config.json",
        "o7",
    ),
    "unrouted prompt": (
        ["generate", "--model", "tiny", "--adapter", "a=run", "--adapter", "b=run", "--prompt", "x:hello"],
        "does not say which adapter",
        None,
    ),
    "resume nothing": (["train", "--output", "o8", "--resume"], "no run directory", "o8"),
    "resume with other settings": (
        ["train", "--output", "run", "--resume", "--lr", "0.5"],
        "--lr 0.5 differs from the run's 0.01",
        None,
    ),
    "inspect a model": (["inspect", "tiny"], "no adapter_config.json", None),
}
# These run as real `python -m roadkit` processes (side by side); the rest call `roadkit.app.cli.main` in this
# process, which is the same code minus the interpreter start (2-3 s each).
IN_SUBPROCESS = ("malformed jsonl", "group size", "existing output", "unrouted prompt")


def files(directory):
    """{relative path: bytes} of every file under `directory`."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in directory.rglob("*") if p.is_file()}


@pytest.fixture
def bad_input_files(work, trained):
    (work / "bad.jsonl").write_text('{"prompt": "a", "completion": "b"}\n\n{"prompt": "a" "completion": "b"}\n')
    (work / "taken").mkdir(exist_ok=True)
    (work / "taken" / "keep.txt").write_text("mine")
    run = trained[0]
    before = files(run)
    yield work
    assert (work / "taken" / "keep.txt").read_text() == "mine"
    assert files(run) == before
    assert not [n for n in os.listdir(work) if ".tmp-" in n or ".old-" in n]


def check_failure(name: str, code: int, err: str, work) -> None:
    _, message, output = BAD_INPUTS[name]
    assert code == 1, (name, err)
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, (name, err)
    assert err.startswith("roadkit ") and ": error: " in err and message in err, (name, err)
    assert output is None or not (work / output).exists(), name


def test_bad_inputs_in_subprocesses(bad_input_files):
    work = bad_input_files
    procs = {name: start(*BAD_INPUTS[name][0], cwd=work) for name in IN_SUBPROCESS}
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=180)
        check_failure(name, proc.returncode, err, work)


@pytest.mark.parametrize("name", [n for n in BAD_INPUTS if n not in IN_SUBPROCESS])
def test_bad_inputs_in_process(name, bad_input_files, monkeypatch, capsys):
    from transformers.utils import logging

    from roadkit.app.cli import main

    monkeypatch.chdir(bad_input_files)
    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    try:
        code = main(BAD_INPUTS[name][0])
    finally:  # the command quiets transformers; leave this process as it was
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()
    check_failure(name, code, capsys.readouterr().err, bad_input_files)


def test_sigint_saves_a_checkpoint_that_resume_continues(work):
    proc = start(
        "train",
        "--model",
        "tiny",
        "--data",
        "train.jsonl",
        "--eval-data",
        "eval.jsonl",
        "--eval-every",
        "1",
        "--output",
        "interrupted",
        "--max-steps",
        "100000",
        "--batch-size",
        "4",
        cwd=work,
    )
    seen = [proc.stdout.readline() for _ in range(2)]  # the plan, then the first eval: the loop is running
    assert "Ctrl-C saves a checkpoint" in seen[0] and seen[1].startswith("step 1/100000"), (seen, proc.poll())
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted at step" in err and "--resume" in err
    log = json.loads((work / "interrupted" / "training_log.json").read_text())
    assert log["status"] == "interrupted" and log["step"] >= 1
    steps = log["step"]

    result = roadkit("train", "--output", "interrupted", "--resume", "--max-steps", steps + 2, cwd=work)
    assert result.returncode == 0, result.stderr
    log = json.loads((work / "interrupted" / "training_log.json").read_text())
    assert log["status"] == "completed" and log["step"] == steps + 2
    assert [e["step"] for e in log["train"]] == list(range(1, steps + 3))


def test_demo_fast(tmp_path):
    started = time.perf_counter()
    result = roadkit("demo", "--fast", "--output", "demo", cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "demo"
    assert str(out) in result.stdout
    summary = json.loads((out / "summary.json").read_text())
    for task, numbers in summary["tasks"].items():
        assert numbers["eval_loss_after"] < 0.8 * numbers["eval_loss_before"], (task, numbers)
        assert (out / "adapters" / task / "adapter_model.safetensors").is_file()
    assert summary["merge"]["max_abs_logit_difference"] < 1e-4 and summary["merge"]["same_generations"]
    assert {"base", "upper", "reverse", "prompt"} == set(summary["mixed_batch"][0])
    for name in (
        "summary.md",
        "loss_curves.png",
        "angles_upper.png",
        "merged-upper/config.json",
        "base/tokenizer.json",
    ):
        assert (out / name).is_file(), name
    # the command the demo suggests runs without a base-model warning: the adapters name the copied base
    suggested = shlex.split(result.stdout.strip().splitlines()[-1].removeprefix("try: roadkit "))
    again = roadkit(*suggested, cwd=tmp_path, timeout=300)
    assert again.returncode == 0 and "warning" not in again.stderr, again.stderr
    assert again.stdout.count(" -> ") == 3
    print(f"demo --fast took {time.perf_counter() - started:.1f} s")


# ---- in-process regressions: `roadkit.app.cli.main` in this process ---------------------------------


def cli(args, capsys, cwd, monkeypatch):
    """`roadkit ARGS` in this process, in `cwd`; returns (exit code, stdout, stderr)."""
    from transformers.utils import logging

    from roadkit.app.cli import main

    monkeypatch.chdir(cwd)
    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    try:
        code = main([str(a) for a in args])
    finally:  # the command quiets transformers; leave this process as it was
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()
    out, err = capsys.readouterr()
    return code, out, err


SMALL = [
    "--model",
    "tiny",
    "--data",
    "train.jsonl",
    "--targets",
    "all-linear",
    "--batch-size",
    "4",
    "--lr",
    "1e-2",
    "--no-progress",
    "--device",
    "cpu",
]


def one_line_error(code, err, *fragments):
    assert code == 1, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert all(f in err for f in fragments), err


def no_leftovers(parent):
    return not [n for n in os.listdir(parent) if ".tmp-" in n or ".old-" in n]


def test_resume_keeps_user_files_extends_the_schedule_and_checks_eval_data(work, tmp_path, capsys, monkeypatch):
    eval_copy = write_jsonl(
        tmp_path / "eval.jsonl", [json.loads(line) for line in (work / "eval.jsonl").read_text().splitlines()]
    )
    code, _, err = cli(
        ["train", *SMALL, "--eval-data", eval_copy, "--max-steps", "2", "--output", tmp_path / "r"],
        capsys,
        work,
        monkeypatch,
    )
    assert code == 0, err
    run = tmp_path / "r"
    code, _, err = cli(["inspect", run, "--plot", run / "angles.png"], capsys, work, monkeypatch)
    assert code == 0, err
    (run / "notes").mkdir()
    (run / "notes" / "mine.txt").write_text("mine")

    code, out, err = cli(["train", "--output", run, "--resume", "--max-steps", "4"], capsys, work, monkeypatch)
    assert code == 0, err
    assert "done: 2 steps" in out  # this session's steps, not the run's 4
    assert (run / "angles.png").read_bytes().startswith(PNG) and (run / "notes" / "mine.txt").read_text() == "mine"
    log = json.loads((run / "training_log.json").read_text())
    assert log["step"] == 4
    # the new steps follow the new (4-step) schedule, not the finished 2-step one (lr 0)
    assert [e["lr"] for e in log["train"][2:]] == pytest.approx([1e-2 * 2 / 4, 1e-2 * 1 / 4])
    assert no_leftovers(tmp_path)

    eval_copy.write_text(eval_copy.read_text() + json.dumps({"prompt": "x ->", "completion": " X"}) + "\n")
    code, _, err = cli(["train", "--output", run, "--resume", "--max-steps", "6"], capsys, work, monkeypatch)
    one_line_error(code, err, "held-out data", "changed")

    state = run / "checkpoint" / "optimizer.pt"
    state.write_bytes(state.read_bytes()[:200])  # truncated
    code, _, err = cli(["train", "--output", run, "--resume", "--max-steps", "6"], capsys, work, monkeypatch)
    one_line_error(code, err, "optimizer.pt")
    assert (run / "angles.png").is_file() and (run / "notes" / "mine.txt").is_file()


def test_overwrite_refuses_an_output_that_holds_the_eval_data(work, tmp_path, capsys, monkeypatch):
    out = tmp_path / "o"
    out.mkdir()
    held_out = write_jsonl(out / "eval.jsonl", [{"prompt": "a ->", "completion": " A"}])
    code, _, err = cli(
        ["train", *SMALL, "--eval-data", held_out, "--max-steps", "1", "--output", out, "--overwrite"],
        capsys,
        work,
        monkeypatch,
    )
    one_line_error(code, err, "holds the input")
    assert held_out.is_file()


def test_ctrl_c_while_saving_keeps_the_completed_run(work, tmp_path, capsys, monkeypatch):
    import roadkit.app.training

    write_run = roadkit.app.training.write_run

    def interrupted_write(directory, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)  # even twice
        write_run(directory, *args, **kwargs)

    monkeypatch.setattr(roadkit.app.training, "write_run", interrupted_write)
    code, out, err = cli(["train", *SMALL, "--max-steps", "1", "--output", tmp_path / "r"], capsys, work, monkeypatch)
    assert code == 0, err
    assert json.loads((tmp_path / "r" / "training_log.json").read_text())["status"] == "completed"
    assert no_leftovers(tmp_path)


def test_sigterm_saves_a_checkpoint_and_no_staging_dir_exists_while_training(work, tmp_path, capsys, monkeypatch):
    from roadkit.app.training import RunLog

    def sigterm_kills(signum, frame):
        raise SystemExit("SIGTERM was not handled by roadkit")

    original, seen = RunLog.on_step_begin, []

    def step(self, args, state, control, **kwargs):
        seen.append(sorted(os.listdir(tmp_path)))
        if state.global_step == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, args, state, control, **kwargs)

    monkeypatch.setattr(RunLog, "on_step_begin", step)
    previous = signal.signal(signal.SIGTERM, sigterm_kills)
    try:
        code, _, err = cli(
            ["train", *SMALL, "--max-steps", "50", "--output", tmp_path / "r"], capsys, work, monkeypatch
        )
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert code == 130, err
    assert seen and all(entries == [] for entries in seen), seen  # nothing beside the target while training
    log = json.loads((tmp_path / "r" / "training_log.json").read_text())
    assert log["status"] == "interrupted" and log["step"] == 2
    assert no_leftovers(tmp_path)


@pytest.fixture(scope="module")
def gpt2_short(work):
    """A tiny GPT-2 (learned positions) with a context of 32 tokens, and rows longer than that."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=32,
        n_embd=64,
        n_layer=1,
        n_head=4,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    GPT2LMHeadModel(config).save_pretrained(work / "gpt2short")
    tokenizer.save_pretrained(work / "gpt2short")
    write_jsonl(work / "long.jsonl", [{"text": "abcdefghij " * 6}, {"prompt": "abc ->", "completion": " ABC"}])
    return work / "gpt2short"


def test_rows_longer_than_the_context_are_cut_at_it(work, gpt2_short, tmp_path, capsys, monkeypatch):
    args = [
        "train",
        "--model",
        gpt2_short,
        "--data",
        "long.jsonl",
        "--max-steps",
        "1",
        "--no-progress",
        "--targets",
        "all-linear",
        "--device",
        "cpu",
    ]
    code, _, err = cli([*args, "--output", tmp_path / "a"], capsys, work, monkeypatch)
    assert code == 0, err
    code, _, err = cli([*args, "--max-length", "100", "--output", tmp_path / "b"], capsys, work, monkeypatch)
    assert code == 0, err
    assert [line for line in err.splitlines() if line.startswith("warning:")] == [
        "warning: --max-length 100 exceeds the model's context of 32 tokens; rows are cut at 32."
    ]

    code, _, err = cli(
        ["generate", "--model", gpt2_short, "--prompt", "abc ->", "--max-new-tokens", "30"], capsys, work, monkeypatch
    )
    one_line_error(code, err, "context of 32 tokens")


@pytest.mark.parametrize(("device", "message"), [("cuda:7", "has no cuda device"), ("bogus", "not a device name")])
def test_unusable_device_is_a_one_line_error(work, tmp_path, capsys, monkeypatch, device, message):
    if torch.cuda.is_available() and device.startswith("cuda"):
        message = "only"
    args = ["train", "--model", "tiny", "--data", "train.jsonl", "--output", tmp_path / "r", "--device", device]
    code, _, err = cli(args, capsys, work, monkeypatch)
    one_line_error(code, err, message)
    assert not (tmp_path / "r").exists()


def test_truncated_adapter_is_a_one_line_error(work, trained, tmp_path, capsys, monkeypatch):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(trained[0], broken)
    weights = broken / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    code, _, err = cli(
        ["generate", "--model", "tiny", "--adapter", f"a={broken}", "--prompt", "ab ->"], capsys, work, monkeypatch
    )
    one_line_error(code, err, "adapter_model.safetensors")
    code, _, err = cli(
        ["merge", "--model", "tiny", "--adapter", broken, "--output", tmp_path / "m"], capsys, work, monkeypatch
    )
    one_line_error(code, err, "adapter_model.safetensors")


def test_an_adapter_of_another_base_gets_a_warning(work, trained, tmp_path, capsys, monkeypatch):
    import shutil

    shutil.copytree(work / "tiny", tmp_path / "copy")
    args = ["generate", "--adapter", "a=run", "--prompt", "ab ->", "--max-new-tokens", "2"]
    code, _, err = cli([*args, "--model", tmp_path / "copy"], capsys, work, monkeypatch)
    assert code == 0, err
    assert err.count("\n") == 1 and err.startswith("warning: adapter run was trained on ") and "copy" in err, err
    code, _, err = cli([*args, "--model", "./tiny/"], capsys, work, monkeypatch)  # the same directory
    assert code == 0 and "warning" not in err, err


def test_subspace_adapters_from_the_cli_compose_by_union(work, tmp_path, capsys, monkeypatch):
    from roadkit import RoadConfig

    for shard in (0, 1):
        code, _, err = cli(
            ["train", *SMALL, "--max-steps", "1", "--subspace", f"{shard}/2", "--output", tmp_path / f"s{shard}"],
            capsys,
            work,
            monkeypatch,
        )
        assert code == 0, err
        assert RoadConfig.from_pretrained(tmp_path / f"s{shard}").subspace == {"shard": shard, "num_shards": 2}
    code, _, err = cli(
        [
            "compose",
            "--adapter",
            f"a={tmp_path / 's0'}",
            "--adapter",
            f"b={tmp_path / 's1'}",
            "--mode",
            "union",
            "--output",
            tmp_path / "both",
        ],
        capsys,
        work,
        monkeypatch,
    )
    assert code == 0, err
    code, _, err = cli(
        ["train", "--output", tmp_path / "s0", "--resume", "--subspace", "1/2", "--max-steps", "2"],
        capsys,
        work,
        monkeypatch,
    )
    one_line_error(code, err, "--subspace")
    code, _, err = cli(["train", *SMALL, "--subspace", "half", "--output", tmp_path / "x"], capsys, work, monkeypatch)
    one_line_error(code, err, "--subspace 'half'")


def strict_json(path):
    def refuse(name):
        raise ValueError(f"{name} in {path}")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_a_diverged_run_is_a_one_line_error_and_keeps_no_broken_adapter(work, tmp_path, capsys, monkeypatch):
    from safetensors.torch import load_file

    from roadkit import RoadModel

    huge = [*SMALL[: SMALL.index("--lr")], *SMALL[SMALL.index("--lr") + 2 :], "--lr", "1e30"]
    # the first step already breaks the adapter (scales of 1e30, whose products overflow): nothing to keep
    code, out, err = cli(["train", *huge, "--max-steps", "3", "--output", tmp_path / "a"], capsys, work, monkeypatch)
    one_line_error(
        code, err, "roadkit train: error: training diverged at step 1: ", "saved no adapter", "--lr (was 1e+30)"
    )
    assert "done" not in out
    log = strict_json(tmp_path / "a" / "training_log.json")
    assert (log["status"], log["diverged_at_step"], log["step"]) == ("diverged", 1, 0)
    assert [e["step"] for e in log["train"]] == [1]
    assert not (tmp_path / "a" / "adapter_model.safetensors").exists() and not (tmp_path / "a" / "checkpoint").exists()

    # warmup from 0: step 1 leaves a usable adapter, step 2 (lr 1e30 / 3) breaks it; step 1's is kept
    run = tmp_path / "b"
    code, out, err = cli(
        ["train", *huge, "--warmup-steps", "3", "--max-steps", "4", "--output", run], capsys, work, monkeypatch
    )
    one_line_error(code, err, "training diverged at step 2: ", f"kept the adapter of step 1 in {run};")
    assert "done" not in out
    log = strict_json(run / "training_log.json")
    assert (log["status"], log["diverged_at_step"], log["step"]) == ("diverged", 2, 1)
    assert all(torch.isfinite(t).all() for t in load_file(run / "adapter_model.safetensors").values())
    RoadModel.from_pretrained(load_tiny(work), run)  # its values pass the loader's check
    capsys.readouterr()  # transformers' loading bar

    code, _, err = cli(["train", "--output", run, "--resume", "--max-steps", "6"], capsys, work, monkeypatch)
    one_line_error(code, err, "diverged at step 2", "resuming it would take the same steps again")


def test_inspect_flags_an_adapter_with_nan_values(work, tmp_path, capsys, monkeypatch):
    from roadkit import RoadConfig, get_peft_model
    from roadkit.checkpoint import read_adapter, write_adapter

    model = get_peft_model(load_tiny(work), RoadConfig(group_size=64, target_modules="all-linear"))
    model.save_pretrained(tmp_path / "good")
    config, tensors = read_adapter(tmp_path / "good")
    tensors["base_model.model.model.layers.0.mlp.down_proj.road_alpha"][:3] = float("nan")
    write_adapter(tmp_path / "bad", config, tensors)
    capsys.readouterr()  # transformers' loading bar

    code, out, err = cli(["inspect", tmp_path / "good"], capsys, work, monkeypatch)
    assert code == 0 and not err and "!" not in out
    code, out, err = cli(["inspect", tmp_path / "bad"], capsys, work, monkeypatch)
    one_line_error(
        code,
        err,
        "roadkit inspect: error: adapter",
        "cannot be served: unusable values in 1 of its 7 RoAd layers, first in model.layers.0.mlp.down_proj: "
        "3 of its 64 parameters are NaN or infinite",
    )
    flagged = [line.split()[0] for line in out.splitlines() if line.split()[1:2] == ["!"]]
    assert flagged == ["model.layers.0.mlp.down_proj"]  # the table is printed all the same, the layer marked
    assert "! cannot be served" in out
