"""Tiny models built from configs (nothing is downloaded) and helpers shared by the tests."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn

# Without a GPU, Triton kernels run in Triton's interpreter; this must be set before they are imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def tiny_llama(hidden: int = 128, layers: int = 2, seed: int = 0, tied: bool = False):
    """A Llama with every projection's output divisible by 64 (so group_size 64 works); `tied`: its input and
    output embeddings share one tensor."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=96,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2 if hidden >= 256 else 4,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
    )
    return LlamaForCausalLM(cfg).eval()


def tiny_opt(hidden: int = 128, layers: int = 2, seed: int = 0):
    """An OPT model (another family: biases on every projection, different module names)."""
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    cfg = OPTConfig(
        vocab_size=96,
        hidden_size=hidden,
        ffn_dim=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=64,
        word_embed_proj_dim=hidden,
    )
    return OPTForCausalLM(cfg).eval()


class MLP(nn.Module):
    """A plain torch model with biases; no transformers config."""

    def __init__(self, d_in: int = 16, hidden: int = 64, d_out: int = 64, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.lin0 = nn.Linear(d_in, hidden)
        self.act = nn.ReLU()
        self.lin1 = nn.Linear(hidden, hidden)
        self.lin2 = nn.Linear(hidden, d_out)
        self.head = nn.Linear(d_out, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.lin2(self.act(self.lin1(self.act(self.lin0(x))))))


def tiny_mlp(seed: int = 0) -> MLP:
    return MLP(seed=seed).eval()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and spinning threads slow a file down many
    times over when the machine is busy; the previous setting is restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def llama_base():
    return tiny_llama()


@pytest.fixture
def llama(llama_base):
    """A fresh copy of the tiny Llama (tests may mutate it)."""
    return copy.deepcopy(llama_base)


@pytest.fixture
def input_ids():
    g = torch.Generator().manual_seed(123)
    return torch.randint(0, 96, (4, 9), generator=g)


def train_steps(
    model: nn.Module, input_ids: torch.Tensor, steps: int, lr: float = 1e-2, weight_decay: float = 0.0
) -> list[float]:
    """`steps` AdamW steps on the trainable parameters, language-modelling `input_ids`, in train mode
    (the previous mode is restored). Gradients are zeroed, not freed, so tests can see which
    parameters received one. Returns the losses."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)
    was_training = model.training
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)
        losses.append(loss.item())
    model.train(was_training)
    return losses
