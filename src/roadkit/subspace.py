"""Subspaces: which rotation pairs of a layer an adapter may move.

Pair p of a layer (0 <= p < d_out / 2) is the 2x2 block on features a = k*g + j and
b = a + g/2, where g is the group size, k = p // (g/2) and j = p % (g/2). An adapter restricted
to a subspace owns a subset of the pairs of every layer it targets; every other pair is exactly the
identity. Adapters that own disjoint pairs act on disjoint 2D subspaces of the hidden states and
can be combined without retraining (see `roadkit.composition`).

A subspace spec is a JSON-able dict, normalised by `normalize_spec`:

    {"shard": k, "num_shards": n}   pairs p with floor(p * n / P) == k (contiguous, n disjoint shards)
    {"fraction": f, "seed": s}      round(f * P) pairs (at least one) drawn at random with this seed
    {"pairs": [p, ...]}             these pair indices, in every targeted layer
    {"union": [spec, ...]}          every pair any of these specs selects (what composing produces)
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from .errors import InputError

Spec = dict[str, Any]


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def normalize_spec(spec: Any) -> Optional[Spec]:
    """Validate a subspace spec; shorthands: "k/n" (a shard), a list of pair indices, a float fraction."""
    if spec is None:
        return None
    if isinstance(spec, str):
        k, sep, n = spec.partition("/")
        if not sep or not k.strip().isdigit() or not n.strip().isdigit():
            raise InputError(f'RoadConfig.subspace={spec!r}: a string subspace must be a shard "k/n", e.g. "0/2".')
        spec = {"shard": int(k), "num_shards": int(n)}
    elif isinstance(spec, (list, tuple)):
        spec = {"pairs": list(spec)}
    elif isinstance(spec, float):
        spec = {"fraction": spec, "seed": 0}
    if not isinstance(spec, dict):
        raise TypeError(
            f'RoadConfig.subspace must be a dict, "k/n", a list of pair indices or a fraction, '
            f"got {type(spec).__name__}: {spec!r}."
        )
    keys = set(spec)
    if keys == {"shard", "num_shards"}:
        k, n = spec["shard"], spec["num_shards"]
        if not (_int(k) and _int(n) and n >= 1 and 0 <= k < n):
            raise InputError(f"RoadConfig.subspace={spec!r}: need integers 0 <= shard < num_shards.")
        return {"shard": k, "num_shards": n}
    if keys in ({"fraction"}, {"fraction", "seed"}):
        f, seed = spec["fraction"], spec.get("seed", 0)
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f <= 1 or not _int(seed):
            raise InputError(f"RoadConfig.subspace={spec!r}: need 0 < fraction <= 1 and an integer seed.")
        return {"fraction": float(f), "seed": seed}
    if keys == {"pairs"}:
        pairs = spec["pairs"]
        if not isinstance(pairs, (list, tuple)) or not pairs or not all(_int(p) and p >= 0 for p in pairs):
            raise InputError(
                f'RoadConfig.subspace={spec!r}: "pairs" must be a non-empty list of non-negative pair indices.'
            )
        return {"pairs": sorted(set(pairs))}
    if keys == {"union"}:
        parts = spec["union"]
        if not isinstance(parts, (list, tuple)) or not parts or any(p is None for p in parts):
            raise InputError(
                f'RoadConfig.subspace={spec!r}: "union" must be a non-empty list of subspaces '
                "(None, the whole layer, is not a part of a union)."
            )
        return {"union": [normalize_spec(p) for p in parts]}
    raise InputError(
        f"RoadConfig.subspace={spec!r} is not a subspace; allowed forms: "
        '{"shard": k, "num_shards": n}, {"fraction": f, "seed": s}, {"pairs": [...]}, '
        '{"union": [...]}, or the shorthands "k/n", [p, ...], f.'
    )


def pairs_of(spec: Optional[Spec], n_pairs: int, where: str = "layer") -> torch.Tensor:
    """The sorted pair indices (int64, CPU) that `spec` selects in a layer with `n_pairs` pairs."""
    if spec is None:
        return torch.arange(n_pairs)
    if "shard" in spec:
        owner = torch.arange(n_pairs) * spec["num_shards"] // n_pairs
        return torch.nonzero(owner == spec["shard"]).flatten()
    if "fraction" in spec:
        k = max(1, round(spec["fraction"] * n_pairs))
        gen = torch.Generator().manual_seed(spec["seed"])
        return torch.randperm(n_pairs, generator=gen)[:k].sort().values
    if "pairs" in spec:
        pairs = torch.tensor(spec["pairs"], dtype=torch.int64)
        if int(pairs.max()) >= n_pairs:
            raise InputError(
                f"{where}: subspace pair {int(pairs.max())} is out of range; this layer has "
                f"{n_pairs} pairs (0..{n_pairs - 1})."
            )
        return pairs
    return torch.cat([pairs_of(p, n_pairs, where) for p in spec["union"]]).unique()


def entries_of(variant: str, group_size: int, pairs: torch.Tensor) -> torch.Tensor:
    """The sorted entries of `road_theta` / `road_alpha` that describe the given pairs.

    `variant` is canonical ("road_1" | "road_2" | "road_4"): road_1 has one entry per pair; road_2
    one per feature (a and b); road_4 two per feature, laid out as (groups, 2, group_size).
    """
    half = group_size // 2
    if variant == "road_1":
        return pairs.clone()
    if variant == "road_2":
        return features_of(pairs, group_size)
    base = pairs // half * 2 * group_size + pairs % half
    return torch.cat((base, base + half, base + group_size, base + group_size + half)).sort().values


def features_of(pairs: torch.Tensor, group_size: int) -> torch.Tensor:
    """The sorted features (a and b) of the given pairs."""
    half = group_size // 2
    a = pairs // half * group_size + pairs % half
    return torch.cat((a, a + half)).sort().values


def free_entries(
    spec: Optional[Spec], variant: str, group_size: int, out_features: int, where: str = "layer"
) -> Optional[torch.Tensor]:
    """Entries of a layer's parameters an adapter may move; None when it owns every pair."""
    if spec is None:
        return None
    pairs = pairs_of(spec, out_features // 2, where)
    if not len(pairs):
        raise InputError(
            f"{where}: subspace {spec} selects none of its {out_features // 2} pairs; use fewer "
            "shards or a larger fraction."
        )
    return entries_of(variant, group_size, pairs)


def outside_count(
    spec: Optional[Spec],
    variant: str,
    group_size: int,
    out_features: int,
    theta: torch.Tensor,
    alpha: torch.Tensor,
    where: str = "layer",
) -> int:
    """How many entries of a layer's full-length (theta, alpha) lie outside the subspace `spec` and
    are not the identity (0, 1): what a file must not have to be loaded as this subspace adapter."""
    free = free_entries(spec, variant, group_size, out_features, where)
    if free is None:
        return 0
    outside = torch.ones(theta.numel(), dtype=torch.bool)
    outside[free] = False
    return int(((theta.detach().cpu()[outside] != 0) | (alpha.detach().cpu()[outside] != 1)).sum())
