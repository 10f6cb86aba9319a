"""`RoadLayer`: the adapter state and behaviour shared by every wrapped layer type.

A wrapped layer computes its base output x and rotates its features: y = R_n ... R_1 x for the
active adapters in activation order. Subclasses say where the features live (`feature_dim` of the
output, `weight_feature_dim` of the parameters that merging rotates) and how many there are.
"""

from __future__ import annotations

import functools
import operator
import warnings
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Iterable, Optional, TypeVar, Union, cast

import torch
from torch import nn

from .. import functional as F
from ..config import normalize_variant
from ..subspace import Spec, free_entries

BASE = "__base__"
_T = TypeVar("_T")

_version = operator.attrgetter("_version")  # a tensor's in-place update count

# Per layer: the serving rotations, coefficients in use, and the tables (and group sizes) of the most recent
# mixed-batch adapter lists. Bounded: a server with continuous batching sees a new list on most calls.
CACHE_ENTRIES = 16
_SERVING = "serving"  # the cache key of the serving path's rotations


def _clear_cache_of(layer: weakref.ref, param: torch.Tensor) -> None:
    """A parameter's post-accumulate-grad hook (`RoadLayer._watch`): empty its layer's cache."""
    alive = layer()
    if alive is not None:
        alive._cache.clear()


class AdapterParameters(nn.ParameterDict):
    """An `nn.ParameterDict` that counts the entries put in or taken out (`generation`), so the
    layer's cache can tell with one integer that a parameter object was replaced or deleted."""

    generation: int = 0

    def __setattr__(self, name: str, value: Any) -> None:
        object.__setattr__(self, "generation", self.generation + 1)
        super().__setattr__(name, value)

    def __delattr__(self, name: str) -> None:
        object.__setattr__(self, "generation", self.generation + 1)
        super().__delattr__(name)


@dataclass(frozen=True)
class _Prepared:
    """A rotation as the inference paths apply it: coefficients (one adapter's, or a table with a
    row per adapter for mixed batches), the same as the kernel backend packs them, and the group size."""

    coeffs: F.Coefficients
    prepared: Any
    group_size: int


class LayerCache(OrderedDict):
    """A layer's cache: key -> (parameters read, their stamp, value), least recently used first.
    `generation` counts the times entries were dropped, so whoever holds a value built here (a
    `Routing`'s tables) can tell with one comparison whether it may have gone stale."""

    generation = 0

    def clear(self) -> None:
        self.generation += 1
        super().clear()

    def popitem(self, last: bool = True) -> tuple:
        self.generation += 1
        return super().popitem(last)


@dataclass(frozen=True, eq=False)
class Routing:
    """Which adapter each batch row (or token) uses: `index` points into `names` (int32, which the
    mixed-batch kernels read as is).

    `batch_shape` is the (batch, seq) of the model input, when known: it lets per-row indices
    reach layers that see the batch flattened to (batch * seq) rows (OPT's MLP, for one).
    `tables` holds each layer's coefficient tables for this routing (`RoadLayer.tables_for`, with what
    tells whether they are still current), and
    `rows` the kernel backend's scratch for this routing (`kernels.new_memo`: on the torch path, the
    per-row coefficients gathered from the tables, kept from their second use on, so the decode
    steps of one `generate` call do not gather again; None under torch.compile, which fuses the
    gather into the rotation); both go when the routing does.
    """

    names: tuple[str, ...]
    index: torch.Tensor
    batch_shape: Optional[tuple[int, ...]] = None
    tables: dict = field(default_factory=dict)
    rows: Any = None


def delegated(name: str) -> property:
    """A read-only attribute read from the wrapped base layer, like PEFT's layers: code written for the
    base layer type (transformers' `resize_token_embeddings`, tied weights, `get_input_embeddings().weight`)
    then works on the wrapper, and always sees the base layer's current value."""
    return property(lambda self: getattr(self.base_layer, name), doc=f"The base layer's `{name}` (read-only).")


