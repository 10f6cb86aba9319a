"""FSDP2 training on 2 CPU processes (gloo) ends with the same adapter as one process on the same batches.

Two ways, both with `torch.distributed.fsdp.fully_shard` over a CPU device mesh:

* roadkit's training path (`TrainingRun`, on `RoadTrainer`) under torchrun, on a base that transformers
  shards at load time (`from_pretrained(..., distributed_config=DistributedConfig(fsdp_size=2))` applies
  `fully_shard` to every decoder layer and the model). FSDP2 shards the frozen base weights; the adapter,
  added after sharding, stays a plain replicated tensor, which the Trainer broadcasts from rank 0 and whose
  gradient it averages over the ranks (`Trainer._sync_replicated_trainable_parameters`). The checkpoints hold
  the adapter only.
* a plain loop (`examples/fsdp_train.py`) with `fully_shard` applied to the `RoadModel` itself, so the adapter
  parameters are sharded DTensors too; every process gathers the full parameters (`unshard()` on every FSDP
  module) and the first saves the adapter with `save_pretrained`. Evaluation after training (eval mode, no
  grad: RoadLayer's coefficient caches) sees the trained adapter: FSDP2 swaps parameters in with `setattr`,
  which `AdapterParameters` counts.

The Trainer cannot take a model the user sharded with `fully_shard` on CPU: accelerate wraps every model of
a multi-CPU run in DDP (`Accelerator.prepare_model`, `DistributedType.MULTI_CPU`), which fails on DTensor
parameters, and it enables its FSDP plugin for accelerator devices only.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import tiny_llama
from safetensors.torch import load_file
from test_ddp import adapters, end_process_group, training_run_samples
from torch.distributed.tensor import DTensor
from transformers import LlamaForCausalLM

from roadkit import RoadConfig, get_peft_model

ROOT = Path(__file__).resolve().parent.parent
STEPS = 3
GLOBAL_BATCH = 4

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(tmp_path: Path) -> dict[str, str]:
    return {
        **os.environ,
        "HF_HOME": str(tmp_path / "hf"),
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
    }


def torchrun(script: Path, *args: str, tmp_path: Path) -> subprocess.Popen:
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    launch += ["--master_port", str(free_port()), str(script), *args]
    return subprocess.Popen(
        launch, env=env(tmp_path), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def base_dir(tmp_path: Path) -> Path:
    """A tiny Llama saved with `save_pretrained` (transformers shards a model only as it loads it)."""
    path = tmp_path / "base"
    if not path.exists():
        tiny_llama(hidden=64, layers=2).save_pretrained(path)
    return path


def road(base: torch.nn.Module):
    """The adapters of `test_ddp.build`: a trained road_2 on every linear layer, an inactive road_1."""
    torch.manual_seed(1)
    model = get_peft_model(
        base, RoadConfig(variant="road_2", group_size=32, target_modules="all-linear", init_weights=False)
    )
    model.add_adapter(
        "inactive", RoadConfig(variant="road_1", group_size=32, target_modules=["q_proj"], init_weights=False)
    )
    return model.train()


def training_run(base: str, out_dir: str) -> None:
    """`STEPS` steps of `TrainingRun` with the global batch `GLOBAL_BATCH`; under torchrun, on an FSDP2 base."""
    from roadkit.app.demo import build_tokenizer
    from roadkit.app.runs import COMPLETED, TrainConfig
    from roadkit.app.training import TrainingRun

    torch.set_num_threads(1)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from transformers.distributed import DistributedConfig

        model = LlamaForCausalLM.from_pretrained(base, distributed_config=DistributedConfig(fsdp_size=2))
        assert model.is_distributed_loading_by_transformers  # fully_shard on the decoder layers and the model
        assert isinstance(model.model.layers[0].mlp.up_proj.weight, DTensor)
    else:
        model = LlamaForCausalLM.from_pretrained(base)
    run = TrainingRun(
        road(model),
        training_run_samples(),
        TrainConfig(lr=1e-2, max_steps=STEPS, batch_size=GLOBAL_BATCH),
        build_tokenizer(),
        output_dir=out_dir,
    )
    assert run.fit(progress=False) == COMPLETED


def test_training_run_fsdp2_two_processes_match_one(tmp_path):
    base = base_dir(tmp_path)
    proc = torchrun(Path(__file__), str(base), str(tmp_path / "two"), tmp_path=tmp_path)
    training_run(str(base), str(tmp_path / "one"))  # while the ranks start up
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    start = adapters(road(LlamaForCausalLM.from_pretrained(base)))
    for name, sub in (("default", ""), ("inactive", "inactive")):
        one = load_file(tmp_path / "one" / f"checkpoint-{STEPS}" / sub / "adapter_model.safetensors")
        two = load_file(tmp_path / "two" / f"checkpoint-{STEPS}" / sub / "adapter_model.safetensors")
        assert set(one) == set(two)
        for k in one:
            torch.testing.assert_close(two[k], one[k], rtol=0, atol=1e-6, msg=f"{name}: {k}")
            assert torch.equal(one[k], start[f"{name}/{k}"]) == (name == "inactive"), k  # trained, or left alone
    files = set(os.listdir(tmp_path / "two" / f"checkpoint-{STEPS}"))  # the adapter only, no base weights
    assert {"adapter_model.safetensors", "optimizer.pt", "trainer_state.json"} <= files
    assert not {f for f in files if f.startswith(("model", "pytorch_model"))}, files


def test_fully_shard_example_two_processes_match_one(tmp_path):
    """`examples/fsdp_train.py`: adapter parameters sharded as DTensors, gathered to full tensors to save."""
    script = ROOT / "examples" / "fsdp_train.py"
    args = ["--steps", str(STEPS), "--batch-size", str(GLOBAL_BATCH), "--lr", "1e-2"]
    two = torchrun(script, *args, "--output", str(tmp_path / "two"), tmp_path=tmp_path)
    one = subprocess.run(
        [sys.executable, str(script), *args, "--output", str(tmp_path / "one")],
        env=env(tmp_path),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    stdout, stderr = two.communicate(timeout=300)
    assert two.returncode == 0, stderr[-3000:]
    assert "(1 process(es))" in one.stdout and "(2 process(es))" in stdout

    def evals(out: str) -> dict[str, float]:
        return {line.split()[2]: float(line.split()[-1]) for line in out.splitlines() if line.startswith("eval loss")}

    assert evals(stdout).keys() == {"before", "after"}
    assert evals(stdout) == pytest.approx(evals(one.stdout), abs=1e-5)  # eval after training: no stale cache
    assert evals(stdout)["after"] != evals(stdout)["before"]
    for sub in ("", "inactive"):
        a = load_file(tmp_path / "one" / sub / "adapter_model.safetensors")
        b = load_file(tmp_path / "two" / sub / "adapter_model.safetensors")
        assert set(a) == set(b) and a
        for k in a:
            assert type(b[k]) is torch.Tensor and b[k].shape == a[k].shape, k  # full tensors, not shards
            torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6, msg=k)
    assert set(os.listdir(tmp_path / "two")) == {"adapter_config.json", "adapter_model.safetensors", "inactive"}


if __name__ == "__main__":  # one rank of `test_training_run_fsdp2_two_processes_match_one`, under torchrun
    training_run(sys.argv[1], sys.argv[2])
    end_process_group()
