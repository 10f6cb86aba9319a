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
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import tiny_llama
from safetensors.torch import load_file
from test_ddp import (
    GLOBAL_BATCH,
    ROOT,
    STEPS,
    adapters,
    build,
    check_training_runs,
    end_process_group,
    env,
    torchrun,
)
from test_ddp import training_run as ddp_training_run
from torch.distributed.tensor import DTensor
from transformers import LlamaForCausalLM

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


def base_dir(tmp_path: Path) -> Path:
    """A tiny Llama saved with `save_pretrained` (transformers shards a model only as it loads it)."""
    path = tmp_path / "base"
    if not path.exists():
        tiny_llama(hidden=64, layers=2).save_pretrained(path)
    return path


def training_run(base: str, out_dir: str) -> None:
    """`test_ddp.training_run` on `base`: under torchrun, sharded by transformers as it loads (FSDP2)."""
    torch.set_num_threads(1)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from transformers.distributed import DistributedConfig

        model = LlamaForCausalLM.from_pretrained(base, distributed_config=DistributedConfig(fsdp_size=2))
        assert model.is_distributed_loading_by_transformers  # fully_shard on the decoder layers and the model
        assert isinstance(model.model.layers[0].mlp.up_proj.weight, DTensor)
    else:
        model = LlamaForCausalLM.from_pretrained(base)
    ddp_training_run(out_dir, build(model))


def test_training_run_fsdp2_two_processes_match_one(tmp_path):
    base = base_dir(tmp_path)
    proc = torchrun(Path(__file__), str(base), str(tmp_path / "two"), tmp_path=tmp_path)
    training_run(str(base), str(tmp_path / "one"))  # while the ranks start up
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    check_training_runs(tmp_path / "one", tmp_path / "two", adapters(build(LlamaForCausalLM.from_pretrained(base))))


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
