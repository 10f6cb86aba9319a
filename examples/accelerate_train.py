"""Train a RoAd adapter with Hugging Face accelerate (one process, or several with `accelerate launch`).

    python examples/accelerate_train.py --output adapters/demo                      # one process
    accelerate launch --multi_gpu --num_processes 2 examples/accelerate_train.py --output adapters/demo
    accelerate launch --multi_gpu --num_processes 2 examples/accelerate_train.py --cpu --output adapters/demo
    python examples/accelerate_train.py --model path/to/llama --target-modules q_proj v_proj --lr 1e-3 ...

Without `--model` it builds a tiny Llama from a config (random weights, nothing is downloaded) and
trains it on synthetic token sequences that cycle through a short phrase, so the loss visibly falls.
`--batch-size` is the global batch: accelerate splits every batch across the processes
(`split_batches=True`), so any number of processes takes the same optimizer steps and ends with
the same adapter. The main process saves it with the unwrapped model's `save_pretrained`.

Several CPU processes (the third line): `--multi_gpu` makes accelerate start the processes with
torchrun, and this script's `--cpu` (`Accelerator(cpu=True)`) makes them train on CPU over gloo.
`accelerate launch --cpu --num_processes 2` starts one process only (accelerate starts several CPU
processes only through mpirun).
"""

from __future__ import annotations

import argparse

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed

from roadkit import RoadConfig, get_peft_model


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="a transformers causal LM directory or Hub id (default: a tiny random Llama)")
    parser.add_argument("--output", required=True, help="where to write the adapter (PEFT layout)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8, help="global batch size, split across processes")
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-2, help="RoAd likes about 1e-3 on real models")
    parser.add_argument("--variant", default="road_1", choices=["road_1", "road_2", "road_4"])
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--target-modules", nargs="+", default=["all-linear"], help='module names, or "all-linear"')
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cpu", action="store_true", help="train on CPU processes (gloo) even if GPUs are present")
    return parser.parse_args()


def load_model(path: str | None) -> torch.nn.Module:
    """The base model: `path`, or a tiny Llama built from a config."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if path:
        return AutoModelForCausalLM.from_pretrained(path)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
    )
    return LlamaForCausalLM(config)


def synthetic_data(n: int, seq_len: int, vocab: int, seed: int) -> torch.utils.data.TensorDataset:
    """Rows that cycle through one fixed 4-token phrase, each from a random start: a pattern a small
    adapter on a random model can pick up in a few steps."""
    g = torch.Generator().manual_seed(seed)
    phrase = torch.randperm(vocab, generator=g)[:4]
    starts = torch.randint(0, 4, (n, 1), generator=g)
    return torch.utils.data.TensorDataset(phrase[(starts + torch.arange(seq_len)) % 4])


def main() -> None:
    args = parse_args()
    accelerator = Accelerator(cpu=args.cpu, dataloader_config=DataLoaderConfiguration(split_batches=True))
    set_seed(args.seed)  # the same base weights on every process
    targets = args.target_modules[0] if args.target_modules == ["all-linear"] else args.target_modules
    model = get_peft_model(
        load_model(args.model), RoadConfig(variant=args.variant, group_size=args.group_size, target_modules=targets)
    )
    if accelerator.is_main_process:
        model.print_trainable_parameters()

    data = synthetic_data(args.steps * args.batch_size, args.seq_len, model.config.vocab_size, args.seed)
    loader = torch.utils.data.DataLoader(
        data, batch_size=args.batch_size, shuffle=True, generator=torch.Generator().manual_seed(args.seed)
    )
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)

    model.train()
    for step, (ids,) in enumerate(loader):
        loss = model(input_ids=ids, labels=ids).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        if step % 5 == 0 or step == args.steps - 1:
            mean = accelerator.reduce(loss.detach(), reduction="mean")
            accelerator.print(f"step {step:4d}  loss {mean.item():.4f}")

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:  # only the adapter: adapter_config.json + adapter_model.safetensors
        accelerator.unwrap_model(model).save_pretrained(args.output)
    accelerator.print(f"saved the adapter to {args.output} ({accelerator.num_processes} process(es))")
    accelerator.end_training()
    if torch.distributed.is_initialized():  # every process here, then gloo's threads stop before exit, not during it
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
