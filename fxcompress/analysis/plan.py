"""The plan: what the width analysis found, as a frozen, printable, JSON-serialisable value."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

#: What an op does to a dimension, from most to least permissive for rewriting.
#: ``linear``: rotation-equivariant (add, linear maps, scalar scaling, reshapes, pooling by averaging);
#: ``channelwise``: acts per channel (ReLU/GELU, BatchNorm, max-pooling, elementwise products),
#:     so only index selection or consumer-side projection is exact;
#: ``normalizing``: mixes the whole dim in a nonlinear way (LayerNorm, RMSNorm, softmax), exact for neither;
#: ``attention``: the head dim that attention contracts query with key: a transform shared by
#:     both sides cancels in the scores, and the rewrite keeps the softmax scale of the old width.
EFFECTS = ("linear", "channelwise", "normalizing", "attention")


@dataclasses.dataclass(frozen=True)
class Use:
    """One parameter axis in a group: ``param`` (qualified name) along ``axis``, as ``role``."""

    param: str
    axis: int
    role: str  # "producer" (writes the dim: W ← P·W), "consumer" (reads it: W ← W·Pᵀ), "channel" (per-channel vector)
    node: str  # the graph node that uses it
    offset: int = 0  # a concatenation's consumers read the group in a slice of their axis
    length: int | None = None  # None: the whole axis
    # a grouped convolution's input axis holds one block's channels; the block is picked by
    # the cut of this other axis (its outputs) into the group's blocks: block g reads block g
    block_axis: int | None = None
    # grouped-query attention's query side: the axis holds each of the group's blocks this often, in turn
    repeat: int = 1
    block: int | None = None  # the slice holds this block (head) of the group only: a projection packed head by head

    def __str__(self) -> str:
        where = "" if self.length is None else f"[{self.offset}:{self.offset + self.length}]"
        blocked = "" if self.block_axis is None else f" per block of [{self.block_axis}]"
        repeated = "" if self.repeat == 1 else f" (each block ×{self.repeat})"
        block = "" if self.block is None else f" (block {self.block})"
        return f"{self.param}[{self.axis}]{where}{blocked}{repeated}{block}"


@dataclasses.dataclass(frozen=True)
class WidthGroup:
    """A set of tensor dimensions that must keep one size: the unit the rewrite narrows."""

    name: str
    size: int
    producers: tuple[Use, ...]
    consumers: tuple[Use, ...]
    channels: tuple[Use, ...]
    passthrough: tuple[str, ...]
    effects: tuple[str, ...]
    probe: str | None
    frozen_by: tuple[str, ...]
    activations: tuple[tuple[str, int], ...] = ()  # (node, axis) of every activation in the group
    # attention heads, a grouped convolution's groups: ``blocks`` equal blocks, each narrowed alike
    blocks: int = 1
    # (node, axis, width there) of the concatenated activations the group lies in, once per time it lies there
    containers: tuple[tuple[str, int, int], ...] = ()
    splits: tuple[tuple[str, int], ...] = ()  # (split node, output index) of the split outputs in the group
    # a mixture of experts' hidden width: one block per expert, each of the full width; the
    # probe's rows belong to expert after expert, cut at the offsets this node computes
    routing: str | None = None

    @property
    def block_size(self) -> int:
        """The width of one block (a head's dim, a convolution group's channels), ``size`` without blocks."""
        return self.size // self.blocks

    @property
    def probe_axis(self) -> int | None:
        """The axis of the group's dim in the probe activation."""
        return next((axis for node, axis in self.activations if node == self.probe), None)

    @property
    def frozen(self) -> bool:
        return bool(self.frozen_by)

    @property
    def exact(self) -> tuple[str, ...]:
        """Transforms that keep the function exact on this group (before any fine-tuning)."""
        if self.frozen or "normalizing" in self.effects:
            return ()
        if "channelwise" in self.effects:
            return ("selection",)
        return ("selection", "projection")

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for key in ("producers", "consumers", "channels"):
            out[key] = [dataclasses.asdict(u) for u in getattr(self, key)]
        out["exact"] = list(self.exact)
        return out


@dataclasses.dataclass(frozen=True)
class Plan:
    """The width groups of a model, in graph order."""

    groups: tuple[WidthGroup, ...]

    def __getitem__(self, name: str) -> WidthGroup:
        for group in self.groups:
            if group.name == name:
                return group
        raise KeyError(f"no width group named {name!r}; groups: {[g.name for g in self.groups]}")

    @property
    def compressible(self) -> tuple[WidthGroup, ...]:
        return tuple(g for g in self.groups if not g.frozen)

    def to_dict(self) -> dict[str, Any]:
        return {"groups": [g.to_dict() for g in self.groups]}

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    def __str__(self) -> str:
        lines = [f"Plan: {len(self.groups)} width groups, {len(self.compressible)} compressible"]
        for g in self.groups:
            status = f"frozen: {'; '.join(g.frozen_by)}" if g.frozen else f"exact: {', '.join(g.exact) or 'none (approximate)'}"
            width = f"{g.size}" if g.blocks == 1 else f"{g.size} ({g.blocks}×{g.block_size})"
            lines.append(f"  {g.name:40s} d={width:<10s} {len(g.producers)} producers, {len(g.consumers)} consumers, "
                         f"{len(g.channels)} per-channel; probe {g.probe}; {status}")
        return "\n".join(lines)
