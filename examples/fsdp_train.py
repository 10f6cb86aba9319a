"""Train a RoAd adapter with torch FSDP2 (`fully_shard`), on CPU processes over gloo or on GPUs over NCCL.

    torchrun --nproc_per_node 2 examples/fsdp_train.py --output adapters/fsdp          # 2 processes
    python examples/fsdp_train.py --output adapters/one                                  # one process, no FSDP

`fully_shard` goes on every decoder layer and then on the `RoadModel`, so the frozen base weights and the
adapter parameters are both sharded (DTensors). `--batch-size` is the global batch: each process takes its
rows of every batch, and FSDP2 averages the gradients, so any number of processes takes the same optimizer
steps. At the end every process gathers the full adapter (`unshard()` on every FSDP module, a collective) and
the first one saves it with `save_pretrained`; nothing of the base model is written.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", required=True, help="where to write the adapter (PEFT layout)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8, help="global batch size, split across processes")
    parser.add_argument("--seq-len", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def build(hidden: int, seed: int) -> torch.nn.Module:
    """A tiny random Llama (built from a config, nothing downloaded) with a trained road_2 adapter on every
    linear layer and an inactive road_1 adapter on q_proj, the same on every process."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from roadkit import RoadConfig, get_peft_model

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
    )
    model = get_peft_model(
        LlamaForCausalLM(config),
        RoadConfig(variant="road_2", group_size=32, target_modules="all-linear", init_weights=False),
    )
    model.add_adapter(
        "inactive", RoadConfig(variant="road_1", group_size=32, target_modules=["q_proj"], init_weights=False)
    )
    return model


def evaluate(model: torch.nn.Module, ids: torch.Tensor, rank: int, when: str) -> None:
    """The loss on `ids` in eval mode without gradients (every process runs it: FSDP gathers parameters)."""
    model.eval()
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss
    model.train()
    if rank == 0:
        print(f"eval loss {when} training {loss.item():.6f}", flush=True)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if args.batch_size % world:
        raise SystemExit(f"--batch-size {args.batch_size} does not split over {world} processes")
    model = build(args.hidden, args.seed)
    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
        mesh = init_device_mesh(device, (world,))
        for layer in model.get_base_model().model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)  # the rest: embeddings, norm, lm_head
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)

    g = torch.Generator().manual_seed(args.seed)
    device = next(model.parameters()).device
    held_out = torch.randint(0, 128, (2, args.seq_len), generator=g).to(device)
    evaluate(model, held_out, rank, "before")  # eval mode caches the adapters' coefficients
    for step in range(args.steps):
        ids = torch.randint(0, 128, (args.batch_size, args.seq_len), generator=g)
        local = ids.chunk(world)[rank].to(device)
        loss = model(input_ids=local, labels=local).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        loss = loss.detach()
        if world > 1:
            dist.all_reduce(loss, op=dist.ReduceOp.AVG)
        if rank == 0:
            print(f"step {step:3d}  loss {loss.item():.4f}", flush=True)
    evaluate(model, held_out, rank, "after")  # must see the trained adapters, not the cached coefficients

    if world > 1:
        from torch.distributed.fsdp import FSDPModule

        fsdp_modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
        for m in fsdp_modules:  # every process: all-gather the full parameters into the modules
            m.unshard()
        model.save_pretrained(args.output, is_main_process=rank == 0)
        for m in fsdp_modules:
            m.reshard()
        dist.barrier()
        dist.destroy_process_group()
    else:
        model.save_pretrained(args.output)
    if rank == 0:
        print(f"saved the adapter to {args.output} ({world} process(es))")


if __name__ == "__main__":
    main()