class RoadLayer(nn.Module):
    """Base class of RoAd-wrapped layers: per-adapter `road_theta` / `road_alpha`, merging, mixed batches."""

    weight = delegated("weight")
    bias = delegated("bias")

    feature_dim: int = -1  # axis of the base output that holds the features
    weight_feature_dim: int = 0  # axis of weight (and bias) that holds the output features
    base_type: str = ""  # the base layer type a subclass wraps, for messages
    linear_like: bool = False  # selected by target_modules="all-linear"

    @staticmethod
    def wraps(module: nn.Module) -> bool:
        """Whether this wrapper class can wrap `module` (each subclass says)."""
        return False

    @staticmethod
    def features_of(module: nn.Module) -> int:
        """How many output features of `module` the rotation acts on."""
        raise NotImplementedError

    @staticmethod
    def in_features_of(module: nn.Module) -> int:
        """The size of `module`'s input (for information, like nn.Linear.in_features)."""
        raise NotImplementedError

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str = "default",
        variant: str = "road_1",
        group_size: int = 64,
        init_weights: bool = True,
        subspace: Optional[Spec] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        """Wrap `base_layer` with one adapter, `adapter_name`, active (see `update_layer`)."""
        super().__init__()
        self.base_layer = base_layer
        self.road_theta = AdapterParameters()
        self.road_alpha = AdapterParameters()
        self.variant: dict[str, str] = {}
        self.group_size: dict[str, int] = {}
        self.free: dict[str, Optional[torch.Tensor]] = {}  # subspace adapters: parameter entries they own
        self._active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disable_adapters = False
        self.routing: Optional[Routing] = None  # set by the model wrapper for one mixed-batch call
        # The layer's one cache (see `_cached`): key -> (parameters read, their stamp, value), least recently
        # used first. Emptied on every adapter change, dtype or device move, and `train()`.
        self._cache: LayerCache = LayerCache()
        self._watched: dict[int, torch.Tensor] = {}  # id -> parameter: those whose gradients empty the cache
        self.update_layer(adapter_name, variant, group_size, init_weights, subspace, dtype)
        self.set_adapter(adapter_name)

    # ---- adapters ------------------------------------------------------------------------------

    def get_base_layer(self) -> nn.Module:
        return self.base_layer

    @property
    def out_features(self) -> int:
        """The number of output features the rotations act on (read from the base layer)."""
        return self.features_of(self.base_layer)

    @property
    def in_features(self) -> int:
        """The size of the base layer's input (read from the base layer)."""
        return self.in_features_of(self.base_layer)

    @property
    def active_adapters(self) -> list[str]:
        return list(self._active_adapters)

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def update_layer(
        self,
        adapter_name: str,
        variant: str = "road_1",
        group_size: int = 64,
        init_weights: bool = True,
        subspace: Optional[Spec] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        """Create (or re-create) the parameters of `adapter_name` on the base layer's device.

        `dtype` defaults to float32. With a `subspace`, the parameters hold only the entries of the
        pairs the adapter owns (`free`); every other pair is the identity and cannot change.
        """
        variant = normalize_variant(variant)
        F.check_group_size(self.out_features, group_size, where=type(self).__name__)
        free = free_entries(subspace, variant, group_size, self.out_features, where=type(self).__name__)
        n = F.parameter_length(variant, self.out_features) if free is None else len(free)
        device, dtype = self._base_device(), dtype or torch.float32
        self.road_theta[adapter_name] = nn.Parameter(torch.empty(n, device=device, dtype=dtype))
        self.road_alpha[adapter_name] = nn.Parameter(torch.empty(n, device=device, dtype=dtype))
        self.variant[adapter_name] = variant
        self.group_size[adapter_name] = group_size
        self.free[adapter_name] = free
        self.reset_parameters(adapter_name, init_weights)
        self._set_requires_grad()
        self._cache.clear()

    def reset_parameters(self, adapter_name: str, init_weights: bool = True) -> None:
        """Identity (theta=0, alpha=1) when `init_weights`, else theta ~ N(0, 0.5^2), alpha ~ N(1, 0.5^2)."""
        theta, alpha = self.road_theta[adapter_name], self.road_alpha[adapter_name]
        with torch.no_grad():
            if init_weights:
                theta.zero_()
                alpha.fill_(1.0)
            else:
                theta.normal_(0.0, 0.5)
                alpha.normal_(1.0, 0.5)

    def set_adapter(self, adapter_names: Union[str, Iterable[str]]) -> None:
        """Activate these adapters (in this order); only active adapters' parameters train."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        self._active_adapters = names
        self._cache.clear()
        self._set_requires_grad()

    def _set_requires_grad(self) -> None:
        for name in self.road_theta:
            on = name in self._active_adapters
            self.road_theta[name].requires_grad_(on)
            self.road_alpha[name].requires_grad_(on)

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.merged_adapters:
            raise ValueError(f"adapter {adapter_name!r} is merged into this layer; unmerge it before deleting it.")
        for store in (self.road_theta, self.road_alpha, self.variant, self.group_size, self.free):
            if adapter_name in store:
                del store[adapter_name]
        self._active_adapters = [a for a in self._active_adapters if a != adapter_name]
        self._cache.clear()
        kept = {id(p) for p in self._params(self.road_theta)}
        self._watched = {i: p for i, p in self._watched.items() if i in kept}

    def _base_device(self) -> torch.device:
        for p in self.base_layer.parameters():
            return p.device
        return torch.device("cpu")

    # ---- parameters ----------------------------------------------------------------------------

    def parameters_of(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Full-length (theta, alpha) of one adapter, as PEFT stores them; for a subspace adapter, the
        identity (0, 1) with its own entries scattered in (differentiably)."""
        theta, alpha = self.road_theta[adapter_name], self.road_alpha[adapter_name]
        free = self.free[adapter_name]
        if free is None:
            return theta, alpha
        free = free.to(theta.device)
        n = F.parameter_length(self.variant[adapter_name], self.out_features)
        return (theta.new_zeros(n).index_copy(0, free, theta), alpha.new_ones(n).index_copy(0, free, alpha))

    @torch.no_grad()
    def load_parameters(self, adapter_name: str, theta: torch.Tensor, alpha: torch.Tensor) -> None:
        """Copy full-length (theta, alpha) in; a subspace adapter keeps only its own entries (callers
        check with `subspace.outside_count` first that the rest is the identity)."""
        free = self.free[adapter_name]
        if free is not None:
            theta, alpha = theta[free], alpha[free]
        self.road_theta[adapter_name].copy_(theta)
        self.road_alpha[adapter_name].copy_(alpha)

    # ---- coefficients --------------------------------------------------------------------------

    def coefficients(self, adapter_name: str, dtype: Optional[torch.dtype] = None) -> F.Coefficients:
        """(c, s) of one adapter (in `dtype`, default the parameters'); cached in eval mode, while its
        parameters are unchanged and no gradient is needed (the serving path)."""
        if (
            self.training
            or (torch.is_grad_enabled() and self.road_theta[adapter_name].requires_grad)
            or torch.compiler.is_compiling()
        ):
            return self._coefficients(adapter_name, dtype)
        return self._cached(
            ("coefficients", adapter_name, dtype),
            lambda: (adapter_name,),
            lambda: self._coefficients(adapter_name, dtype),
        )

    def _coefficients(self, adapter_name: str, dtype: Optional[torch.dtype]) -> F.Coefficients:
        theta, alpha = self.parameters_of(adapter_name)
        if dtype is not None:
            theta, alpha = theta.to(dtype), alpha.to(dtype)
        return F.coefficients(self.variant[adapter_name], self.group_size[adapter_name], theta, alpha)

    def _params(self, names: Iterable[str]) -> list[torch.Tensor]:
        """theta and alpha of each named adapter, in the form `_stamp` reads."""
        # A ParameterDict holds no None entries (unlike the `_parameters` type says).
        tp = cast("dict[str, torch.Tensor]", self.road_theta._parameters)
        ap = cast("dict[str, torch.Tensor]", self.road_alpha._parameters)
        return [p for n in names for p in (tp[n], ap[n])]

    def _stamp(self, params: list[torch.Tensor]) -> tuple:
        """Changes whenever these parameters (`_params`) may have through their own operations: an in-place
        update (their version counters only grow, so their sum grows too; `load_state_dict` copies in place)
        or a replaced or deleted entry (`AdapterParameters.generation`). Optimizer steps are the one update
        it cannot see (fused optimizers, `AdamW(fused=True)` as the HF Trainer uses it, bump no version
        counter); `_watch` covers those. Edits through `.data` bypass version counters; make them under
        `torch.no_grad()` instead.

        It is checked on every inference call, after a matmul has pushed the interpreter out of
        cache, so it reads plain dicts and integers only.
        """
        modules: dict[str, Any] = self._modules  # not self.road_theta: nn.Module.__getattr__ is slow on this hot path
        return (modules["road_theta"].generation, modules["road_alpha"].generation, sum(map(_version, params)))

    def _watch(self, params: list[torch.Tensor]) -> None:
        """Have a gradient reaching any of these parameters empty the cache: an optimizer step, which no stamp
        sees, can only follow one. The hooks are the parameters' own (`register_post_accumulate_grad_hook`),
        registered once per parameter object, and hold the layer weakly. A frozen parameter (an inactive
        adapter's) gets its hook too, for the day it is made trainable: torch registers hooks only on tensors
        that require grad, so it does for the moment of the registration."""
        for p in params:
            if self._watched.get(id(p)) is not p:
                frozen = not p.requires_grad
                p.requires_grad_(True)
                p.register_post_accumulate_grad_hook(functools.partial(_clear_cache_of, weakref.ref(self)))
                p.requires_grad_(not frozen)
                self._watched[id(p)] = p

    def _cached(self, key: Hashable, reads: Callable[[], Iterable[str]], build: Callable[[], _T]) -> _T:
        """`build()`, run without grad, kept in the layer's cache under `key` while the parameters of the
        adapters it reads (`reads()`, asked on a miss) are unchanged (`_stamp`). Adapter changes, moves and
        `train()` empty the cache, so an entry never outlives the adapter state it was built in."""
        hit = self._cache.get(key)
        if hit is not None and hit[1] == self._stamp(hit[0]):
            self._cache.move_to_end(key)
            return hit[2]
        return self._build_cached(key, reads(), build)

    def _build_cached(self, key: Hashable, names: Iterable[str], build: Callable[[], _T]) -> _T:
        """The miss of `_cached`: build, and keep the result unless a parameter holds a gradient (an optimizer
        step may then be pending; serving, and evaluation after `zero_grad()`, hold none)."""
        params = self._params(names)
        with torch.no_grad():
            value = build()
        if all(p.grad is None for p in params):
            self._watch(params)
            self._cache[key] = (params, self._stamp(params), value)
            self._cache.move_to_end(key)
            while len(self._cache) > CACHE_ENTRIES:
                self._cache.popitem(last=False)
        return value

    def _apply(self, fn: Any, recurse: bool = True) -> RoadLayer:
        self._cache.clear()  # a dtype or device move changes storage without a version bump
        return super()._apply(fn, recurse)

    def train(self, mode: bool = True) -> RoadLayer:
        """Set training mode; entering it drops the inference cache (training does not use it)."""
        if mode:
            self._cache.clear()
        return super().train(mode)

    def _build_table(self, names: tuple[str, ...], group_size: int) -> _Prepared:
        """Stacked coefficients, one row per name; identity for `__base__`, for adapters this layer
        lacks, and for adapters of another group size (those are applied in their own pass)."""
        coeffs = {
            n: self._coefficients(n, None) for n in names if n in self.road_theta and self.group_size[n] == group_size
        }
        c0 = next(iter(coeffs.values()))[0]
        ident = F.identity(self.out_features, dtype=c0.dtype, device=c0.device)
        rows = [coeffs.get(n, ident) for n in names]
        tables = (torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows]))
        return _Prepared(tables, F.prepare(tables, group_size, self.feature_dim), group_size)

    # ---- forward -------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return self._undo_merged(result)
        if self.routing is not None:
            return self._mixed_forward(result, self.routing)
        if not (self.training or torch.is_grad_enabled() or torch.compiler.is_compiling()):
            for r in self._serving_rotations():
                result = F.rotate(result, r.coeffs, r.group_size, self.feature_dim, r.prepared)
            return result
        for name in self._active_adapters:
            if name not in self.road_theta or name in self.merged_adapters:
                continue
            g = self.group_size[name]
            if (torch.is_grad_enabled() and self.road_theta[name].requires_grad) or torch.compiler.is_compiling():
                result = F.road(result, self.variant[name], g, *self.parameters_of(name), self.feature_dim)
            else:  # inference: coefficients cached while the parameters are unchanged
                result = F.rotate(result, self.coefficients(name), g, self.feature_dim)
        return result

    def _serving_rotations(self) -> list[_Prepared]:
        """The rotations of the active, unmerged adapters, in order: the eval-mode, no-grad path.

        One cache entry for all of them, checked per call with one stamp of the parameters it was built
        from, so serving pays almost no Python beyond the rotation itself.
        """
        hit = self._cache.get(_SERVING)
        if hit is not None and hit[1] == self._stamp(hit[0]):
            return hit[2]
        names = [n for n in self._active_adapters if n in self.road_theta._parameters and n not in self.merged_adapters]
        return self._build_cached(_SERVING, names, lambda: [self._rotation(n) for n in names])

    def _rotation(self, adapter_name: str) -> _Prepared:
        c, s = self._coefficients(adapter_name, None)
        g = self.group_size[adapter_name]
        return _Prepared((c, s), F.prepare((c, s), g, self.feature_dim), g)

    def _undo_merged(self, result: torch.Tensor) -> torch.Tensor:
        """Base output of a layer whose weights hold merged adapters, without touching the weights."""
        for name in reversed(self.merged_adapters):
            inv = F.inverse(self.coefficients(name), self.group_size[name])
            result = F.rotate(result, inv, self.group_size[name], self.feature_dim)
        return result

    def tables_for(self, routing: Routing) -> list[_Prepared]:
        """The coefficient tables for this routing, one per group size, kept on the routing.

        The model wrapper looks them up for every layer before the model runs, and a compiled model
        receives them as inputs. In eager mode every call checks them against the layer's cache, so a
        routing made before the adapters changed (an optimizer step, `load_adapter_values`) serves the
        new values; under torch.compile a layer that finds none builds them in the graph.
        """
        held = routing.tables.get(self)
        if torch.compiler.is_compiling():
            names = routing.names
            return held[1][2] if held else [self._build_table(names, g) for g in self._group_sizes(names)]
        if held is not None and held[0] == self._cache.generation and held[1][1] == self._stamp(held[1][0]):
            return held[1][2]
        names = routing.names  # first use, or the adapters changed since: from the layer's cache
        key = ("tables", names)
        tables = self._cached(
            key,
            lambda: [n for n in names if n in self.road_theta._parameters],
            lambda: [self._build_table(names, g) for g in self._group_sizes(names)],
        )
        entry = self._cache.get(key)  # (parameters, stamp, tables); kept with its generation on the routing
        if entry is not None and entry[2] is tables:
            routing.tables[self] = (self._cache.generation, entry)
        return tables

    def _group_sizes(self, names: Iterable[str]) -> list[int]:
        """The distinct group sizes of the named adapters this layer has, in order."""
        return sorted({self.group_size[n] for n in names if n in self.road_theta._parameters})

    def _mixed_forward(self, result: torch.Tensor, routing: Routing) -> torch.Tensor:
        """One gather and one fused pass per distinct group size, however many adapters share the batch."""
        dim = self.feature_dim % result.dim()
        index, lead = routing.index, result.shape[:dim]
        if index.dim() > dim or tuple(lead[: index.dim()]) != tuple(index.shape):
            index = self._reshape_index(index, lead, routing.batch_shape)
        if index.dim() > dim or tuple(lead[: index.dim()]) != tuple(index.shape):
            raise ValueError(
                f"adapter routing of shape {tuple(index.shape)} does not match the leading dimensions of "
                f"this layer's output {tuple(result.shape)}: give one adapter per batch row (or per token)."
            )
        for t in self.tables_for(routing):
            result = F.rotate_indexed(result, t.coeffs, index, t.group_size, dim, t.prepared, routing.rows)
        return result

    @staticmethod
    def _reshape_index(index: torch.Tensor, lead: torch.Size, batch_shape: Optional[tuple[int, ...]]):
        """Fit routing indices to an output whose leading axes are the tokens in another shape:
        flat [tokens] indices on (batch, seq) outputs, or per-row indices on flattened (batch*seq) rows."""
        if index.numel() == lead.numel():
            return index.reshape(lead)
        if batch_shape is not None and lead.numel() == torch.Size(batch_shape).numel():
            per_token = index.reshape(tuple(index.shape) + (1,) * (len(batch_shape) - index.dim()))
            return per_token.expand(batch_shape).reshape(lead)
        return index

    # ---- merging -------------------------------------------------------------------------------

    def _merge_params(self) -> list[torch.Tensor]:
        """The parameters whose output-feature rows merging rotates (weight and bias)."""
        base = self.base_layer
        return [p for p in (getattr(base, "weight", None), getattr(base, "bias", None)) if p is not None]

    def _rows(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """Views of weight and bias with the output features first, as the row rotation takes them."""
        return [p.movedim(self.weight_feature_dim, 0) if p.dim() > 1 else p for p in params]

    def _rotate_params(self, coeffs: F.Coefficients, group_size: int) -> None:
        """Rotate the output-feature rows of weight and bias in place."""
        for p in self._rows([p.data for p in self._merge_params()]):
            F.rotate_rows_(p, coeffs, group_size)

    def _to_merge(self, adapter_names: Optional[list[str]]) -> list[str]:
        names = self._active_adapters if adapter_names is None else list(adapter_names)
        return [n for n in names if n in self.road_theta and n not in self.merged_adapters]

    @torch.no_grad()
    def merge_problem(self, adapter_names: Optional[list[str]] = None) -> Optional[str]:
        """Why merging `adapter_names` (as `merge` picks them) would put NaN or inf into this layer's
        weights, or None. It works on copies: nothing changes."""
        return self._merge_problem(adapter_names)

    def _merge_problem(self, adapter_names: Optional[list[str]]) -> Optional[str]:
        copies = [p.data.clone() for p in self._merge_params()]
        for name in self._to_merge(adapter_names):
            coeffs = self.coefficients(name, dtype=torch.float64)
            for p in self._rows(copies):
                F.rotate_rows_(p, coeffs, self.group_size[name])
            if not all(torch.isfinite(c).all() for c in copies):
                return f"merging adapter {name!r} would put NaN or inf into the weights"
        return None

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Fold adapters into the base weights (W <- R W, b <- R b), elementwise over rows.

        `adapter_names` defaults to the active adapters not yet merged. With `safe_merge`, the result
        of all of them is checked for NaN/inf on copies first, and nothing changes if it has any.
        """
        if safe_merge:
            problem = self._merge_problem(adapter_names)
            if problem:
                raise ValueError(f"{problem}; nothing was changed.")
        for name in self._to_merge(adapter_names):  # merges compose: R_k ... R_1 W (coefficients in float64)
            self._rotate_params(self.coefficients(name, dtype=torch.float64), self.group_size[name])
            self.merged_adapters.append(name)
            self._cache.clear()

    @torch.no_grad()
    def unmerge(self, last: Optional[int] = None) -> None:
        """Undo merges, most recent first (W <- R^-1 W), in closed form: all of them, or the `last` few."""
        if not self.merged_adapters:
            warnings.warn("unmerge(): no adapter is merged into this layer; nothing to do.", stacklevel=2)
            return
        for _ in range(len(self.merged_adapters) if last is None else last):
            name = self.merged_adapters[-1]
            inv = F.inverse(self.coefficients(name, dtype=torch.float64), self.group_size[name])
            self._rotate_params(inv, self.group_size[name])
            self.merged_adapters.pop()
            self._cache.clear()
