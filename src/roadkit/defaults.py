"""The defaults of `roadkit train`, in one place: the command's help, `train.RUN_DEFAULTS` and `TrainConfig`
read them from here.

Targets, learning rate and steps come from the quality benchmark (`python -m benchmarks.quality`; numbers
in docs/quality.md) on SmolLM2-135M-Instruct: road_1 on every linear layer of attention and MLP, 40 steps
of batch 8 at 1e-3 (the best of its sweep over 1e-3, 3e-3 and 1e-2 on addition), took held-out exact
match from 0% to 77.5% on 2-digit addition and to 99.5% on word-list reversal, and from 55% to 82% on a
sentiment task. The earlier defaults (the architecture's usual targets, q_proj and v_proj, at 1e-3 for
30 steps) had made exact match on a toy arithmetic task worse (2% -> 0%). `--epochs` given on its own
replaces the step count by whole passes over the data.
"""

from __future__ import annotations

VARIANT = "road_1"
GROUP_SIZE = 64
TARGETS = "all-linear"
LR = 1e-3
MAX_STEPS = 40
BATCH_SIZE = 8
MAX_LENGTH = 512
