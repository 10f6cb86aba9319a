"""`RoadConfig`: what a RoAd adapter is, validated on construction, stored as `adapter_config.json`."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Optional, TypedDict, Union

from .errors import InputError, MissingFileError
from .fileio import atomic_write_bytes
from .subspace import Spec, normalize_spec

PEFT_TYPE = "ROAD"
CONFIG_NAME = "adapter_config.json"
VARIANTS = ("road_1", "road_2", "road_4")
# Heads that a sequence-classification adapter must train and save alongside the rotations.
SEQ_CLS_HEADS = ("classifier", "score")
# Fields PEFT's RoadConfig lacks; written only when set.
ROADKIT_ONLY = ("exclude_modules", "layers_to_transform", "layers_pattern", "subspace")
# The PEFT version whose file layout we write; PEFT reads this key only for information.
PEFT_FORMAT_VERSION = "0.17.0"


def normalize_variant(variant: Any) -> str:
    """Map "road_1" | "1" | 1 (and likewise 2, 4) to the canonical "road_N" name."""
    text = str(variant).strip()
    name = text if text.startswith("road_") else f"road_{text}"
    if name not in VARIANTS:
        raise InputError(
            f"RoadConfig.variant={variant!r} is not supported; allowed: {', '.join(VARIANTS)} (or 1, 2, 4)."
        )
    return name


def _check_name_list(field_name: str, value: Any, allow_regex: bool) -> Any:
    if value is None:
        return None
    if isinstance(value, str):
        if allow_regex:
            return value
        return [value]
    if isinstance(value, (list, tuple, set, frozenset)):
        items = list(value)
        bad = [v for v in items if not isinstance(v, str) or not v]
        if bad:
            raise InputError(f"RoadConfig.{field_name} must hold non-empty module names, got {bad!r}.")
        # Sets are accepted (PEFT's own configs hold them) but stored sorted so files are reproducible.
        return sorted(items) if isinstance(value, (set, frozenset)) else items
    kinds = "a list of module names or a regex string" if allow_regex else "a list of module names"
    raise TypeError(f"RoadConfig.{field_name} must be {kinds}, got {type(value).__name__}: {value!r}.")


class LayerSettings(TypedDict):
    """One adapter's settings as a RoAd layer takes them: the part of `RoadConfig` that is per layer."""

    variant: str
    group_size: int
    init_weights: bool
    subspace: Optional[Spec]


