"""The defaults of `roadkit train`, in one place: the command's help, `runs.RUN_DEFAULTS` and `TrainConfig`
read them from here.

Targets, learning rate and steps come from the quality benchmark (`python -m benchmarks.quality`; numbers
in docs/quality.md) on SmolLM2-135M-Instruct. road_1 on every linear layer of attention and MLP, 40 steps
of batch 8, took held-out exact match from 0% to 72.5-77.5% on 2-digit addition and to 99.5-100% on
word-list reversal at 1e-3 and 3e-3; on two-aspect sentiment (base 55%) 1e-3 reached 82% and 3e-3 100%,
so 3e-3 is the default (at 1e-2 addition fell to 68.5%). `--epochs` given on its own replaces the step
count by whole passes over the data.
"""

from __future__ import annotations

from ..config import RoadConfig

VARIANT = RoadConfig.variant  # the library's defaults: RoadConfig's
GROUP_SIZE = RoadConfig.group_size
TARGETS = "all-linear"
LR = 3e-3
MAX_STEPS = 40
BATCH_SIZE = 8
MAX_LENGTH = 512
