"""`ModulesToSaveWrapper`: a fully trained per-adapter copy of a module (e.g. a classifier head)."""

from __future__ import annotations

import copy
from typing import Any, Iterable, Optional, Union

import torch
from torch import nn

from .base import Routing


class ModulesToSaveWrapper(nn.Module):
    """Holds the frozen original module and one trainable copy per adapter; runs the active one."""

    def __init__(self, module: nn.Module, adapter_name: str) -> None:
        super().__init__()
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: Optional[str] = None
        self.disable_adapters = False
        self.routing: Optional[Routing] = None
        module.requires_grad_(False)
        self.add_adapter(adapter_name)

    def add_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.modules_to_save:
            self.modules_to_save[adapter_name] = copy.deepcopy(self.original_module)
        self._set_requires_grad()

    def set_adapter(self, adapter_names: Union[str, Iterable[str]]) -> None:
        """The first of `adapter_names` that has a copy here becomes the active copy."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        self.active_adapter = next((n for n in names if n in self.modules_to_save), None)
        self._set_requires_grad()

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.modules_to_save:
            del self.modules_to_save[adapter_name]
        if self.active_adapter == adapter_name:
            self.active_adapter = None

    def _set_requires_grad(self) -> None:
        for name, module in self.modules_to_save.items():
            module.requires_grad_(name == self.active_adapter)

    def active_module(self) -> nn.Module:
        if self.disable_adapters or self.active_adapter is None:
            return self.original_module
        return self.modules_to_save[self.active_adapter]

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if self.routing is None or self.disable_adapters:
            return self.active_module()(x, *args, **kwargs)
        # Mixed batch: each adapter's copy runs on its own rows.
        index = self.routing.index
        if index.dim() != 1:
            raise ValueError("modules_to_save need one adapter per batch row, not per token.")
        out = None
        for i, name in enumerate(self.routing.names):
            rows = (index == i).nonzero().flatten()
            if rows.numel() == 0:
                continue
            module = self.modules_to_save[name] if name in self.modules_to_save else self.original_module
            part = module(x[rows], *args, **kwargs)
            if out is None:
                out = part.new_empty((x.shape[0],) + tuple(part.shape[1:]))
            out[rows] = part
        return out
