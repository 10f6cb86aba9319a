"""Data parallel training on 2 CPU processes (gloo) ends with the same adapter as one process on the same batches.

Each rank takes half of every global batch; the loss is a mean over equally many tokens per rank,
and DDP averages gradients, so both runs take the same optimizer steps. Tested with torch DDP
directly, with `examples/accelerate_train.py` under `accelerate launch`, with roadkit's training
path (`TrainingRun`, the one `roadkit train` uses) under torchrun, on rows of different lengths (the
Trainer averages the loss over the tokens of all processes), and with the `roadkit train` command
itself under torchrun and accelerate launch. The model also holds an inactive
second adapter whose parameters do not require grad: DDP must leave it alone without
`find_unused_parameters`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import tiny_llama
from safetensors.torch import load_file, save_file

from roadkit import RoadConfig, RoadModel, get_peft_model

ROOT = Path(__file__).resolve().parent.parent
STEPS = 3
GLOBAL_BATCH = 4

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


def build(base: Optional[torch.nn.Module] = None) -> RoadModel:
    """`base` (default: a tiny Llama) with a road_2 adapter on every linear layer, trained, and an inactive
    road_1 adapter on q_proj."""
    model = tiny_llama(hidden=64, layers=2) if base is None else base
    torch.manual_seed(1)
    model = get_peft_model(
        model, RoadConfig(variant="road_2", group_size=32, target_modules="all-linear", init_weights=False)
    )
    model.add_adapter(
        "inactive", RoadConfig(variant="road_1", group_size=32, target_modules=["q_proj"], init_weights=False)
    )
    return model.train()


def batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 96, (GLOBAL_BATCH, 10), generator=g) for _ in range(STEPS)]


def adapters(model: RoadModel) -> dict[str, torch.Tensor]:
    return {
        f"{name}/{k}": t.detach().clone().contiguous()
        for name in model.peft_config
        for k, t in model.adapter_state_dict(name).items()
    }


def train(rank: int, world_size: int, port: int, out_dir: str) -> dict[str, torch.Tensor]:
    """N optimizer steps; rank r of `world_size` takes rows [r*b, (r+1)*b) of each global batch."""
    torch.set_num_threads(1)
    if world_size > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        model = build()
        net = torch.nn.parallel.DistributedDataParallel(model) if world_size > 1 else model
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=1e-3)
        for ids in batches():
            local = ids.chunk(world_size)[rank]
            net(input_ids=local, labels=local).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        result = adapters(model)
        if out_dir:
            save_file(result, os.path.join(out_dir, f"rank{rank}.safetensors"))
        end_process_group()
        return result
    finally:
        if dist.is_initialized():  # after an error: no barrier, the other rank may never reach it
            dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(tmp_path: Path) -> dict[str, str]:
    """The environment of a launched process: this checkout's roadkit, one thread, a private HF home."""
    return {
        **os.environ,
        "HF_HOME": str(tmp_path / "hf"),
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
    }


def torchrun(script: Path, *args: str, tmp_path: Path) -> subprocess.Popen:
    """`script ARGS` on 2 processes under torchrun, started and not waited for."""
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    launch += ["--master_port", str(free_port()), str(script), *args]
    return subprocess.Popen(
        launch, env=env(tmp_path), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def test_ddp_two_ranks_match_one_process(tmp_path):
    ranks = mp.spawn(train, args=(2, free_port(), str(tmp_path)), nprocs=2, join=False)
    single = train(0, 1, 0, "")  # while the ranks start up
    while not ranks.join():
        pass
    start = adapters(build())
    for rank in (0, 1):
        got = load_file(tmp_path / f"rank{rank}.safetensors")
        assert set(got) == set(single)
        for k in single:
            torch.testing.assert_close(got[k], single[k], rtol=0, atol=1e-6, msg=f"rank {rank}: {k}")
            if k.startswith("inactive/"):
                assert torch.equal(got[k], start[k]), k  # never trained
            else:
                assert not torch.equal(got[k], start[k]), k  # trained


def test_accelerate_example_two_processes_match_one(tmp_path):
    pytest.importorskip("accelerate")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "OMP_NUM_THREADS": "1"}  # no user accelerate config
    script = [
        str(ROOT / "examples" / "accelerate_train.py"),
        "--steps",
        "3",
        "--batch-size",
        "4",
        "--lr",
        "2e-3",
        "--cpu",
    ]
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        "0",
    ]
    procs = {
        name: subprocess.Popen(
            prefix + script + ["--output", str(tmp_path / name)],
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, prefix in (("one", [sys.executable]), ("two", launch))
    }  # both at once
    runs = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-3000:]
        runs[name] = stdout
    assert "(1 process(es))" in runs["one"] and "(2 process(es))" in runs["two"]
    one = load_file(tmp_path / "one" / "adapter_model.safetensors")
    two = load_file(tmp_path / "two" / "adapter_model.safetensors")
    assert set(one) == set(two) and any((t != 1).any() for k, t in one.items() if k.endswith("road_alpha"))
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=0, atol=1e-6, msg=k)
    assert RoadConfig.from_pretrained(tmp_path / "two").variant == "road_1"


