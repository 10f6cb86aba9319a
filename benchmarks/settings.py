"""Problem sizes for the full (default) run and the ``--quick`` smoke run."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

# All seven Llama projections are adapted, by every adapter contender.
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VARIANT = "road_1"
GROUP_SIZE = 64
LORA_RANK = 8
LORA_ALPHA = 16


@dataclass(frozen=True)
class ModelSize:
    """A Llama-like decoder built from a transformers LlamaConfig (random init, nothing downloaded)."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    vocab: int

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Settings:
    name: str
    lm: ModelSize  # decode and prefill
    decode_batch: int
    prompt_len: int
    new_tokens: int
    decode_ks: tuple[int, ...]
    prefill_batch: int
    prefill_len: int
    prefill_ks: tuple[int, ...]
    train_model: ModelSize
    train_batch: int
    train_len: int
    merge_dim: int
    reps: int
    kernel_shape: tuple[int, int] = (4096, 4096)  # (rows, features) of the kernels scenario's tensors
    kernel_calls: int = 5  # calls per timed sample in the kernels scenario
    device: str = "cpu"
    dtype: str = "float32"  # of the decode/step/prefill model and the kernels tensors (train and merge: float32)
    warmup: int = 1
    warmup_new_tokens: int = 2  # decode warmup rounds generate this many tokens (cheap, same code paths)
    seed: int = 0
    # {label: src directory} of other roadkit versions timed beside this one in the overhead scenario
    baselines: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


# The plan called for 8 layers; on 2 CPU cores a full run with those takes well over the
# 15-minute budget (decode alone would be ~15 min), so the default decode/prefill model has 4
# layers (hidden size, which sets the adapters' cost relative to the matmuls, is kept at 1024).
# The model config is reported in every output.
FULL = Settings(
    name="full",
    lm=ModelSize(layers=4, hidden=1024, intermediate=2816, heads=16, vocab=8192),
    decode_batch=64,
    prompt_len=16,
    new_tokens=24,
    decode_ks=(1, 4, 16, 64),
    # 16 distinct adapters cannot share a batch of 8 rows (one adapter per row); 8 is the most.
    prefill_batch=8,
    prefill_len=256,
    prefill_ks=(1, 8),
    train_model=ModelSize(layers=4, hidden=512, intermediate=1408, heads=8, vocab=8192),
    train_batch=4,
    train_len=128,
    merge_dim=4096,
    reps=5,
)

QUICK = Settings(
    name="quick",
    lm=ModelSize(layers=2, hidden=256, intermediate=704, heads=4, vocab=2048),
    decode_batch=16,
    prompt_len=8,
    new_tokens=6,
    decode_ks=(1, 4, 16),
    prefill_batch=4,
    prefill_len=64,
    prefill_ks=(1, 4),
    train_model=ModelSize(layers=2, hidden=256, intermediate=704, heads=4, vocab=2048),
    train_batch=2,
    train_len=32,
    merge_dim=1024,
    reps=3,
    kernel_shape=(512, 1024),
    kernel_calls=2,
)

# `--gpu`: issue 3's GPU setting, a ~1.2B-parameter Llama-like model (TinyLlama's widths, full
# multi-head attention) in bfloat16 on CUDA; the kernels scenario on 256 MiB tensors.
GPU = Settings(
    name="gpu",
    lm=ModelSize(layers=22, hidden=2048, intermediate=5632, heads=32, vocab=32000),
    decode_batch=64,
    prompt_len=16,
    new_tokens=64,
    decode_ks=(1, 4, 16, 64),
    prefill_batch=8,
    prefill_len=512,
    prefill_ks=(1, 8),
    train_model=ModelSize(layers=8, hidden=2048, intermediate=5632, heads=32, vocab=32000),
    train_batch=8,
    train_len=512,
    merge_dim=8192,
    reps=5,
    kernel_shape=(32768, 4096),
    kernel_calls=20,
    device="cuda",
    dtype="bfloat16",
)


def parity_tolerance(dtype: str) -> tuple[float, float]:
    """(atol, rel): the largest |logit difference| accepted between roadkit and PEFT RoAd before
    timing is max(atol, rel * the adapters' own effect on the logits). In float32 the two agree to
    rounding. In 16-bit models every adapted layer rounds its output, and one-ulp differences grow
    through the layers (measured: 0.012 on the quick model in bfloat16, where the adapters move the
    logits by 1.3), so there the limit scales with the adapters' effect."""
    return {"float32": (1e-4, 0.0), "bfloat16": (0.05, 0.05), "float16": (0.01, 0.01)}[dtype]
