"""Adapters in and out of a model: the tensors an adapter has on a model, the checks it must pass before
the model changes, and the copies between layers and PEFT-keyed tensors. `checkpoint` reads and writes
the files; this module knows the layers."""

from __future__ import annotations

import os
import warnings
from typing import Iterable, Optional

import torch
from torch import nn

from . import checkpoint as ckpt
from .config import RoadConfig
from .errors import InputError
from .fileio import PathLike
from .functional import check_group_size, parameter_length, value_problem
from .layers import ModulesToSaveWrapper, RoadLayer, base_of, out_features_of, road_layers, saved_wrappers
from .messages import some_of
from .subspace import free_entries, outside_count
from .targeting import select_modules_to_save, select_targets

Tensors = dict[str, torch.Tensor]  # an adapter's tensors under PEFT's keys (`checkpoint.adapter_key`)


def expected_tensors(model: nn.Module, config: RoadConfig) -> dict[str, torch.Size]:
    """Every tensor key (and shape) an adapter with `config` has on `model`; validates group sizes
    and the subspace."""
    shapes: dict[str, torch.Size] = {}
    for path in select_targets(model, config):
        n_out = out_features_of(base_of(model.get_submodule(path)))
        check_group_size(n_out, config.group_size, where=f"target module {path!r}")
        free_entries(config.subspace, config.variant, config.group_size, n_out, where=f"target module {path!r}")
        n = torch.Size([parameter_length(config.variant, n_out)])
        shapes[ckpt.adapter_key(path, "road_theta")] = n
        shapes[ckpt.adapter_key(path, "road_alpha")] = n
    for path in select_modules_to_save(model, config):
        module = model.get_submodule(path)
        original = module.original_module if isinstance(module, ModulesToSaveWrapper) else module
        for pname, t in original.state_dict().items():
            shapes[ckpt.adapter_key(path, pname)] = t.shape
    return shapes


def check_tensors(
    model: nn.Module,
    config: RoadConfig,
    tensors: Tensors,
    source: str,
    expected: Optional[dict[str, torch.Size]] = None,
    values: bool = True,
) -> None:
    """Raise InputError (naming `source`) unless `tensors` can be an adapter with `config` on `model`: the keys
    and shapes it has there (`expected`, default `expected_tensors`), nothing outside its subspace, and, with
    `values`, no NaN or infinite value and no degenerate rotation. Every check runs before the model changes."""
    _check_keys(expected_tensors(model, config) if expected is None else expected, tensors, source)
    _check_subspace(model, config, tensors, source)
    if values:
        _check_values(config, tensors, source)


def read_checked(
    model: nn.Module,
    model_id: PathLike,
    subfolder: Optional[str],
    revision: Optional[str],
    is_trainable: bool,
    check_values: bool,
) -> tuple[RoadConfig, Tensors]:
    """The adapter saved at `model_id` (a directory or a Hub id), checked against `model` (`check_tensors`),
    with a warning when it recorded other base weights than `model` has."""
    directory = ckpt.adapter_directory(model_id, subfolder, revision)
    config, tensors = ckpt.read_adapter(directory)
    config.inference_mode = not is_trainable
    source = os.fspath(model_id)
    check_tensors(model, config, tensors, source, values=check_values)
    _warn_if_other_base(model, ckpt.read_base_fingerprint(directory), source)
    return config, tensors


def state_dict_of(model: nn.Module, adapter_name: str) -> Tensors:
    """The adapter's tensors on `model`, detached, under PEFT's keys."""
    out: Tensors = {}
    for path, layer in road_layers(model):
        if adapter_name in layer.road_theta:
            theta, alpha = layer.parameters_of(adapter_name)
            out[ckpt.adapter_key(path, "road_theta")] = theta.detach()
            out[ckpt.adapter_key(path, "road_alpha")] = alpha.detach()
    for path, wrapper in saved_wrappers(model):
        if adapter_name in wrapper.modules_to_save:
            for pname, t in wrapper.modules_to_save[adapter_name].state_dict().items():
                out[ckpt.adapter_key(path, pname)] = t.detach()
    return out


@torch.no_grad()
def load_tensors(model: nn.Module, adapter_name: str, tensors: Tensors) -> None:
    """Copy checked tensors into the adapter's parameters on `model`, in place."""
    for path, layer in road_layers(model):
        if adapter_name in layer.road_theta:
            key = ckpt.adapter_key(path, "road_theta")
            layer.load_parameters(adapter_name, tensors[key], tensors[ckpt.adapter_key(path, "road_alpha")])
    for path, wrapper in saved_wrappers(model):
        if adapter_name in wrapper.modules_to_save:
            prefix = ckpt.adapter_key(path, "")
            own = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            wrapper.modules_to_save[adapter_name].load_state_dict(own)


