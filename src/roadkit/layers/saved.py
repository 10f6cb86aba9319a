"""`ModulesToSaveWrapper`: a fully trained per-adapter copy of a module (e.g. a classifier head)."""

from __future__ import annotations

import copy
from typing import Any, Iterable, Optional, Union

import torch
from torch import nn

from ..routing import Routing


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
        return self._mixed_forward(self.routing, x, args, kwargs)

    def _mixed_forward(self, routing: Routing, x: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        """Each adapter's copy (the original for `__base__`) on its own rows. An argument beside x that is a
        tensor whose first axis has the batch's length goes with the rows (an attention mask, a per-row
        scale); every other argument goes to each copy whole. An empty batch runs the original module."""
        out: Optional[torch.Tensor] = None
        for name, rows in routing.rows_by_name(x.device):
            module = self.modules_to_save[name] if name in self.modules_to_save else self.original_module
            part = module(x[rows], *_rows_of(args, rows, len(x)), **_rows_of(kwargs, rows, len(x)))
            if not isinstance(part, torch.Tensor):
                raise TypeError(
                    f"modules_to_save in a mixed batch must return a tensor, got {type(part).__name__}; "
                    "route one adapter per batch instead."
                )
            if out is None:
                out = part.new_empty((len(x),) + tuple(part.shape[1:]))
            out[rows] = part
        return self.original_module(x, *args, **kwargs) if out is None else out


def _rows_of(arguments: Any, rows: torch.Tensor, batch: int) -> Any:
    """`arguments` (a tuple or a dict) with each tensor whose first axis has `batch` entries cut to `rows`."""

    def cut(a: Any) -> Any:
        return a[rows] if isinstance(a, torch.Tensor) and a.dim() and a.shape[0] == batch else a

    if isinstance(arguments, dict):
        return {k: cut(v) for k, v in arguments.items()}
    return tuple(cut(a) for a in arguments)
