"""Mixed batches: which adapter each batch row (or token) uses, and how a layer applies that.

`RoadModel.route` makes a `Routing` (checked by `make_routing`) and hands it to every adapter layer for
one call. A RoAd layer then rotates its output with `rotate_mixed`: its coefficient tables for the routing
(`tables_for`: one per group size, a row per adapter, from the layer's cache), the routing's index on the
layer's device (`Routing.index_on`), and one gather and one fused pass per table. A modules-to-save
wrapper runs each adapter's copy on its own rows (`Routing.rows_by_name`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Mapping, Optional, Protocol

import torch

from . import cache
from . import functional as rf
from .errors import InputError

BASE = "__base__"  # the name of "no adapter" in a mixed batch


@dataclass(frozen=True, eq=False)
class Routing:
    """Which adapter each batch row (or token) uses: `index` points into `names` (int32, which the
    mixed-batch kernels read as is).

    `batch_shape` is the (batch, seq) of the model input, when known: it lets per-row indices reach layers
    that see the batch flattened to (batch * seq) rows (OPT's MLP, for one). The rest is filled as the
    routing is used, and goes when it does: `tables`, each layer's pinned coefficient tables (`tables_for`);
    `scratch`, what the kernel backend keeps between calls of this routing (`functional.new_scratch`: on the
    torch path the per-row coefficients gathered from the tables, kept from their second use on, so one
    `generate` call gathers in its prefill and first decode step only); and `placed`, the index on each device a
    layer asked for it on (`index_on`).
    """

    names: tuple[str, ...]
    index: torch.Tensor
    batch_shape: Optional[tuple[int, ...]] = None
    tables: dict = field(default_factory=dict)
    scratch: Any = None
    placed: dict = field(default_factory=dict)

    def index_on(self, device: torch.device) -> torch.Tensor:
        """The index on `device`: itself there, else a copy made on the first call and kept, so a model split
        across devices (a `device_map`) moves it once per device and routing, not on every call."""
        index = self.placed.get(device)
        if index is None:
            index = self.placed[device] = self.index.to(device)
        return index

    def rows_by_name(self, device: torch.device) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, the batch rows that use it) for each name that some row uses: per-row routings only."""
        index = self.index_on(device)
        if index.dim() != 1:
            raise InputError("modules_to_save need one adapter per batch row, not per token.")
        for i, name in enumerate(self.names):
            rows = (index == i).nonzero().flatten()
            if rows.numel():
                yield name, rows


def make_routing(
    adapter_names: Any,
    adapter_indices: Optional[torch.Tensor],
    batch_shape: Optional[tuple[int, ...]],
    known: Iterable[str],
    device: torch.device,
) -> Routing:
    """A routing from `adapter_names` (one per batch row, or with `adapter_indices` the list they index
    into), checked against the `known` adapter names and `batch_shape`, with its index on `device`."""
    if isinstance(adapter_names, str) or not all(isinstance(n, str) for n in adapter_names):
        raise TypeError("adapter_names must be a list of adapter names (str).")
    names, known = list(adapter_names), set(known)
    unknown = sorted({n for n in names if n != BASE and n not in known})
    if unknown:
        raise InputError(f"unknown adapter(s) in adapter_names: {unknown}; available: {sorted(known)} and {BASE!r}.")
    if adapter_indices is None:
        if batch_shape is not None and len(names) != batch_shape[0]:
            raise InputError(f"adapter_names has {len(names)} entries but the batch has {batch_shape[0]} rows.")
        position = {n: i for i, n in enumerate(dict.fromkeys(names))}
        unique = tuple(position)
        index = torch.tensor([position[n] for n in names], dtype=torch.int32, device=device)
    else:
        unique = tuple(names)
        index = check_indices(adapter_indices, len(names), batch_shape).to(device, torch.int32)
    return Routing(unique, index, batch_shape, scratch=rf.new_scratch(index), placed={index.device: index})


def check_indices(indices: Any, n_names: int, batch_shape: Optional[tuple[int, ...]]) -> torch.Tensor:
    """`indices` as int64, once they are known to be integers in [0, n_names) of a shape that fits the batch."""
    if not isinstance(indices, torch.Tensor) or indices.dtype not in (torch.int32, torch.int64):
        raise TypeError("adapter_indices must be an integer tensor indexing into adapter_names.")
    allowed_values = f"adapter_indices must lie in [0, {n_names}) (one entry per adapter_names item)"
    if torch.compiler.is_compiling():  # checked in the graph, with no host sync (and no recompiles)
        torch._assert_async(((indices >= 0) & (indices < n_names)).all(), allowed_values)
    elif indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= n_names):
        raise InputError(f"{allowed_values}, got values in [{int(indices.min())}, {int(indices.max())}].")
    if batch_shape is not None:
        # compared, not hashed: under torch.compile hashing a symbolic size would fix it to one value
        allowed = (tuple(batch_shape[:1]), tuple(batch_shape), (math.prod(batch_shape),))
        if not any(tuple(indices.shape) == shape for shape in allowed):
            raise InputError(
                f"adapter_indices has shape {tuple(indices.shape)}; for a batch of shape "
                f"{tuple(batch_shape)} give [batch], [batch, seq] or flat [tokens]."
            )
    return indices.long()


