"""The defaults of `roadkit train`, in one place: the command's help, `train.RUN_DEFAULTS` and `TrainConfig`
read them from here.

Targets, learning rate and steps come from the quality benchmark (`python -m benchmarks.quality`, results
in docs/quality.md) on SmolLM2-135M-Instruct: with every linear layer of attention and MLP as targets,
road_1 learned all three tasks within `MAX_STEPS` steps of batch `BATCH_SIZE` at `LR` (the best rate of its
sweep), where the architecture's usual targets (q_proj, v_proj) at 1e-3 for 30 steps had made a toy
arithmetic task worse. `--epochs` given on its own replaces the step count by whole passes over the data.
"""

from __future__ import annotations

VARIANT = "road_1"
GROUP_SIZE = 64
TARGETS = "all-linear"
LR = 3e-3
MAX_STEPS = 50
BATCH_SIZE = 8
MAX_LENGTH = 512
