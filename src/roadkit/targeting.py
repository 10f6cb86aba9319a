"""Which modules of a model a `RoadConfig` selects: targets to wrap and modules to save."""

from __future__ import annotations

import re
from typing import Optional, Union

from torch import nn

from .config import RoadConfig
from .errors import InputError
from .layers import LAYER_TYPES, ModulesToSaveWrapper, RoadLayer, base_of, wrapper_for

# Target modules used when `target_modules` is None, by `config.model_type` (ROAD_SPEC.md).
DEFAULT_TARGETS: dict[str, list[str]] = {
    **{
        t: ["q_proj", "v_proj"]
        for t in (
            "llama",
            "llama4",
            "mistral",
            "mixtral",
            "qwen2",
            "qwen3",
            "gemma",
            "gemma2",
            "gemma3_text",
            "opt",
            "gptj",
            "gpt_neo",
            "bart",
            "stablelm",
        )
    },
    **{t: ["q", "v"] for t in ("t5", "mt5")},
    **{t: ["c_attn"] for t in ("gpt2", "gpt_bigcode")},
    **{t: ["query_key_value"] for t in ("bloom", "gpt_neox", "falcon", "chatglm")},
    **{t: ["query", "value"] for t in ("bert", "roberta", "xlm-roberta", "electra", "layoutlm")},
    "deberta-v2": ["query_proj", "value_proj"],
    "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    "codegen": ["qkv_proj"],
    "mpt": ["Wqkv"],
}
ALL_LINEAR = "all-linear"
DEFAULT_LAYERS_PATTERNS = ("layers", "h", "block", "blocks", "layer")


def _matches(name: str, spec: Union[str, list[str]]) -> bool:
    """A regex string must match the whole name; a list entry must equal it or be a dotted suffix."""
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == t or name.endswith("." + t) for t in spec)


def _layer_index(name: str, patterns: tuple[str, ...]) -> Optional[int]:
    alternatives = "|".join(re.escape(p) for p in patterns)
    m = re.search(rf"(?:^|\.)(?:{alternatives})\.(\d+)(?:\.|$)", name)
    return int(m.group(1)) if m else None


def _candidates(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Named modules, not descending into RoAd wrappers (a wrapped layer is a candidate itself)."""
    out: list[tuple[str, nn.Module]] = []

    def walk(prefix: str, module: nn.Module) -> None:
        for child_name, child in module.named_children():
            name = f"{prefix}.{child_name}" if prefix else child_name
            out.append((name, child))
            if not isinstance(child, (RoadLayer, ModulesToSaveWrapper)):
                walk(name, child)

    walk("", model)
    return out


def _output_head(model: nn.Module) -> Optional[nn.Module]:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return None if head is None else base_of(head)


def default_target_modules(model: nn.Module) -> list[str]:
    """The architecture's default targets, or a clear error asking for `target_modules`."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in DEFAULT_TARGETS:
        known = ", ".join(sorted(DEFAULT_TARGETS))
        raise InputError(
            f"RoadConfig.target_modules is None and model_type={model_type!r} has no default targets; "
            f"pass target_modules (a list of names, a regex, or 'all-linear'). Defaults exist for: {known}."
        )
    return DEFAULT_TARGETS[model_type]


def select_targets(model: nn.Module, config: RoadConfig) -> list[str]:
    """Dotted names of the modules `config` adapts; raises if none match or one cannot be wrapped."""
    spec = config.target_modules if config.target_modules is not None else default_target_modules(model)
    head = _output_head(model)
    patterns = tuple(config.layers_pattern or DEFAULT_LAYERS_PATTERNS)
    ltt = config.layers_to_transform  # RoadConfig makes it a list; an int set on it afterwards is one index
    layer_indices = [ltt] if isinstance(ltt, int) else ltt
    chosen: list[str] = []
    for name, module in _candidates(model):
        base = base_of(module)
        if spec == ALL_LINEAR:
            wrapper = wrapper_for(base)
            if wrapper is None or not wrapper.linear_like or base is head:
                continue
        elif not _matches(name, spec):
            continue
        if config.exclude_modules is not None and _matches(name, config.exclude_modules):
            continue
        if layer_indices is not None and _layer_index(name, patterns) not in layer_indices:
            continue
        if isinstance(module, ModulesToSaveWrapper):
            continue
        if wrapper_for(base) is None:
            supported = ", ".join(wrapper.base_type for wrapper in LAYER_TYPES)
            raise InputError(
                f"target module {name!r} is a {type(base).__module__}.{type(base).__qualname__}, which RoAd "
                f"cannot wrap; supported layer types: {supported}."
            )
        chosen.append(name)
    if not chosen:
        linear = [n for n, m in _candidates(model) if wrapper_for(base_of(m)) is not None]
        sample = ", ".join(linear[:8]) + (", ..." if len(linear) > 8 else "")
        raise InputError(
            f"RoadConfig.target_modules={spec!r} matched no adaptable module of {type(model).__name__} "
            f"(after exclude_modules / layers_to_transform). Adaptable modules include: {sample or 'none'}."
        )
    return chosen


def select_modules_to_save(model: nn.Module, config: RoadConfig) -> list[str]:
    """Dotted names of the modules matched by `config.modules_to_save` (exact or dotted suffix)."""
    if not config.modules_to_save:
        return []
    return [
        name
        for name, module in _candidates(model)
        if not isinstance(module, RoadLayer) and _matches(name, config.modules_to_save)
    ]
