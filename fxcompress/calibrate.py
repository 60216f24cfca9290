"""Calibration: one pass over the calibration data feeds the covariance of every group.

The captured graph is copied into a *probe module* whose outputs are the probe activations
of the chosen groups (dead code past them is dropped), called exactly like the model.
Activations with a sequence or spatial axis are fed as sequences, so the circular-shift
null can correct for correlated samples; an ``attention_mask`` in the batch masks padding.
A group of attention heads keeps only its heads' own (diagonal) covariance blocks, ``blocks``
times less work and memory than the whole, and is split into one accumulator per head.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch.fx import GraphModule

from fxcompress.analysis.plan import WidthGroup
from fxcompress.capture import state_kept
from fxcompress.errors import DataError
from fxcompress.spectral import CovarianceAccumulator


Accumulators = tuple[CovarianceAccumulator, ...]  # one per block of a group (per head; one for a plain width)
EMPTY = "calib_data is empty: pass an iterable of batches (e.g. a DataLoader over ~10 % of the training set)"


def as_call(batch: Any) -> tuple[tuple, dict]:
    """A DataLoader batch as ``(args, kwargs)``: a tensor, a tuple/list of tensors, or a dict."""
    if isinstance(batch, torch.Tensor):
        return (batch,), {}
    if isinstance(batch, (tuple, list)):
        return tuple(batch), {}
    if isinstance(batch, dict):
        return (), dict(batch)
    raise DataError(f"a calibration batch must be a tensor, a tuple of tensors or a dict of keyword inputs, "
                    f"got {type(batch).__name__}")


def structure(batch: Any) -> tuple:
    """What must stay the same from batch to batch: kind, arity or keys, tensor ranks, and the
    values of non-tensor inputs (capture bakes them into the graph)."""
    args, kwargs = as_call(batch)
    ranks = lambda vs: tuple(v.ndim if isinstance(v, torch.Tensor) else repr(v) for v in vs)  # noqa: E731
    return type(batch).__name__, ranks(args), tuple(sorted(kwargs)), ranks(kwargs[k] for k in sorted(kwargs))


def probe_module(gm: GraphModule, probes: Sequence[str]) -> GraphModule:
    """A copy of ``gm`` returning the values of the nodes ``probes`` (as a tuple)."""
    pm = GraphModule(gm, copy.deepcopy(gm.graph))
    graph = pm.graph
    nodes = {n.name: n for n in graph.nodes}
    output = next(n for n in graph.nodes if n.op == "output")
    output.args = (tuple(nodes[p] for p in probes),)
    codegen = graph._codegen
    if hasattr(codegen, "pytree_info"):
        codegen.pytree_info = codegen.pytree_info._replace(out_spec=None)
    graph.eliminate_dead_code()
    pm.recompile()
    return pm.eval()


def calibrate(gm: GraphModule, groups: Sequence[WidthGroup], data: Iterable[Any],
              correlated_samples: bool = True,
              reads: Mapping[str, Sequence[tuple[str, int]]] | None = None) -> dict[str, Accumulators]:
    """Stream ``data`` through ``gm``; return each group's covariance accumulators, one per block.

    A group named in ``reads`` is measured at each of those activations ``(node, axis)``
    instead of its probe, pooled into one accumulator (every position at every read a sample):
    a residual stream that each layer reads through its own normalisation.

    Under ``torch.distributed`` every rank passes the same ``data``: rank ``r`` of ``W``
    runs batches ``r, r + W, …``, and the accumulators are then merged across ranks, so
    every rank holds the same covariances (and picks the same widths) as one process would.
    """
    rank, world = distributed_rank()
    reads = reads or {}
    points = {g.name: reads.get(g.name) or [(g.probe, g.probe_axis)] for g in groups}
    probes = list(dict.fromkeys([node for g in groups for node, _ in points[g.name]]
                                + [g.routing for g in groups if g.routing]))
    pm = probe_module(gm, probes)
    accs: dict[str, CovarianceAccumulator] = {}
    first, batches = None, 0
    with torch.no_grad(), state_kept(pm):  # a buffer forward writes keeps its value
        for index, batch in enumerate(data):
            shape = structure(batch)
            if first is None:
                first = shape
            elif shape != first:
                raise DataError(f"calibration batch {index} has structure {shape}, but the first had {first}: "
                                "every batch must have the same inputs")
            batches += 1
            if index % world != rank:
                continue
            args, kwargs = as_call(batch)
            values = dict(zip(probes, pm(*args, **kwargs)))
            for group in groups:
                if group.routing:
                    _feed_experts(accs, group, values[group.probe], values[group.routing])
                    continue
                for node, axis in points[group.name]:
                    _feed(accs, group, values[node], axis, kwargs.get("attention_mask"), correlated_samples, index)
    if not batches:
        raise DataError(EMPTY)
    if world > 1:
        accs = _merge_ranks(accs)
    return {name: acc.split() for name, acc in accs.items()}


def calibrate_points(gm: GraphModule, points: dict[tuple[str, int], int], data: Iterable[Any]
                     ) -> dict[tuple[str, int], CovarianceAccumulator]:
    """The covariance of each activation ``(node, axis)`` of ``points`` (→ its width there) over
    ``data``: every position a sample, padding masked as :func:`calibrate` masks it."""
    nodes = list(dict.fromkeys(node for node, _ in points))
    pm = probe_module(gm, nodes)
    accs = {point: CovarianceAccumulator(width) for point, width in points.items()}
    with torch.no_grad(), state_kept(pm):
        for batch in data:
            args, kwargs = as_call(batch)
            values = dict(zip(nodes, pm(*args, **kwargs)))
            for (node, axis), acc in accs.items():
                x = torch.movedim(values[node].detach(), axis, -1)
                acc.update(x, _kept(kwargs.get("attention_mask"), x))
    return accs


def distributed_rank() -> tuple[int, int]:
    """``(rank, world_size)`` under an initialised ``torch.distributed``, else ``(0, 1)``."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _merge_ranks(accs: dict[str, CovarianceAccumulator]) -> dict[str, CovarianceAccumulator]:
    """Every rank's accumulators, merged in rank order (the same result on every rank)."""
    gathered: list[dict[str, CovarianceAccumulator]] = [{} for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather_object(gathered, accs)
    merged: dict[str, CovarianceAccumulator] = {}
    for part in gathered:
        for name, acc in part.items():
            if name in merged:
                merged[name].merge(acc)
            else:
                merged[name] = acc
    return merged


def _feed(accs: dict, group: WidthGroup, value: torch.Tensor, axis: int, mask: Any, correlated: bool,
          index: int) -> None:
    x = torch.movedim(value.detach(), axis, -1)
    acc = accs.get(group.name)
    sequences = correlated and x.ndim >= 3 if acc is None else acc.null is not None
    if sequences:  # a pooled read without a sequence axis (a head's last position) is one sequence
        if x.ndim < 3:
            x, mask = x.reshape(1, -1, x.shape[-1]), None
        x = x.reshape(x.shape[0], -1, x.shape[-1])
    if acc is None:
        acc = accs[group.name] = CovarianceAccumulator(group.size, blocks=group.blocks, shift_null=sequences)
    acc.update(x, _kept(mask, x), null_seed=index)  # without the null, (..., d) batches are flattened to samples by update()


def _kept(mask: Any, x: torch.Tensor) -> torch.Tensor | None:
    """The positions of ``x`` (``(..., d)``) that an attention mask of its shape keeps; None: all."""
    if isinstance(mask, torch.Tensor) and tuple(mask.shape) == tuple(x.shape[:-1]):
        return mask.to(x.device) != 0
    return None


class ExpertAccumulators:
    """One accumulator per expert of a mixture: the rows of a grouped product's input come
    expert after expert, cut at the cumulative counts ``offs``."""

    def __init__(self, experts: int, dim: int):
        self.experts = [CovarianceAccumulator(dim) for _ in range(experts)]

    def update(self, rows: torch.Tensor, offs: torch.Tensor) -> None:
        start = 0
        for acc, end in zip(self.experts, offs.tolist()):
            if end > start:
                acc.update(rows[start:end])
            start = end

    def merge(self, other: "ExpertAccumulators") -> None:
        for mine, theirs in zip(self.experts, other.experts):
            mine.merge(theirs)

    def split(self) -> tuple[CovarianceAccumulator, ...]:
        return tuple(self.experts)


def _feed_experts(accs: dict, group: WidthGroup, value: torch.Tensor, offs: torch.Tensor) -> None:
    acc = accs.get(group.name)
    if acc is None:
        acc = accs[group.name] = ExpertAccumulators(group.blocks, group.block_size)
    acc.update(torch.movedim(value.detach(), group.probe_axis, -1), offs)