def save(model: nn.Module, directory: PathLike, adapter_name: str, config: RoadConfig) -> None:
    """Write one adapter of `model` in PEFT's layout, under `directory` (`checkpoint.adapter_subdir`)."""
    fields = {**config.to_dict(), "inference_mode": True}
    paths = [p for p, layer in road_layers(model) if adapter_name in layer.road_theta]
    if config.layers_to_transform is not None or config.exclude_modules is not None:
        # PEFT's RoadConfig has neither field: store the selection they made as exact paths.
        fields.update(target_modules=sorted(paths), layers_to_transform=None, layers_pattern=None, exclude_modules=None)
    if config.base_model_name_or_path is None:
        fields["base_model_name_or_path"] = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    ckpt.write_adapter(
        ckpt.adapter_subdir(directory, adapter_name),
        RoadConfig.from_dict(fields),
        state_dict_of(model, adapter_name),
        base_fingerprint(model, paths),
    )


def base_fingerprint(model: nn.Module, paths: Iterable[str]) -> ckpt.BaseFingerprint:
    """The first weights of the first few linear layers at `paths` (in sorted order) whose weights are
    plain and not merged with an adapter: recorded with an adapter, so a server can tell the base it was
    trained on from another model of the same shapes."""
    out: ckpt.BaseFingerprint = {}
    for path in sorted(paths):
        if len(out) == ckpt.FINGERPRINT_MODULES:
            break
        module = model.get_submodule(path)
        if isinstance(module, RoadLayer) and module.merged:
            continue
        base = base_of(module)
        values = ckpt.weight_fingerprint(base.weight) if type(base) is nn.Linear else None
        if values is not None:
            out[path] = values
    return out


def _check_keys(expected: dict[str, torch.Size], tensors: Tensors, source: str) -> None:
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = sorted(
        f"{k}: file {tuple(tensors[k].shape)}, model {tuple(expected[k])}"
        for k in set(expected) & set(tensors)
        if tensors[k].shape != expected[k]
    )
    problems = []
    if missing:
        problems.append(f"missing {some_of(missing, 'keys')}")
    if unexpected:
        problems.append(f"unexpected {some_of(unexpected, 'keys')}")
    if wrong:
        problems.append(f"{some_of(wrong, 'shape mismatches')}")
    if problems:
        raise InputError(
            f"adapter at {source!r} does not fit this model: " + "; ".join(problems) + ". The model was left unchanged."
        )


def _check_subspace(model: nn.Module, config: RoadConfig, tensors: Tensors, source: str) -> None:
    """Refuse adapter tensors that move pairs outside the adapter's subspace (they would be dropped)."""
    if config.subspace is None:
        return
    bad = []
    for path in select_targets(model, config):
        n_out = out_features_of(base_of(model.get_submodule(path)))
        theta, alpha = (tensors[ckpt.adapter_key(path, p)] for p in ("road_theta", "road_alpha"))
        count = outside_count(config.subspace, config.variant, config.group_size, n_out, theta, alpha)
        if count:
            bad.append(f"{path} ({count} entries)")
    if bad:
        raise InputError(
            f"adapter at {source!r} has subspace={config.subspace} but is not the identity outside "
            f"it in: {some_of(bad)}. The model was left unchanged."
        )


def _check_values(config: RoadConfig, tensors: Tensors, source: str) -> None:
    """Refuse adapter tensors with NaN or infinite values, or rotations that are degenerate (`value_problem`)."""
    bad = []
    for key, tensor in sorted(tensors.items()):
        if key.endswith(".road_theta"):
            alpha = tensors.get(key.removesuffix("road_theta") + "road_alpha")
            problem = None if alpha is None else value_problem(config.variant, config.group_size, tensor, alpha)
            if problem:
                bad.append(f"{key.removeprefix(ckpt.KEY_PREFIX).removesuffix('.road_theta')} ({problem})")
        elif not key.endswith(".road_alpha") and tensor.is_floating_point() and not torch.isfinite(tensor).all():
            bad.append(f"{key.removeprefix(ckpt.KEY_PREFIX)} (NaN or infinite values)")
    if bad:
        raise InputError(
            f"adapter at {source!r} holds values that cannot be served in {some_of(bad, 'modules')}; the training "
            "that wrote it probably diverged. The model was left unchanged (check_values=False loads it anyway, "
            "for inspection)."
        )


def _is_module(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
    except AttributeError:
        return False
    return True


def _warn_if_other_base(model: nn.Module, recorded: ckpt.BaseFingerprint, source: str) -> None:
    """Warn when the model's weights differ from the ones the adapter recorded at `source`."""
    paths = [path for path in sorted(recorded) if _is_module(model, path)]
    served = base_fingerprint(model, paths)
    differing = [p for p in paths if p in served and ckpt.fingerprint_differs(recorded[p], torch.tensor(served[p]))]
    if differing:
        warnings.warn(
            f"adapter at {source!r} was trained on another base model: the weights of "
            f"{some_of(differing, 'modules')} differ from the ones it recorded. Its outputs are only right "
            "on the base it was trained on.",
            stacklevel=4,
        )
