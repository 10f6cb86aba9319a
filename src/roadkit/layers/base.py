"""`RoadLayer`: the adapter state and behaviour shared by every wrapped layer type.

A wrapped layer computes its base output x and rotates its features: y = R_n ... R_1 x for the
active adapters in activation order. Subclasses say where the features live (`feature_dim` of the
output, `weight_feature_dim` of the parameters that merging rotates) and how many there are.

Three forward paths: training (straight from the parameters, differentiable), serving (eval mode, no
grad: rotations from the layer's cache, `cache.LayerCache`), and mixed batches (a `Routing` set by the
model wrapper for one call: `routing.rotate_mixed`).
"""

from __future__ import annotations

import warnings
from typing import Any, Iterable, Optional, Union

import torch
from torch import nn

from .. import functional as rf
from ..cache import AdapterParameters, LayerCache, readable
from ..config import normalize_variant
from ..errors import InputError
from ..routing import Routing, rotate_mixed, table
from ..subspace import Spec, free_entries

_SERVING = "serving"  # the cache key of the serving path's rotations


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
        # What the inference paths derive from the parameters. Emptied on every adapter change, merge, dtype or
        # device move, and `train()`.
        self._cache = LayerCache(self.road_theta, self.road_alpha)
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
        rf.check_group_size(self.out_features, group_size, where=type(self).__name__)
        free = free_entries(subspace, variant, group_size, self.out_features, where=type(self).__name__)
        n = rf.parameter_length(variant, self.out_features) if free is None else len(free)
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
            raise InputError(f"adapter {adapter_name!r} is merged into this layer; unmerge it before deleting it.")
        for store in (self.road_theta, self.road_alpha, self.variant, self.group_size, self.free):
            if adapter_name in store:
                del store[adapter_name]
        self._active_adapters = [a for a in self._active_adapters if a != adapter_name]
        self._cache.clear()
        self._cache.forget(self._cache.params(self.road_theta))

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
        n = rf.parameter_length(self.variant[adapter_name], self.out_features)
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

    def coefficients(self, adapter_name: str, dtype: Optional[torch.dtype] = None) -> rf.Coefficients:
        """(c, s) of one adapter (in `dtype`, default the parameters'); cached in eval mode, while its
        parameters are unchanged and no gradient is needed (the serving path)."""
        needs_grad = torch.is_grad_enabled() and self.road_theta[adapter_name].requires_grad
        if self.training or needs_grad or not readable():
            return self._coefficients(adapter_name, dtype)
        return self._cache.get(
            ("coefficients", adapter_name, dtype),
            lambda: (adapter_name,),
            lambda: self._coefficients(adapter_name, dtype),
        )

    def _coefficients(self, adapter_name: str, dtype: Optional[torch.dtype]) -> rf.Coefficients:
        theta, alpha = self.parameters_of(adapter_name)
        if dtype is not None:
            theta, alpha = theta.to(dtype), alpha.to(dtype)
        return rf.coefficients(self.variant[adapter_name], self.group_size[adapter_name], theta, alpha)

    def _adapters_among(self, names: Iterable[str]) -> list[str]:
        """The named adapters this layer has."""
        return [n for n in names if n in self.road_theta._parameters]

    def _group_sizes(self, names: Iterable[str]) -> list[int]:
        """The distinct group sizes of the named adapters this layer has, in order."""
        return sorted({self.group_size[n] for n in self._adapters_among(names)})

    def _build_tables(self, names: tuple[str, ...]) -> list[rf.Rotation]:
        """A mixed batch's coefficient tables (`routing.table`): one per group size, a row per name."""
        return [
            table(
                names,
                {n: self._coefficients(n, None) for n in self._adapters_among(names) if self.group_size[n] == g},
                self.out_features,
                g,
                self.feature_dim,
            )
            for g in self._group_sizes(names)
        ]

    def _apply(self, fn: Any, recurse: bool = True) -> RoadLayer:
        self._cache.clear()  # a dtype or device move changes storage without a version bump
        return super()._apply(fn, recurse)

    def train(self, mode: bool = True) -> RoadLayer:
        """Set training mode; entering it drops the inference cache (training does not use it)."""
        if mode:
            self._cache.clear()
        return super().train(mode)

    # ---- forward -------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return self._undo_merged(result)
        if self.routing is not None:
            return rotate_mixed(self, self.routing, result)
        if not (self.training or torch.is_grad_enabled()) and readable():
            for r in self._serving_rotations():
                result = rf.rotate(result, r.coeffs, r.group_size, self.feature_dim, r.prepared)
            return result
        for name in self._active_adapters:
            if name not in self.road_theta or name in self.merged_adapters:
                continue
            g = self.group_size[name]
            if torch.is_grad_enabled() and self.road_theta[name].requires_grad:  # training: one fused pass
                result = rf.road(result, self.variant[name], g, *self.parameters_of(name), self.feature_dim)
            else:
                result = rf.rotate(result, self.coefficients(name), g, self.feature_dim)
        return result

    def _serving_rotations(self) -> list[rf.Rotation]:
        """The rotations of the active, unmerged adapters, in order: the eval-mode, no-grad path.

        One cache entry for all of them, checked per call with one stamp of the parameters it was built
        from, so serving pays almost no Python beyond the rotation itself.
        """
        rotations = self._cache.value(_SERVING)
        if rotations is None:
            merged, active = self.merged_adapters, self._active_adapters
            names = [n for n in self._adapters_among(active) if n not in merged]
            rotations = self._cache.get(_SERVING, lambda: names, lambda: [self._rotation(n) for n in names])
        return rotations

    def _rotation(self, adapter_name: str) -> rf.Rotation:
        return rf.rotation(self._coefficients(adapter_name, None), self.group_size[adapter_name], self.feature_dim)

    def _undo_merged(self, result: torch.Tensor) -> torch.Tensor:
        """Base output of a layer whose weights hold merged adapters, without touching the weights."""
        for name in reversed(self.merged_adapters):
            inv = rf.inverse(self.coefficients(name), self.group_size[name])
            result = rf.rotate(result, inv, self.group_size[name], self.feature_dim)
        return result

    # ---- merging -------------------------------------------------------------------------------

    def _merge_params(self) -> list[torch.Tensor]:
        """The parameters whose output-feature rows merging rotates (weight and bias)."""
        base = self.base_layer
        return [p for p in (getattr(base, "weight", None), getattr(base, "bias", None)) if p is not None]

    def _rows(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """Views of weight and bias with the output features first, as the row rotation takes them."""
        return [p.movedim(self.weight_feature_dim, 0) if p.dim() > 1 else p for p in params]

    def _rotate_params(self, coeffs: rf.Coefficients, group_size: int) -> None:
        """Rotate the output-feature rows of weight and bias in place."""
        for p in self._rows([p.data for p in self._merge_params()]):
            rf.rotate_rows_(p, coeffs, group_size)

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
                rf.rotate_rows_(p, coeffs, self.group_size[name])
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
                raise InputError(f"{problem}; nothing was changed.")
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
            inv = rf.inverse(self.coefficients(name, dtype=torch.float64), self.group_size[name])
            self._rotate_params(inv, self.group_size[name])
            self.merged_adapters.pop()
            self._cache.clear()
