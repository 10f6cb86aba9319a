"""RoAd on bitsandbytes' quantized linear layers: `Linear8bitLt` (LLM.int8()) and `Linear4bit` (nf4 / fp4).

The forward pass rotates whatever the quantized layer returns (in its output dtype). Quantized rows
cannot be rotated in place, so merging and unmerging dequantize the weight to float64, rotate its
rows and the bias with the exact elementwise merge, and quantize the result again with the layer's
own settings, once per call however many adapters it folds in. That second rounding moves outputs
slightly (measured in the README, "Quantized bases"), so both warn. `merge_and_unload` returns the
quantized layers with their requantized weights, not dense ones: the model stays as small as it was.

bitsandbytes stays optional: these classes recognise their base layers through `sys.modules` (such a
layer can exist only once bitsandbytes is imported) and import it only when they hold one.
"""

from __future__ import annotations

import copy
import sys
import warnings
from contextlib import contextmanager
from typing import Iterator, Optional, cast

import torch
from torch import nn

from .linear import Linear


def _bnb_layer_class(name: str) -> Optional[type]:
    """`bitsandbytes.nn.<name>` if bitsandbytes has been imported, else None (never imports it)."""
    module = sys.modules.get("bitsandbytes.nn")
    return getattr(module, name, None) if module is not None else None


class _QuantizedLinear(Linear):
    """What the bitsandbytes wrappers share: merging through a float copy of the weight.

    Subclasses say how to read their weight as a float tensor (`_dequantize`) and how to store one
    back (`_quantize`), and name their bitsandbytes class in `base_type`. While a merge or unmerge
    runs, `_merge_params` hands `RoadLayer` float64 working copies of weight and bias, so its row
    rotation and its NaN/inf check run unchanged; the copies are stored back once, at the end, and
    only if some adapter was merged or unmerged.
    """

    _work: Optional[list[torch.Tensor]] = None  # float64 [weight, bias] while a merge or unmerge runs
    _work_dtype: torch.dtype = torch.float32  # the dtype the weight is quantized from

    @classmethod
    def wraps(cls, module: nn.Module) -> bool:
        bnb_class = _bnb_layer_class(cls.base_type.rsplit(".", 1)[-1])
        return bnb_class is not None and isinstance(module, bnb_class)

    def _dequantize(self) -> torch.Tensor:
        """The weight as a new (out_features, in_features) float tensor; `_quantize` gets it back in this dtype."""
        raise NotImplementedError

    def _quantize(self, weight: torch.Tensor) -> None:
        """Replace the base layer's weight by `weight` quantized with the layer's settings."""
        raise NotImplementedError

    def _linear(self) -> nn.Linear:
        """The base layer (bitsandbytes' layers subclass nn.Linear)."""
        return cast(nn.Linear, self.base_layer)

    def _merge_params(self) -> list[torch.Tensor]:
        """Outside a merge: the base layer's parameters. During one: float64 copies (made on first use),
        so the weight is rounded once, by the requantization; the dequantize/quantize round trip
        costs far more than the float64 math."""
        if self._work is None:
            return super()._merge_params()
        if not self._work:
            weight = self._dequantize()
            self._work_dtype = weight.dtype
            bias = self._linear().bias
            self._work = [weight.to(torch.float64)]
            if bias is not None:
                self._work.append(bias.data.to(torch.float64, copy=True))
        return self._work

    @contextmanager
    def _float_weights(self, action: str) -> Iterator[None]:
        """Run one merge or unmerge on float copies; requantize once if it changed `merged_adapters`."""
        before = list(self.merged_adapters)
        self._work = []
        try:
            yield
        finally:
            work, self._work = self._work, None
            if self.merged_adapters != before:  # also after an error, so weights match the bookkeeping
                with torch.no_grad():
                    self._quantize(work[0].to(self._work_dtype))
                    if len(work) > 1:
                        self._linear().bias.data.copy_(work[1])
        if self.merged_adapters != before:  # stacklevel: this generator, contextlib, merge(), its caller
            warnings.warn(
                f"{action} RoAd adapters requantizes the weight of a {self.base_type} layer; outputs "
                "change slightly by the rounding (see the README, 'Quantized bases').",
                stacklevel=4,
            )

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """`RoadLayer.merge` through a float copy of the weight, requantized once at the end (warns).

        With `safe_merge`, NaN or inf leaves the quantized weight untouched, byte for byte.
        """
        with self._float_weights("merging"):
            super().merge(safe_merge, adapter_names)

    def merge_problem(self, adapter_names: Optional[list[str]] = None) -> Optional[str]:
        """`RoadLayer.merge_problem` on a float copy of the weight (which is not requantized)."""
        with self._float_weights("checking"):
            return super().merge_problem(adapter_names)

    def unmerge(self, last: Optional[int] = None) -> None:
        """`RoadLayer.unmerge` through a float copy of the weight, requantized once at the end (warns)."""
        with self._float_weights("unmerging"):
            super().unmerge(last)


