"""`RoadLinear`: a vLLM linear layer that serves RoAd adapters beside the engine's own LoRA.

vLLM wraps every adaptable linear layer in one of its LoRA classes (column-, row-parallel, merged
gate/up, QKV, replicated). `RoadLinear` wraps that wrapper: each adapter slot of the engine holds
either a LoRA (in vLLM's tensors) or a RoAd rotation (in the layer's `SlotTable`), and a slot that
holds one is the identity for the other. The rotation is applied to what the wrapped layer
returns, so:

- column-parallel layers (plain, merged gate/up, QKV with replicated KV heads) rotate their local
  shard, whose features are whole groups of the full output (`local_segments`);
- row-parallel layers rotate the all-reduced sum, bias included;
- layers with `skip_bias_add` return R(y + b) - b, so the caller's "+ b" gives R(y + b).

When no slot holds a LoRA, the LoRA kernels are skipped: in eager mode the base layer runs alone. On
CPU, where vLLM runs LoRA models eagerly, vLLM's LoRA tensors (`max_lora_rank x (in + out)` numbers per
slot, several times a RoAd slot) are allocated only while some slot holds a LoRA that adds something
to the layer (`OnDemandLoRAWeights`), so a server that serves only RoAd adapters holds only their tables.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union, cast

import torch
from vllm.lora.layers import BaseLayerWithLoRA, LogitsProcessorWithLoRA, VocabParallelEmbeddingWithLoRA
from vllm.model_executor.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)

from ... import functional as F
from .adapter import ModuleRotation
from .slots import SlotRouting, SlotTable


@dataclass(frozen=True)
class Segment:
    """Local output features [offset, offset + length) are features [start, start + length) of
    the layer's sub-module `sub` (q, k, v or gate, up; 0 for an unpacked layer)."""

    sub: int
    start: int
    length: int


def sub_module_sizes(base: torch.nn.Module, n_slices: int) -> list[int]:
    """Full output size of each sub-module whose adapter the layer takes (one, or one per packed slice)."""
    if isinstance(base, QKVParallelLinear):
        q = base.total_num_heads * base.head_size
        k = base.total_num_kv_heads * base.head_size
        v = base.total_num_kv_heads * base.v_head_size
        return [q, k, v] if n_slices == 3 else [q + k + v]
    if isinstance(base, MergedColumnParallelLinear):
        sizes = list(base.output_sizes)
        return sizes if n_slices == len(sizes) else [sum(sizes)]
    return [cast(int, base.output_size)]  # vLLM's LinearBase.output_size


