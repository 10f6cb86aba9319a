"""The cache each RoAd layer keeps of what it derives from its adapter parameters.

Coefficients, packed rotations and mixed-batch tables cost more to build than to apply, so a layer
keeps them while the parameters they were built from are unchanged. Unchanged is read from the
parameters themselves, with no hook on the hot path: a stamp of their version counters and of the
layer's adapter dicts (`AdapterParameters.generation`), compared on every use.
"""

from __future__ import annotations

import functools
import operator
import weakref
from collections import OrderedDict
from typing import Any, Callable, Hashable, Iterable, Optional, TypeVar, cast

import torch
from torch import nn

# Entries per layer: the serving rotations, coefficients in use, and the tables of the most recent
# mixed-batch adapter lists. Bounded: a server with continuous batching sees a new list on most calls.
CACHE_ENTRIES = 16

_T = TypeVar("_T")
_version = operator.attrgetter("_version")  # a tensor's in-place update count

Entry = tuple[list[torch.Tensor], tuple, Any]  # (the parameters read, their stamp, the value)
Pinned = tuple[int, Entry]  # an entry and the cache's generation when it was handed out


def readable() -> bool:
    """Whether a cache may be read here: not inside a graph torch.compile traces, which cannot read the
    version counters a stamp is made of (there everything is computed from the parameters, and fused). The
    one place the layers ask whether they are being traced."""
    return not torch.compiler.is_compiling()


class AdapterParameters(nn.ParameterDict):
    """An `nn.ParameterDict` that counts the entries put in or taken out (`generation`), so a cache
    can tell with one integer that a parameter object was replaced or deleted."""

    generation: int = 0

    def __setattr__(self, name: str, value: Any) -> None:
        object.__setattr__(self, "generation", self.generation + 1)
        super().__setattr__(name, value)

    def __delattr__(self, name: str) -> None:
        object.__setattr__(self, "generation", self.generation + 1)
        super().__delattr__(name)


def _clear(cache: weakref.ref, param: torch.Tensor) -> None:
    """A parameter's post-accumulate-grad hook (`LayerCache.watch`): empty the cache."""
    alive = cache()
    if alive is not None:
        alive.clear()


class LayerCache:
    """One layer's cache: key -> (parameters read, their stamp, value), least recently used first.

    A value is served while the parameters it was built from are unchanged (`stamp`); the layer empties the
    whole cache on every other change (adapters added, deleted or switched, merges, moves, `train()`).
    `generation` counts the times entries were dropped, so whoever holds an entry outside (a `Routing`,
    through `pin`) can tell with one comparison whether it may have gone stale.
    """

    def __init__(self, theta: AdapterParameters, alpha: AdapterParameters) -> None:
        self.theta, self.alpha = theta, alpha  # the layer's adapter dicts, whose generations the stamp reads
        self.entries: OrderedDict[Hashable, Entry] = OrderedDict()
        self.generation = 0
        self.watched: dict[int, torch.Tensor] = {}  # id -> parameter: those whose gradients empty the cache

    def __len__(self) -> int:
        return len(self.entries)

    def params(self, names: Iterable[str]) -> list[torch.Tensor]:
        """theta and alpha of each named adapter, in the form `stamp` reads."""
        # A ParameterDict holds no None entries (unlike the `_parameters` type says).
        tp = cast("dict[str, torch.Tensor]", self.theta._parameters)
        ap = cast("dict[str, torch.Tensor]", self.alpha._parameters)
        return [p for n in names for p in (tp[n], ap[n])]

    def stamp(self, params: list[torch.Tensor]) -> tuple:
        """Changes whenever these parameters may have through their own operations: an in-place update (their
        version counters only grow, so their sum grows too; `load_state_dict` copies in place) or a replaced or
        deleted entry (`AdapterParameters.generation`). Optimizer steps are the one update it cannot see (fused
        optimizers, `AdamW(fused=True)` as the HF Trainer uses it, bump no version counter); `watch` covers
        those. Edits through `.data` bypass version counters; make them under `torch.no_grad()` instead.

        It is checked on every inference call, after a matmul has pushed the interpreter out of cache, so it
        reads plain attributes and integers only."""
        return (self.theta.generation, self.alpha.generation, sum(map(_version, params)))

    def _fresh(self, entry: Entry) -> bool:
        """Whether `entry` still holds: the one place a hit is checked."""
        return entry[1] == (self.theta.generation, self.alpha.generation, sum(map(_version, entry[0])))

    def value(self, key: Hashable) -> Any:
        """The value kept under `key` while the parameters it was built from are unchanged, else None."""
        entry = self.entries.get(key)
        if entry is None or not self._fresh(entry):
            return None
        self.entries.move_to_end(key)
        return entry[2]

    def get(self, key: Hashable, names: Callable[[], Iterable[str]], build: Callable[[], _T]) -> _T:
        """The value under `key`, or `build()` run without grad and kept while the parameters of the adapters
        it reads (`names()`, asked on a miss) are unchanged. It is not kept while any of them holds a gradient:
        an optimizer step may then be pending (serving, and evaluation after `zero_grad()`, hold none)."""
        hit = self.value(key)
        if hit is not None:
            return hit
        params = self.params(names())
        with torch.no_grad():
            value = build()
        if all(p.grad is None for p in params):
            self.watch(params)
            self.entries[key] = (params, self.stamp(params), value)
            self.entries.move_to_end(key)  # a stale entry replaced in place keeps its old position
            while len(self.entries) > CACHE_ENTRIES:
                self.entries.popitem(last=False)
                self.generation += 1
        return value

    def pin(self, key: Hashable, value: Any) -> Optional[Pinned]:
        """The entry under `key`, if it holds `value`, with this cache's generation: for a holder outside
        the cache, which checks it with `holds` instead of looking the key up again."""
        entry = self.entries.get(key)
        return (self.generation, entry) if entry is not None and entry[2] is value else None

    def holds(self, pinned: Pinned) -> bool:
        """Whether a pinned entry is still what the cache would serve."""
        return pinned[0] == self.generation and self._fresh(pinned[1])

    def clear(self) -> None:
        self.generation += 1
        self.entries.clear()

    def forget(self, kept: Iterable[torch.Tensor]) -> None:
        """Stop tracking watched parameters other than `kept` (an adapter was deleted)."""
        ids = {id(p) for p in kept}
        self.watched = {i: p for i, p in self.watched.items() if i in ids}

    def watch(self, params: list[torch.Tensor]) -> None:
        """Have a gradient reaching any of these parameters empty the cache: an optimizer step, which no stamp
        sees, can only follow one. The hooks are the parameters' own (`register_post_accumulate_grad_hook`),
        registered once per parameter object, and hold the cache weakly. A frozen parameter (an inactive
        adapter's) gets its hook too, for the day it is made trainable: torch registers hooks only on tensors
        that require grad, so it does for the moment of the registration."""
        for p in params:
            if self.watched.get(id(p)) is not p:
                frozen = not p.requires_grad
                p.requires_grad_(True)
                p.register_post_accumulate_grad_hook(functools.partial(_clear, weakref.ref(self)))
                p.requires_grad_(not frozen)
                self.watched[id(p)] = p