class Linear8bitLt(_QuantizedLinear):
    """A bitsandbytes `Linear8bitLt` (int8 rows with per-row scales) rotated by the active RoAd adapters."""

    base_type = "bitsandbytes.nn.Linear8bitLt"

    def _dequantize(self) -> torch.Tensor:
        import bitsandbytes as bnb

        base = cast(bnb.nn.Linear8bitLt, self.base_layer)
        weight, state = cast(bnb.nn.Int8Params, base.weight), base.state
        if weight.dtype != torch.int8:  # has_fp16_weights: float weights, quantized on the fly
            return weight.data.clone()
        # The scales live on the weight until the first forward moves them to the layer's state.
        scb = weight.SCB if weight.SCB is not None else state.SCB
        if scb is None:
            raise RuntimeError(
                "this Linear8bitLt layer's int8 weight has no scales (SCB) on the weight or in its "
                "state; it cannot be dequantized for merging"
            )
        return bnb.functional.int8_vectorwise_dequant(weight.data, scb)

    def _quantize(self, weight: torch.Tensor) -> None:
        import bitsandbytes as bnb

        base = cast(bnb.nn.Linear8bitLt, self.base_layer)
        if base.weight.dtype != torch.int8:
            base.weight.data.copy_(weight)
        else:  # as Int8Params quantizes: per-row absmax of the fp16 weight
            cb, scb, _ = bnb.functional.int8_vectorwise_quant(weight.to(torch.float16).contiguous())
            base.weight = bnb.nn.Int8Params(cb, requires_grad=False, has_fp16_weights=False, CB=cb, SCB=scb)
        base.state.reset_grads()  # drop the int8 copy cached in the state; the next forward takes the new one


class Linear4bit(_QuantizedLinear):
    """A bitsandbytes `Linear4bit` (nf4 or fp4 blocks) rotated by the active RoAd adapters."""

    base_type = "bitsandbytes.nn.Linear4bit"

    def _dequantize(self) -> torch.Tensor:
        import bitsandbytes as bnb

        weight = cast(bnb.nn.Params4bit, self.base_layer.weight)
        data, state = weight.data, weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            # bitsandbytes repacks 4-bit weights for AVX512-BF16 CPUs at the first inference call;
            # unpack a copy (the inverse edits the state it is given).
            data, state = bnb.functional._convert_weight_packed_for_cpu_inverse(data, copy.deepcopy(state))
        return bnb.functional.dequantize_4bit(data, state)

    def _quantize(self, weight: torch.Tensor) -> None:
        import bitsandbytes as bnb

        base = cast(bnb.nn.Linear4bit, self.base_layer)
        old = cast(bnb.nn.Params4bit, base.weight)
        data, state = bnb.functional.quantize_4bit(
            weight.contiguous(),
            blocksize=old.blocksize,
            compress_statistics=old.compress_statistics,
            quant_type=old.quant_type,
            quant_storage=old.quant_storage,
        )
        base.weight = bnb.nn.Params4bit(
            data,
            requires_grad=False,
            quant_state=state,
            blocksize=old.blocksize,
            compress_statistics=old.compress_statistics,
            quant_type=old.quant_type,
            quant_storage=old.quant_storage,
            module=base,
            bnb_quantized=True,
        )
        base.quant_state = state