def batch_shape_of(args: tuple, kwargs: dict) -> Optional[tuple[int, ...]]:
    """(batch, seq) of a model call's token input, or (batch,) of its `x`, when one can be found."""
    for key in ("input_ids", "inputs_embeds", "x"):
        if isinstance(kwargs.get(key), torch.Tensor):
            t = kwargs[key]
            return tuple(t.shape[:2]) if key != "x" else tuple(t.shape[:1])
    first = args[0] if args else None
    if not isinstance(first, torch.Tensor):
        return None
    return tuple(first.shape[:2]) if first.dim() == 2 and not first.is_floating_point() else tuple(first.shape[:1])


# ---- in a layer ------------------------------------------------------------------------------------


class TableSource(Protocol):
    """What a layer offers `rotate_mixed` (`RoadLayer` does): its cache, and its tables built afresh."""

    feature_dim: int
    _cache: cache.LayerCache

    def _adapters_among(self, names: Iterable[str]) -> list[str]:
        """The named adapters this layer has (the parameters its tables read)."""

    def _build_tables(self, names: tuple[str, ...]) -> list[rf.Rotation]:
        """One table per group size, a row per name."""


def table(
    names: tuple[str, ...], coefficients: Mapping[str, rf.Coefficients], out_features: int, group_size: int, dim: int
) -> rf.Rotation:
    """Stacked coefficients, one row per name: the given adapters' `coefficients`, and the identity for every
    other name (`__base__`, adapters a layer lacks, and adapters of another group size, which are applied in
    their own pass)."""
    c0 = next(iter(coefficients.values()))[0]
    ident = rf.identity(out_features, dtype=c0.dtype, device=c0.device)
    rows = [coefficients.get(n, ident) for n in names]
    return rf.rotation((torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])), group_size, dim)


def tables_for(routing: Routing, layer: TableSource) -> list[rf.Rotation]:
    """The layer's coefficient tables for this routing, pinned on the routing.

    `RoadModel.route` looks them up for every layer before the model runs, and a compiled model receives
    them as inputs. In eager mode every call checks them against the layer's cache, so a routing made before
    the adapters changed (an optimizer step, `load_adapter_values`) serves the new values; inside a graph a
    layer that finds none builds them there.
    """
    pinned = routing.tables.get(layer)
    if not cache.readable():
        return pinned[1][2] if pinned else layer._build_tables(routing.names)
    if pinned is not None and layer._cache.holds(pinned):
        return pinned[1][2]
    names = routing.names  # first use, or the adapters changed since: from the layer's cache
    key = ("tables", names)
    tables = layer._cache.get(key, lambda: layer._adapters_among(names), lambda: layer._build_tables(names))
    pinned = layer._cache.pin(key, tables)
    if pinned is not None:
        routing.tables[layer] = pinned
    return tables


def rotate_mixed(layer: TableSource, routing: Routing, x: torch.Tensor) -> torch.Tensor:
    """A layer's output x with each row (or token) rotated by its adapter: one gather and one fused pass
    per group size, however many adapters share the batch."""
    dim = layer.feature_dim % x.dim()
    index = fit_index(routing.index_on(x.device), x.shape[:dim], routing.batch_shape)
    for t in tables_for(routing, layer):
        x = rf.rotate_indexed(x, t.coeffs, index, t.group_size, dim, t.prepared, routing.scratch)
    return x


def fit_index(index: torch.Tensor, lead: torch.Size, batch_shape: Optional[tuple[int, ...]]) -> torch.Tensor:
    """The index, fitted to an output whose leading axes (before the features) are `lead`: as it is, or
    reshaped where those axes are the tokens in another shape (flat [tokens] indices on (batch, seq)
    outputs, per-row indices on flattened (batch*seq) rows); a ValueError if neither fits."""
    if index.dim() <= len(lead) and tuple(lead[: index.dim()]) == tuple(index.shape):
        return index
    if index.numel() == lead.numel():
        index = index.reshape(lead)
    elif batch_shape is not None and lead.numel() == torch.Size(batch_shape).numel():
        per_token = index.reshape(tuple(index.shape) + (1,) * (len(batch_shape) - index.dim()))
        index = per_token.expand(batch_shape).reshape(lead)
    if index.dim() > len(lead) or tuple(lead[: index.dim()]) != tuple(index.shape):
        raise InputError(
            f"adapter routing of shape {tuple(index.shape)} does not match the leading dimensions "
            f"{tuple(lead)} of this layer's output: give one adapter per batch row (or per token)."
        )
    return index
