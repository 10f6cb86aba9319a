"""Bytes saved for backward, counted with `torch.autograd.graph.saved_tensors_hooks`.

During one forward, every tensor autograd packs is attributed by its storage (deduplicated by
`untyped_storage().data_ptr()`, sized by `untyped_storage().nbytes()`):

* total:   every storage packed during the forward;
* adapter: storages packed while executing inside an adapter wrapper layer (roadkit `RoadLayer`,
           PEFT `BaseTunerLayer`) but not inside that wrapper's `base_layer`;
* storages of the model's own parameters and buffers (frozen weights that autograd keeps a
  reference to, adapter parameters) are not activations and are excluded from both, reported
  separately as `param_bytes_referenced`.

Forward pre/post hooks on the wrappers and on their `base_layer` keep two depth counters.
The packed tensors are returned unchanged (the hooks observe, they do not copy).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def saved_tensor_bytes(model: nn.Module, adapter_types: tuple[type, ...], forward: Callable[[], object]) -> dict:
    depth = {"adapter": 0, "base": 0}
    handles = []

    def enter(kind):
        def hook(*_):
            depth[kind] += 1

        return hook

    def leave(kind):
        def hook(*_):
            depth[kind] -= 1

        return hook

    n_layers = 0
    for m in model.modules():
        if not (adapter_types and isinstance(m, adapter_types)):
            continue
        if isinstance(getattr(m, "base_layer", None), nn.Module):
            n_layers += 1
            handles += [m.register_forward_pre_hook(enter("adapter")), m.register_forward_hook(leave("adapter"))]
            b = m.base_layer
            handles += [b.register_forward_pre_hook(enter("base")), b.register_forward_hook(leave("base"))]

    param_ptrs = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    total: dict[int, int] = {}
    adapter: dict[int, int] = {}
    params: dict[int, int] = {}
    keep = []  # keep packed tensors alive so that no storage address is reused during the forward

    def pack(t: torch.Tensor):
        keep.append(t)
        try:
            st = t.untyped_storage()
        except (RuntimeError, NotImplementedError):
            return t
        ptr, nb = st.data_ptr(), st.nbytes()
        if nb == 0:
            return t
        if ptr in param_ptrs:
            params[ptr] = nb
            return t
        total[ptr] = nb
        if depth["adapter"] > 0 and depth["base"] == 0:
            adapter[ptr] = nb
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = forward()
    finally:
        for h in handles:
            h.remove()
    if depth != {"adapter": 0, "base": 0}:
        raise RuntimeError(f"unbalanced forward hooks: {depth}")
    del out
    keep.clear()
    return {
        "adapter_layers": n_layers,
        "adapter_bytes": sum(adapter.values()),
        "adapter_storages": len(adapter),
        "total_bytes": sum(total.values()),
        "total_storages": len(total),
        "param_bytes_referenced": sum(params.values()),
    }
