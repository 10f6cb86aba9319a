"""roadkit inside other libraries: `trainer` (`RoadTrainer`, transformers' Trainer; the `hf` extra) and
`vllm` (the vLLM plugin, loaded by vLLM through its entry point). Nothing in the core imports from here.
"""