def training_run_samples() -> list:
    """12 rows of 6-13 tokens, the first 2-4 of them an unlabelled prompt: token counts differ between ranks."""
    from roadkit.app.data import IGNORE_INDEX, Sample

    g = torch.Generator().manual_seed(2)
    rows = []
    for _ in range(12):
        length, prompt = int(torch.randint(6, 14, (1,), generator=g)), int(torch.randint(2, 5, (1,), generator=g))
        ids = torch.randint(4, 80, (length,), generator=g).tolist()
        rows.append(Sample(ids, [IGNORE_INDEX] * prompt + ids[prompt:]))
    return rows


def end_process_group() -> None:
    """Before a rank exits: wait for every rank, then stop gloo's threads (left running, they can abort the
    process at exit with "terminate called without an active exception")."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def training_run(out_dir: str, model: Optional[RoadModel] = None) -> None:
    """`STEPS` steps of `TrainingRun` on `model` (default `build()`) with the global batch `GLOBAL_BATCH`,
    checkpoints in `out_dir`."""
    from roadkit.app.demo import build_tokenizer
    from roadkit.app.runs import COMPLETED, TrainConfig
    from roadkit.app.training import TrainingRun

    torch.set_num_threads(1)
    run = TrainingRun(
        build() if model is None else model,
        training_run_samples(),
        TrainConfig(lr=1e-2, max_steps=STEPS, batch_size=GLOBAL_BATCH),
        build_tokenizer(),
        output_dir=out_dir,
    )
    assert run.fit(progress=False) == COMPLETED


def check_training_runs(one: Path, two: Path, start: dict[str, torch.Tensor]) -> None:
    """The last checkpoints of a one-process and a two-process run hold the same adapters (the default one
    trained from `start`, the inactive one left alone), and nothing of the base model."""
    for name, sub in (("default", ""), ("inactive", "inactive")):
        a = load_file(one / f"checkpoint-{STEPS}" / sub / "adapter_model.safetensors")
        b = load_file(two / f"checkpoint-{STEPS}" / sub / "adapter_model.safetensors")
        assert set(a) == set(b)
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6, msg=f"{name}: {k}")
            assert torch.equal(a[k], start[f"{name}/{k}"]) == (name == "inactive"), k  # trained, or left alone
    files = set(os.listdir(two / f"checkpoint-{STEPS}"))
    assert {"adapter_model.safetensors", "optimizer.pt", "trainer_state.json"} <= files
    assert not {f for f in files if f.startswith(("model", "pytorch_model"))}, files


def test_training_run_two_processes_match_one(tmp_path):
    proc = torchrun(Path(__file__), str(tmp_path / "two"), tmp_path=tmp_path)
    training_run(str(tmp_path / "one"))  # while the ranks start up
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    check_training_runs(tmp_path / "one", tmp_path / "two", adapters(build()))


if __name__ == "__main__":  # one rank of `test_training_run_two_processes_match_one`, under torchrun
    training_run(sys.argv[1])
    end_process_group()


def test_the_command_on_two_processes_matches_one(tmp_path):
    """`roadkit train` under torchrun and under accelerate launch (2 gloo processes) ends with the adapter of one
    process on the same global batch; only the first process prints and writes the run directory, its log, plot
    and TensorBoard events."""
    from roadkit.app.demo import BASE_DIR, task_examples

    for split, n in (("train", 16), ("eval", 4)):
        rows = [json.dumps({"prompt": e.prompt, "completion": e.completion}) for e in task_examples("upper", split, n)]
        (tmp_path / f"{split}.jsonl").write_text("\n".join(rows) + "\n")
    tensorboard = importlib.util.find_spec("tensorboard") is not None
    command = ["-m", "roadkit", "train", "--model", BASE_DIR, "--data", "train.jsonl", "--eval-data", "eval.jsonl"]
    command += ["--device", "cpu", "--max-steps", "3", "--batch-size", "4", "--lr", "1e-2", "--no-progress"]
    command += ["--report-to", "tensorboard"] * tensorboard
    launchers = {
        "one": [sys.executable],
        "torchrun": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
        + ["--master_port", str(free_port())],
        "accelerate": [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
        + ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"],
    }
    procs = {
        name: subprocess.Popen(
            [*launch, *command, "--output", name],
            env=env(tmp_path),
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, launch in launchers.items()
    }  # all at once
    outputs = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, (name, err[-3000:])
        outputs[name] = out
    one = load_file(tmp_path / "one" / "adapter_model.safetensors")
    for name in ("torchrun", "accelerate"):
        out = outputs[name]
        assert out.count("done: 3 steps") == 1 and "batch 4 over 2 processes" in out and out.count("eval loss") == 4
        log = json.loads((tmp_path / name / "training_log.json").read_text())
        assert log["status"] == "completed" and log["processes"] == 2
        two = load_file(tmp_path / name / "adapter_model.safetensors")
        assert set(two) == set(one)
        for k in one:
            torch.testing.assert_close(two[k], one[k], rtol=0, atol=1e-6, msg=f"{name}: {k}")
        assert {"rng_state_0.pth", "rng_state_1.pth"} <= set(os.listdir(tmp_path / name / "checkpoint"))
        if tensorboard:
            assert len(list((tmp_path / name / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert any((t != 1).any() for k, t in one.items() if k.endswith("road_alpha"))
    leftovers = set(os.listdir(tmp_path)) - {"accelerate", "eval.jsonl", "hf", "one", "torchrun", "train.jsonl"}
    assert not leftovers, leftovers  # no second run directory, no staging directory
