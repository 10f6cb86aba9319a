"""roadkit benchmark suite: roadkit RoAd vs PEFT RoAd vs PEFT LoRA vs the base model.

Run from the repository root: ``python -m benchmarks.run`` (see benchmarks/README.md).
Only roadkit's public API is used; ``peft`` is imported here as the reference, never from src/.
"""