@dataclass
class RoadConfig:
    """Configuration of one RoAd adapter; field names and meanings follow PEFT's `RoadConfig`.

    Args:
        variant: "road_1" (one angle/scale per pair), "road_2" (per feature) or "road_4"
            (separate angle/scale for the cos and sin terms); "1", "2", "4" are accepted too.
        group_size: features are paired inside consecutive groups of this (even) size:
            feature j with feature j + group_size/2. Every targeted layer's output size must divide by it.
        init_weights: True starts at the identity (theta=0, alpha=1); False draws random values.
        target_modules: list of names (exact, or a suffix after a dot), one regex string that must
            match the whole module name, "all-linear", or None for the architecture's defaults.
        exclude_modules: modules never targeted; a list (exact / suffix) or a regex string.
        layers_to_transform: restrict targets to these layer indices (int or list of ints).
        layers_pattern: name(s) of the module list holding the layers, e.g. "layers" or "h".
        modules_to_save: further modules trained in full and saved with the adapter (e.g. a head).
        task_type: PEFT task type; "SEQ_CLS" adds "classifier" and "score" to modules_to_save.
        subspace: restrict the adapter to some rotation pairs of every layer; the others stay exactly
            the identity and are not parameters at all. {"shard": k, "num_shards": n} (or "k/n"),
            {"fraction": f, "seed": s}, {"pairs": [...]}; see `roadkit.subspace`. A roadkit key:
            PEFT loads the saved tensors (identity outside the subspace) and ignores it.
    """

    variant: str = "road_1"
    group_size: int = 64
    init_weights: bool = True
    target_modules: Optional[Union[list[str], str]] = None
    exclude_modules: Optional[Union[list[str], str]] = None
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None
    modules_to_save: Optional[list[str]] = None
    task_type: Optional[str] = None
    base_model_name_or_path: Optional[str] = None
    revision: Optional[str] = None
    inference_mode: bool = False
    subspace: Optional[dict[str, Any]] = None
    peft_type: str = field(default=PEFT_TYPE, init=False)

    def __post_init__(self) -> None:
        self.variant = normalize_variant(self.variant)
        gs = self.group_size
        if isinstance(gs, bool) or not isinstance(gs, int) or gs <= 0 or gs % 2:
            raise InputError(f"RoadConfig.group_size must be a positive even integer, got {gs!r}.")
        if not isinstance(self.init_weights, bool):
            raise TypeError(f"RoadConfig.init_weights must be True or False, got {self.init_weights!r}.")
        self.target_modules = _check_name_list("target_modules", self.target_modules, allow_regex=True)
        self.exclude_modules = _check_name_list("exclude_modules", self.exclude_modules, allow_regex=True)
        self.layers_pattern = _check_name_list("layers_pattern", self.layers_pattern, allow_regex=False)
        self.modules_to_save = _check_name_list("modules_to_save", self.modules_to_save, allow_regex=False)
        ltt = self.layers_to_transform
        if ltt is not None:
            items = [ltt] if isinstance(ltt, int) and not isinstance(ltt, bool) else ltt
            if not isinstance(items, (list, tuple)) or not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in items
            ):
                raise InputError(
                    f"RoadConfig.layers_to_transform must be a layer index or a list of "
                    f"non-negative layer indices, got {ltt!r}."
                )
            self.layers_to_transform = list(items)
        self.subspace = normalize_spec(self.subspace)
        if self.task_type == "SEQ_CLS":
            extra = [h for h in SEQ_CLS_HEADS if h not in (self.modules_to_save or [])]
            self.modules_to_save = (self.modules_to_save or []) + extra

    def layer_settings(self) -> LayerSettings:
        """What each targeted layer takes from this config (`RoadLayer.update_layer`'s keywords)."""
        return LayerSettings(
            variant=self.variant, group_size=self.group_size, init_weights=self.init_weights, subspace=self.subspace
        )

    # ---- serialisation -------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The keys written to `adapter_config.json`: PEFT's, plus roadkit-only fields when they are set
        (PEFT's RoadConfig warns about keys it does not know)."""
        out = {k: v for k, v in dataclasses.asdict(self).items() if k not in ROADKIT_ONLY or v is not None}
        out["auto_mapping"] = None
        out["peft_version"] = PEFT_FORMAT_VERSION
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RoadConfig":
        """Build from a parsed `adapter_config.json`; unknown keys (other PEFT versions) are ignored."""
        peft_type = data.get("peft_type", PEFT_TYPE)
        if peft_type != PEFT_TYPE:
            raise InputError(f"adapter config has peft_type={peft_type!r}; roadkit loads only {PEFT_TYPE!r}.")
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        return cls(**{k: v for k, v in data.items() if k in names})

    def save_pretrained(self, directory: Union[str, os.PathLike]) -> None:
        """Write `adapter_config.json` into `directory` atomically."""
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"
        atomic_write_bytes(os.path.join(directory, CONFIG_NAME), text.encode())

    @classmethod
    def from_pretrained(cls, directory: Union[str, os.PathLike]) -> "RoadConfig":
        """Read `adapter_config.json` from a local adapter directory."""
        path = os.path.join(directory, CONFIG_NAME)
        if not os.path.isfile(path):
            raise MissingFileError(f"no {CONFIG_NAME} in {os.fspath(directory)!r}: not an adapter directory.")
        with open(path, encoding="utf-8") as fh:
            try:
                data = json.load(fh)
            except json.JSONDecodeError as err:
                raise InputError(f"{path} is not valid JSON: {err}") from err
        return cls.from_dict(data)