def _rank_segments(base: torch.nn.Module, n_slices: int, rank: int) -> list[Segment]:
    if isinstance(base, (RowParallelLinear, ReplicatedLinear)):
        return [Segment(0, 0, base.output_size)]
    if isinstance(base, QKVParallelLinear):
        q_shard = base.num_heads * base.head_size
        k_shard, v_shard = base.num_kv_heads * base.head_size, base.num_kv_heads * base.v_head_size
        kv_rank = rank // base.num_kv_head_replicas
        q_total, k_total, _ = sub_module_sizes(base, 3)
        if n_slices == 3:
            return [
                Segment(0, rank * q_shard, q_shard),
                Segment(1, kv_rank * k_shard, k_shard),
                Segment(2, kv_rank * v_shard, v_shard),
            ]
        return [
            Segment(0, rank * q_shard, q_shard),
            Segment(0, q_total + kv_rank * k_shard, k_shard),
            Segment(0, q_total + k_total + kv_rank * v_shard, v_shard),
        ]
    if isinstance(base, MergedColumnParallelLinear):
        shards = [size // base.tp_size for size in base.output_sizes]
        if n_slices == len(shards):
            return [Segment(i, rank * shard, shard) for i, shard in enumerate(shards)]
        offsets = [sum(base.output_sizes[:i]) for i in range(len(shards))]
        return [Segment(0, offset + rank * shard, shard) for offset, shard in zip(offsets, shards, strict=True)]
    if isinstance(base, ColumnParallelLinear):
        per = base.output_size_per_partition
        return [Segment(0, rank * per, per)]
    raise TypeError(f"RoAd cannot serve a {type(base).__name__}: only vLLM's linear layers are supported.")


def local_segments(base: torch.nn.Module, n_slices: int, tp_rank: int, tp_size: int) -> list[Segment]:
    """Where each output feature of this rank's layer comes from, in order."""
    if isinstance(base, ColumnParallelLinear) and base.gather_output and tp_size > 1:
        return [seg for rank in range(tp_size) for seg in _rank_segments(base, n_slices, rank)]
    return _rank_segments(base, n_slices, tp_rank)


SERVED_LINEAR = (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
    ReplicatedLinear,
)


def is_servable(module: torch.nn.Module) -> bool:
    """Whether `module` (one of vLLM's LoRA layers) wraps a linear layer RoAd can serve: one of vLLM's
    linear classes itself, not a model-specific subclass, whose outputs `local_segments` may not describe."""
    return type(getattr(module, "base_layer", None)) in SERVED_LINEAR


LORA_TENSORS = ("lora_a_stacked", "lora_b_stacked", "lora_a_stacked_2d")  # what create_lora_weights makes


def adds_nothing(lora_a, lora_b) -> bool:  # noqa: ANN001 - a tensor, or a list of them (None: no slice)
    """Whether a LoRA's weights for one layer add nothing: each slice's A or B missing or all zero (as
    in the adapters vLLM makes for its warmup runs)."""
    a_parts = lora_a if isinstance(lora_a, (list, tuple)) else [lora_a]
    b_parts = lora_b if isinstance(lora_b, (list, tuple)) else [lora_b]
    return all(
        a is None or b is None or not bool(a.any()) or not bool(b.any()) for a, b in zip(a_parts, b_parts, strict=True)
    )


class OnDemandLoRAWeights:
    """vLLM's LoRA tensors of one LoRA layer, held only while `needed`: allocated (zeros, `n_slots` slots)
    when a slot first takes a LoRA that adds something to the layer, freed when the last one leaves.

    Only for eager forwards (vLLM on CPU): a compiled graph or a CUDA graph would keep the first tensors.
    """

    def __init__(self, layer: BaseLayerWithLoRA, n_slots: int, lora_config) -> None:  # noqa: ANN001 - vLLM's LoRAConfig
        self.layer, self.n_slots, self.lora_config = layer, n_slots, lora_config
        self.allocated = True
        self.free()

    def free(self) -> None:
        for name in LORA_TENSORS:
            if hasattr(self.layer, name):
                setattr(self.layer, name, None)
        self.allocated = False

    def allocate(self) -> None:
        if not self.allocated:
            # Normal tensors even when called inside the engine's inference mode: slots are written later
            # from outside it, and an inference tensor refuses in-place writes there.
            with torch.inference_mode(False):
                self.layer.create_lora_weights(self.n_slots, self.lora_config)
            self.allocated = True


class RoadLinear(BaseLayerWithLoRA):
    """One of vLLM's LoRA linear layers (`base_layer`), plus a RoAd rotation per adapter slot."""

    def __init__(self, lora_layer: BaseLayerWithLoRA, name: str, n_slots: int, routing: SlotRouting) -> None:
        super().__init__()
        # On CPU vLLM's LoRA ops index the last slot for tokens without an adapter (-1): one spare slot
        # that stays zero keeps those tokens on the base model.
        on_cpu = lora_layer.device.type != "cuda"
        self.lora_weights = OnDemandLoRAWeights(lora_layer, n_slots + 1, lora_layer.lora_config) if on_cpu else None
        self.base_layer = lora_layer
        self.name = name
        linear = lora_layer.base_layer
        self.segments = local_segments(linear, lora_layer.n_slices, lora_layer.tp_rank, lora_layer.tp_size)
        self.sub_sizes = sub_module_sizes(linear, lora_layer.n_slices)
        features = sum(seg.length for seg in self.segments)
        self.table = SlotTable(n_slots, features, device=lora_layer.device, serving_dtype=linear.params_dtype)
        self.routing = routing
        self.lora_slots: set[int] = set()
        # Row-parallel partial sums that are reduced later: only rank 0 corrects the returned bias.
        self.owns_bias = not (
            isinstance(linear, RowParallelLinear) and not linear.reduce_results and lora_layer.tp_rank > 0
        )

    # ---- the engine's slot bookkeeping --------------------------------------------------------

    def set_mapping(self, punica_wrapper) -> None:  # noqa: ANN001 - vLLM's PunicaWrapperBase
        self.base_layer.set_mapping(punica_wrapper)

    def create_lora_weights(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        self.base_layer.create_lora_weights(*args, **kwargs)

    def set_lora(self, index: int, lora_a, lora_b) -> None:  # noqa: ANN001
        if self.lora_weights is not None and adds_nothing(lora_a, lora_b):
            self.reset_lora(index)  # served exactly by the identity, with no LoRA tensors
            return
        self.table.reset(index)
        if self.lora_weights is not None:
            self.lora_weights.allocate()
        self.base_layer.set_lora(index, lora_a, lora_b)
        self.lora_slots.add(index)

    def reset_lora(self, index: int) -> None:
        if self.lora_weights is None or self.lora_weights.allocated:
            self.base_layer.reset_lora(index)
        self.table.reset(index)
        self.lora_slots.discard(index)
        if self.lora_weights is not None and not self.lora_slots:
            self.lora_weights.free()

    def check_rotations(
        self, rotations: list[Optional[ModuleRotation]], where: str, names: Optional[list[str]] = None
    ) -> None:
        """Raise ValueError if `rotations` (one per sub-module, None: not adapted) cannot be served here;
        `names` are the sub-modules' names as the adapter was trained (q_proj, not qkv_proj[0])."""
        names = names or [self.name if len(self.sub_sizes) == 1 else f"{self.name}[{i}]" for i in range(len(rotations))]
        for sub, (rotation, size) in enumerate(zip(rotations, self.sub_sizes, strict=True)):
            if rotation is not None and rotation.features != size:
                raise ValueError(
                    f"{where}: module {names[sub]!r} has {size} output features in this "
                    f"model, but the adapter's parameters are for {rotation.features}."
                )
        for seg in self.segments:
            rotation = rotations[seg.sub]
            if rotation is not None and (seg.start % rotation.group_size or seg.length % rotation.group_size):
                raise ValueError(
                    f"{where}: module {names[seg.sub]!r} has {seg.length} output features per tensor-parallel "
                    f"rank here (from feature {seg.start}), which is not a whole number of groups of "
                    f"group_size={rotation.group_size}; serve it with a tensor-parallel size that splits it "
                    "into whole groups, or train with a group size that divides the shard."
                )

    @torch.no_grad()
    def first_weights(self, sub: int, count: int) -> Optional[torch.Tensor]:
        """The first `count` weights of row 0 of sub-module `sub`, where this rank holds them; None where
        it does not (another rank's shard) or where the weights are quantized.

        vLLM's CPU backend repacks linear weights for its GEMM kernels and leaves `weight` empty, so the
        weights are read through the layer itself: its outputs for the inputs 0, t e_0, ..., t e_{count-1},
        minus the first, divided by t. The large t keeps the rounding of a large bias in a 16-bit output
        (which cancels only up to its last place) small against the weights.
        A row-parallel layer all-reduces its output, so every rank runs it (rank 0 with the unit inputs,
        the others with zeros); call this on every rank for the same layers, in the same order.
        """
        linear = self.base_layer.base_layer
        if getattr(linear, "quant_config", None) is not None:
            return None
        rank = self.base_layer.tp_rank
        row_parallel = isinstance(linear, RowParallelLinear)
        if isinstance(linear, ColumnParallelLinear) and linear.gather_output and self.base_layer.tp_size > 1:
            return None  # the segments describe the gathered output, not this rank's rows
        offset, row = 0, None
        for seg in self.segments:
            if seg.sub == sub and seg.start == 0:
                row = offset
            offset += seg.length
        if row is None and not row_parallel:
            return None
        width = linear.input_size_per_partition if row_parallel else linear.input_size
        count = min(count, width)
        inputs = torch.zeros(count + 1, width, dtype=linear.params_dtype, device=self.table.c.device)
        scale = 64.0 if linear.params_dtype == torch.float16 else 4096.0  # float16 overflows at 65504
        if not row_parallel or rank == 0:
            inputs[1:, :count] = scale * torch.eye(count, dtype=inputs.dtype, device=inputs.device)
        out = linear(inputs)
        out = out[0] if isinstance(out, tuple) else out
        if row is None or (row_parallel and rank != 0):
            return None
        return (out[1:, row] - out[0, row]).float() / scale

    def set_road(self, index: int, rotations: list[Optional[ModuleRotation]]) -> None:
        """Put a RoAd adapter's rotations (checked by `check_rotations`) in slot `index`."""
        group_size = next(r.group_size for r in rotations if r is not None)
        c, s = [], []
        for seg in self.segments:
            rotation = rotations[seg.sub]
            if rotation is None:
                c.append(torch.ones(seg.length))
                s.append(torch.zeros(seg.length))
            else:
                c.append(rotation.c[seg.start : seg.start + seg.length])
                s.append(rotation.s[seg.start : seg.start + seg.length])
        self.table.set(index, torch.cat(c).to(self.table.c.device), torch.cat(s).to(self.table.c.device), group_size)

    # ---- forward -------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> Union[torch.Tensor, tuple[torch.Tensor, Optional[torch.Tensor]]]:
        compiling = torch.compiler.is_compiling()  # a compiled graph must serve every slot layout
        if self.lora_slots or compiling:
            out = self.base_layer(x)
        else:
            out = self.base_layer.base_layer(x)
        in_use = self.routing.slots_in_use  # no slot of this step's tokens holds a rotation: nothing to do
        if not compiling and (
            not self.table.active or (in_use is not None and in_use.isdisjoint(self.table.active_slots))
        ):
            return out
        return self._rotate_output(out)

    def _rotate_output(
        self, out: Union[torch.Tensor, tuple[torch.Tensor, Optional[torch.Tensor]]]
    ) -> Union[torch.Tensor, tuple[torch.Tensor, Optional[torch.Tensor]]]:
        y, bias = out if isinstance(out, tuple) else (out, None)
        if bias is not None and self.owns_bias:
            y = self._rotate(y + bias) - bias
        else:
            y = self._rotate(y)
        return (y, bias) if isinstance(out, tuple) else y

    @torch.no_grad()
    def probe(self, rotations: list[Optional[ModuleRotation]]) -> Optional[str]:
        """Serve `rotations` from a scratch slot on a few random inputs, through the layer's own path
        (vLLM's base layer, then the rotation), and compare with the closed form R(Wx + b) computed from
        the base layer's plain output; returns what differs, or None.

        This guards against a vLLM whose layers changed behaviour under unchanged names (what they
        return, where the bias goes, which kernel runs). Like `first_weights`, it runs the base layer,
        whose row-parallel form all-reduces: call it on every rank, for the same layers in the same order.
        """
        linear = self.base_layer.base_layer
        device = self.table.c.device
        width = linear.input_size_per_partition if isinstance(linear, RowParallelLinear) else linear.input_size
        generator = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randn(3, width, generator=generator).to(device=device, dtype=linear.params_dtype)
        table, routing = self.table, self.routing
        self.table = SlotTable(1, table.features, device=device, serving_dtype=linear.params_dtype)
        self.routing = SlotRouting(3, 1, device)
        try:
            self.set_road(0, rotations)
            self.routing.update(torch.tensor([0, -1, 0], device=device))  # the adapter, no adapter, the adapter
            served = self._rotate_output(linear(x))
            c, s, half = self.table.c[0], self.table.s[0], int(self.table.half[0])
        finally:
            self.table, self.routing = table, routing
        plain = linear(x)
        y, bias = plain if isinstance(plain, tuple) else (plain, None)
        z = (y + bias if bias is not None and self.owns_bias else y).float()
        expected = torch.stack((F.rotate(z[0], (c, s), 2 * half), z[1], F.rotate(z[2], (c, s), 2 * half)))
        if bias is not None and self.owns_bias:
            expected = expected - bias.float()
        got = (served[0] if isinstance(served, tuple) else served).float()
        tolerance = 1e-4 if y.dtype == torch.float32 else 3e-2
        scale = float(expected.abs().max()) or 1.0
        worst = float((got - expected).abs().max()) if got.shape == expected.shape else float("inf")
        if worst > tolerance * scale:
            return (
                f"layer {self.name!r}: the served rotation differs from R(Wx + b) by {worst:.3g} "
                f"(outputs up to {scale:.3g}, {y.dtype})"
            )
        return None

    def _rotate(self, y: torch.Tensor) -> torch.Tensor:
        y2 = y.reshape(-1, y.shape[-1])
        index = self.routing.index[: y2.shape[0]]
        runs = self.routing.runs
        out = self.table.forward(y2, index, runs if runs is not None and runs[-1][2] == y2.shape[0] else None)
        return out.view(y.shape)


# ---- vLLM's own LoRA paths off the way while no slot uses them ------------------------------------


class TracksLoRASlots:
    """Mixin for one of vLLM's LoRA layers: `lora_slots` are the slots that hold a LoRA for it; on CPU its
    LoRA tensors are held only while there are any (`lora_weights`)."""

    lora_slots: set[int]
    lora_weights: Optional[OnDemandLoRAWeights]
    writing: Optional[int] = None  # the slot vLLM's set_lora is writing (it resets it first, through reset_lora)

    def set_lora(self, index: int, lora_a, lora_b) -> None:  # noqa: ANN001
        if self.lora_weights is not None:
            if adds_nothing(lora_a, lora_b):
                self.reset_lora(index)
                return
            self.lora_weights.allocate()
        self.writing = index
        try:
            super().set_lora(index, lora_a, lora_b)  # type: ignore[misc]
        finally:
            self.writing = None
        self.lora_slots.add(index)

    def reset_lora(self, index: int) -> None:
        if self.lora_weights is None or self.lora_weights.allocated:
            super().reset_lora(index)  # type: ignore[misc]
        if index == self.writing:
            return  # the slot is being written, not emptied: its tensors stay
        self.lora_slots.discard(index)
        if self.lora_weights is not None and not self.lora_slots:
            self.lora_weights.free()


class IdleLoRALogits(TracksLoRASlots, LogitsProcessorWithLoRA):
    """vLLM's LoRA logits processor that computes the plain head while no slot holds an lm_head LoRA.

    RoAd adapters never touch the head, and LoRA adapters seldom do, but vLLM's LoRA logits path runs
    for every request once LoRA is enabled, and on CPU it fails for concurrent requests with
    `prompt_logprobs` (an index mismatch in its `bgmv_shrink`), which stops the engine. With no lm_head
    LoRA in any slot its contribution is zero, so the plain head gives the same logits.
    """

    def _get_logits(self, hidden_states, lm_head, embedding_bias=None, skip_gather=False):  # noqa: ANN001, ANN202
        if self.lora_slots:
            return super()._get_logits(hidden_states, lm_head, embedding_bias, skip_gather)
        head = getattr(lm_head, "base_layer", lm_head)
        return self.base_layer._get_logits(hidden_states, head, embedding_bias, skip_gather)


class IdleLoRAEmbedding(TracksLoRASlots, VocabParallelEmbeddingWithLoRA):
    """vLLM's LoRA embedding that looks up the plain embedding while no slot holds an embedding LoRA."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.lora_slots:
            return super().forward(x)
        return self.base_layer.forward(x)


IDLE_LORA_CLASSES: dict[type, type] = {
    LogitsProcessorWithLoRA: IdleLoRALogits,
    VocabParallelEmbeddingWithLoRA: IdleLoRAEmbedding,
}


def skip_idle_lora(module: torch.nn.Module, lora_config) -> None:  # noqa: ANN001 - vLLM's LoRAConfig
    """Make one of vLLM's LoRA logits or embedding layers skip its LoRA path while no slot uses it
    (in place: the engine and the model keep their references to the layer)."""
    idle = IDLE_LORA_CLASSES.get(type(module))
    if idle is not None:
        stacked = cast(torch.Tensor, module.lora_a_stacked)
        module.lora_slots = set()  # type: ignore[assignment]
        on_cpu = stacked.device.type != "cuda"
        lora_weights = OnDemandLoRAWeights(module, stacked.shape[0], lora_config) if on_cpu else None
        module.lora_weights = lora_weights  # type: ignore[assignment]
        module.__class__ = idle
