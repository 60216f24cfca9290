"""Rewrite: apply a projection per width group, narrowing every op coupled to it.

For a group of width ``d`` and a ``k × d`` matrix ``P`` (orthonormal rows; a selection of
``k`` channels is ``P = I[idx]``), every parameter axis in the group is contracted with ``P``:

* producers (``W ← P·W``, ``b ← P·b``) and consumers (``W ← W·Pᵀ``) alike; a consumer's
  bias also absorbs what the projection drops of the activation mean μ,
  ``b ← b + W(I − PᵀP)μ``, so the output stays exact for the mean;
* per-channel scales (LayerNorm/BatchNorm γ, running variances, depthwise kernels) become
  ``(P∘P)·v``, the diagonal of ``P·diag(v)·Pᵀ`` — exact for a selection, approximate for a
  rotation (the plan says which);
* graph constants that name the width (reshape sizes, ``normalized_shape``) become ``k``;
* a group cut into blocks takes a block-diagonal ``P`` (every block narrowed to ``k/H``):
  attention heads, whose head-dim constants of the reshapes follow while SDPA keeps its
  scale, and a grouped convolution's groups, whose input axis indexes within a group (block
  ``g`` of its outputs reads block ``g`` of the group, so it is contracted block by block).

BatchNorm that follows a convolution can first be folded into it (:func:`fold_batch_norms`).
The input module is never modified: the rewrite works on a deep copy.
"""

from __future__ import annotations

import copy
import dataclasses
import operator
from collections.abc import Callable, Mapping

import torch
from torch import nn
from torch.fx import GraphModule, Node

from fxcompress.analysis.ops import GROUPED_MM, arg
from fxcompress.analysis.plan import Plan, Use, WidthGroup
from fxcompress.capture import copy_module
from fxcompress.errors import FxCompressError

aten = torch.ops.aten

RESHAPES = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.expand.default}
SPLITS = {aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default}
CONVS = {aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.convolution.default,
         aten.conv1d.padding, aten.conv2d.padding, aten.conv3d.padding}  # padding="same" or "valid"
NORMS = {aten.layer_norm.default, getattr(aten, "rms_norm", aten.layer_norm).default}
BIASED = CONVS | {aten.linear.default}  # ops with a bias argument (addmm takes it first)


class RewriteError(FxCompressError):
    """A plan could not be applied; the message names the group and the node or parameter."""


@dataclasses.dataclass(frozen=True, eq=False)
class Projection:
    """The ``k × d`` matrix applied to one group, and the activation mean to fold into biases.

    ``lifts`` maps an activation (a node's name) to how a consumer that reads it reads the
    narrowed one back, a ``d × k`` matrix ``L``: ``x ≈ L·P·x + (I − L·P)·μ``. A consumer of
    any other activation reads through ``Pᵀ``, the read-back of an orthonormal ``P`` (and the
    best one where ``P`` holds leading eigenvectors); a channel selection gets least-squares
    ones (:func:`fxcompress.compress.reconstruction`).
    """

    matrix: torch.Tensor
    mean: torch.Tensor | None = None
    lifts: Mapping[str, torch.Tensor] | None = None

    @property
    def k(self) -> int:
        return int(self.matrix.shape[0])

    @staticmethod
    def select(indices, d: int) -> "Projection":
        """Keep the channels ``indices`` of ``d``."""
        index = torch.as_tensor(indices, dtype=torch.long)
        matrix = torch.zeros(index.numel(), d, dtype=torch.float64)
        matrix[torch.arange(index.numel()), index] = 1.0
        return Projection(matrix)


def rewrite(gm: GraphModule, plan: Plan, projections: Mapping[str, Projection], *, inplace: bool = False) -> GraphModule:
    """A copy of ``gm`` with every group in ``projections`` narrowed to its projection's ``k``.

    ``inplace=True`` narrows ``gm`` itself instead (no copy of its weights): for a module
    nobody else holds, such as a fresh capture; a failure then leaves it half rewritten.
    """
    out = gm if inplace else copy.deepcopy(gm)
    slices = _Slices()
    for name, proj in projections.items():
        group = _check(plan, name, proj)
        if proj.k == group.size and proj.mean is None and not proj.lifts and torch.equal(proj.matrix, torch.eye(group.size, dtype=proj.matrix.dtype)):
            continue
        _apply(out, group, proj, slices)
    out.graph.lint()
    out.recompile()
    return out


def exact_transforms(plan: Plan, seed: int = 0) -> dict[str, Projection]:
    """A random ``k = d`` transform on every group the plan marks exact: a block-diagonal
    rotation where a projection is exact, a permutation within each block where only a
    selection is. Rewritten with them, a model must compute the same function (in float64,
    to rounding): a check of the analysis on any model.
    """
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for group in plan.compressible:
        n = group.block_size
        if "projection" in group.exact:
            blocks = [torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=generator))[0]
                      for _ in range(group.blocks)]
            out[group.name] = Projection(torch.block_diag(*blocks))
        elif "selection" in group.exact:
            order = torch.cat([b * n + torch.randperm(n, generator=generator) for b in range(group.blocks)])
            out[group.name] = Projection.select(order, group.size)
    return out


def fold_batch_norms(gm: GraphModule) -> GraphModule:
    """A copy of captured ``gm`` with every BatchNorm that follows a convolution or linear layer
    (and is its only user) folded into that layer's weight and bias, with the running statistics.

    The copy computes the same function in eval mode. A group's producers are then no longer
    scaled channel by channel, so a rotation becomes exact where nothing else (a ReLU) stops it —
    MobileNetV2's linear bottlenecks, for one. The folded model has no BatchNorm left to train:
    fold for one-shot compression or deployment, not before fine-tuning from scratch.
    """
    out = copy.deepcopy(gm)
    for node in list(out.graph.nodes):
        layer = node.args[0] if node.op == "call_module" and node.args else None
        bn = out.get_submodule(node.target) if layer is not None else None
        if isinstance(bn, nn.modules.batchnorm._BatchNorm) and _foldable(layer, bn):
            _fold_into(out, layer, bn)
            node.replace_all_uses_with(layer)
            out.graph.erase_node(node)
    out.graph.lint()
    out.delete_all_unused_submodules()
    out.recompile()
    return out


FOLDABLE = CONVS - {aten.convolution.default} | {aten.linear.default}


def _foldable(layer: object, bn: nn.Module) -> bool:
    """A layer whose only user is the BatchNorm, with its own (unshared) weight and bias."""
    if not isinstance(layer, Node) or layer.op != "call_function" or layer.target not in FOLDABLE:
        return False
    if len(layer.users) != 1 or bn.running_mean is None:
        return False
    params = [p for p in layer.args[1:3] if p is not None]
    return all(isinstance(p, Node) and p.op == "get_attr" and len(p.users) == 1 for p in params)


def _fold_into(gm: GraphModule, layer: Node, bn: nn.Module) -> None:
    """``W ← s·W``, ``b ← s·(b − μ) + β`` with ``s = γ/√(σ² + ε)``, per output channel."""
    weight_name = layer.args[1].target
    weight = _get(gm, weight_name).detach()
    work = torch.float64
    scale = (bn.weight.detach().to(work) if bn.affine else 1.0) / torch.sqrt(bn.running_var.to(work) + bn.eps)
    shift = bn.bias.detach().to(work) if bn.affine else torch.zeros_like(scale)
    bias_node = layer.args[2] if len(layer.args) > 2 else None
    bias = _get(gm, bias_node.target).detach().to(work) if bias_node is not None else torch.zeros_like(scale)
    _set(gm, weight_name, (weight.to(work) * scale.reshape((-1,) + (1,) * (weight.ndim - 1))).to(weight.dtype))
    folded = ((bias - bn.running_mean.to(work)) * scale + shift).to(weight.dtype)
    if bias_node is not None:
        _set(gm, bias_node.target, folded)
    else:
        _add_bias(gm, layer, weight_name, folded)


def fold_norm_weights(gm: GraphModule) -> GraphModule:
    """A copy of captured ``gm`` in which every normalisation's per-channel scale that only
    linear layers read is folded into them: ``W ← W·diag(w)``, the scale ``w ← 1``.

    The copy computes the same function. A weightless RMSNorm commutes with rotations, so the
    residual stream of a pre-norm transformer (Llama, Mistral, Qwen…) can then be rotated onto
    its principal directions where a per-channel scale allowed only a channel selection (the
    scale of a rotated channel, ``(P∘P)·w``, is an average that no longer matches). Scales
    whose readers are not all unshared linear weights (a tied language-model head) stay."""
    out = copy_module(gm, share_weights=True)  # new tensors are installed, none written into
    aliases = _alias_counts(out)
    for node in list(out.graph.nodes):
        scale = norm_scale(node)
        if scale is None or not _fold_targets_ok(node, scale, aliases):
            continue
        w = _get(out, scale.target).detach().to(torch.float64)
        for user in _readers(node):
            name = user.args[1].target
            weight = _get(out, name)
            _set(out, name, (weight.detach().to(torch.float64) * w).to(weight.dtype))
        _set(out, scale.target, torch.ones_like(_get(out, scale.target)))
    out.recompile()
    return out


def norm_scale(node: Node) -> Node | None:
    """The per-channel scale of a normalisation's output: ``w * h`` written out (RMSNorm in
    transformers), or the weight of a fused ``rms_norm`` / ``layer_norm`` over the last axis."""
    if node.op != "call_function":
        return None
    if node.target in NORMS:
        weight = arg(node, "weight")  # with a shift β, W(w⊙n + β) is not (W·diag w)(n + β): left as it is
        return weight if isinstance(weight, Node) and len(node.args[1]) == 1 and arg(node, "bias") is None else None
    if node.target != aten.mul.Tensor or len(node.args) != 2:
        return None
    for scale, other in (node.args, node.args[::-1]):
        if isinstance(scale, Node) and scale.op == "get_attr" and isinstance(other, Node) and _after_norm(other):
            shape = getattr(scale.meta.get("val"), "shape", None)
            out = getattr(node.meta.get("val"), "shape", None)
            if shape is not None and out is not None and len(shape) == 1 and len(out) and shape[0] == out[-1]:
                return scale
    return None


def _after_norm(node: Node) -> bool:
    """Whether ``node`` is ``x · rsqrt(…)`` (a dtype cast allowed after it): RMSNorm written out."""
    while node.op == "call_function" and node.target in (aten.to.dtype, aten._to_copy.default) and node.args:
        node = node.args[0]
    return node.op == "call_function" and node.target == aten.mul.Tensor and any(
        isinstance(a, Node) and a.target == aten.rsqrt.default for a in node.args)


def _fold_targets_ok(node: Node, scale: Node, aliases: Mapping[str, int]) -> bool:
    """Every reader of ``node`` is a linear layer that reads it as its input, with a weight of
    its own; the scale is read here only."""
    if len(scale.users) != 1 or aliases.get(scale.target, 1) != 1:
        return False
    readers = _readers(node)
    for user in readers or [None]:
        weight = user.args[1] if user is not None and user.target == aten.linear.default and len(user.args) > 1 else None
        if not isinstance(weight, Node) or weight.op != "get_attr" or len(weight.users) != 1 \
                or aliases.get(weight.target, 1) != 1:
            return False
    return True


def _readers(node: Node) -> list[Node]:
    """The nodes that read ``node``'s channels, through slices and selections of other axes (a
    language model's head reads the last positions only); a slice of the channels is a reader."""
    out = []
    ndim = getattr(node.meta.get("val"), "ndim", 0)
    for user in node.users:
        if user.target in (aten.slice.Tensor, aten.select.int) and user.args[0] is node \
                and arg(user, "dim", 0) % max(ndim, 1) != ndim - 1:
            out.extend(_readers(user))
        else:
            out.append(user)
    return out


def _alias_counts(gm: GraphModule) -> dict[str, int]:
    """How many names each tensor of ``gm`` has (a tied weight has two), by name."""
    names: dict[int, list[str]] = {}
    for name, t in (*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)):
        names.setdefault(id(t), []).append(name)
    return {name: len(group) for group in names.values() for name in group}


class _Slices:
    """Where a group's slice of a concatenation's consumer lies now that earlier groups in the
    same axis may have narrowed theirs."""

    def __init__(self):
        self.changes: dict[tuple[str, int], list[tuple[int, int]]] = {}
        self.layout: dict[tuple[str, int], tuple[str, int]] = {}  # a bias made at its weight's width: its weight

    def offset(self, use: Use) -> int:
        return use.offset + sum(delta for start, delta in self.changes.get(self._key(use), []) if start < use.offset)

    def narrowed(self, use: Use, k: int) -> None:
        if (use.param, use.axis) not in self.layout:  # an added bias narrows with its weight, recorded once
            self.changes.setdefault((use.param, use.axis), []).append((use.offset, k - use.length))

    def same_as(self, bias: Use, weight: Use) -> None:
        """A bias a mean fold added lies as its weight's rows lie now (their earlier narrowing included)."""
        self.layout.setdefault((bias.param, bias.axis), (weight.param, weight.axis))

    def _key(self, use: Use) -> tuple[str, int]:
        return self.layout.get((use.param, use.axis), (use.param, use.axis))


def _check(plan: Plan, name: str, proj: Projection) -> WidthGroup:
    try:
        group = plan[name]
    except KeyError as exc:
        raise RewriteError(str(exc.args[0])) from None
    if group.frozen:
        raise RewriteError(f"group {name!r} is frozen ({'; '.join(group.frozen_by)}): it cannot be narrowed")
    if proj.matrix.ndim != 2 or proj.matrix.shape[1] != group.size:
        raise RewriteError(f"group {name!r} has width {group.size}; its projection has shape {tuple(proj.matrix.shape)}")
    if not 0 < proj.k <= group.size:
        raise RewriteError(f"group {name!r}: k = {proj.k} must lie in [1, {group.size}]")
    if group.blocks > 1 and not _block_diagonal(proj.matrix, group.blocks):
        raise RewriteError(f"group {name!r} is {group.blocks} blocks of {group.block_size}: its projection must be "
                           f"block-diagonal, k/{group.blocks} rows per block (got {tuple(proj.matrix.shape)})")
    for node, lift in (proj.lifts or {}).items():
        if group.blocks > 1 or tuple(lift.shape) != (group.size, proj.k):
            raise RewriteError(f"group {name!r}: the lift at {node!r} must be {group.size} × {proj.k} on a group of one "
                               f"block, got {tuple(lift.shape)} on {group.blocks} block(s)")
    return group


def _block_diagonal(matrix: torch.Tensor, blocks: int) -> bool:
    k, d = matrix.shape
    if k % blocks:
        return False
    tiles = matrix.reshape(blocks, k // blocks, blocks, d // blocks)
    off = ~torch.eye(blocks, dtype=torch.bool)
    return not bool(tiles.permute(0, 2, 1, 3)[off].any())


def _apply(gm: GraphModule, group: WidthGroup, proj: Projection, slices: _Slices) -> None:
    p = proj.matrix.to(torch.float64)
    mean = None if proj.mean is None else proj.mean.to(torch.float64)
    producers = {(u.param, u.axis, u.offset) for u in group.producers}
    lifted = _reading_back(gm, group, proj)
    if mean is not None:
        for use in group.consumers:
            if (use.param, use.axis, use.offset) not in producers:
                _fold_mean(gm, use, *_as_seen(p, mean, group, use), slices.offset(use), lifted.get(use))
    done: set[tuple[str, int, int]] = set()
    for use in (*group.producers, *_added_biases(gm, group, slices), *group.consumers, *group.channels):
        if (use.param, use.axis, use.offset) in done:
            continue
        done.add((use.param, use.axis, use.offset))
        start, (q, _) = slices.offset(use), _as_seen(p, None, group, use)
        if use in lifted and (use.param, use.axis, use.offset) not in producers:
            q = lifted[use].T  # the consumer reads the narrowed activation back through the lift
        if use.role == "channel":
            _narrow_channel(gm, use, q, start)
        elif use.block_axis is not None:
            _set(gm, use.param, _along_blocks(_get(gm, use.param), q, use.axis, use.block_axis, group.blocks,
                                              start, use.length))
        else:
            _set(gm, use.param, _along(_get(gm, use.param), q, use.axis, start, use.length))
        if use.length is not None:  # a slice of each expert's weight holds one block of P
            slices.narrowed(use, q.shape[0] // (group.blocks if use.block_axis is not None else 1))
    _rewrite_constants(gm, group, proj.k)


def _reading_back(gm: GraphModule, group: WidthGroup, proj: Projection) -> dict[Use, torch.Tensor]:
    """Each consumer's lift (float64), where ``proj`` has one for the activation it reads (whole:
    not a slice, a block or a repeat of it); every other consumer reads through ``Pᵀ``."""
    if not proj.lifts:
        return {}
    nodes = {n.name: n for n in gm.graph.nodes}
    out = {}
    for use in group.consumers:
        if plain(use) and use.node in nodes and not is_grouped_mm(nodes[use.node]):
            read = [i.name for i in nodes[use.node].all_input_nodes if i.name in proj.lifts]
            if len(read) == 1:
                out[use] = proj.lifts[read[0]].to(torch.float64)
    return out


def plain(use: Use) -> bool:
    """Whether ``use`` holds the group's whole width once (no slice, block or repeat of it)."""
    return (use.length, use.block_axis, use.block, use.repeat) == (None, None, None, 1)


def _as_seen(p: torch.Tensor, mean: torch.Tensor | None, group: WidthGroup, use: Use):
    """``P`` and the mean as ``use``'s axis sees them: one diagonal block where it holds one
    block (a projection packed head by head), every block ``repeat`` times in turn where it
    repeats them (grouped-query attention's query side), else as they are."""
    blocks = group.blocks
    if use.block is not None:
        return _tile(p, blocks, use.block), None if mean is None else mean.chunk(blocks)[use.block]
    if use.repeat == 1:
        return p, mean
    tiles = [_tile(p, blocks, g) for g in range(blocks) for _ in range(use.repeat)]
    return torch.block_diag(*tiles), None if mean is None else mean.reshape(blocks, -1).repeat_interleave(use.repeat, 0).reshape(-1)


def _tile(p: torch.Tensor, blocks: int, g: int) -> torch.Tensor:
    """The ``g``-th of ``blocks`` diagonal blocks of a block-diagonal ``P``."""
    k, d = (size // blocks for size in p.shape)
    return p[g * k:(g + 1) * k, g * d:(g + 1) * d]


def _bias_of(node: Node) -> object:
    """The bias input of a linear, convolution or addmm call (addmm takes it first); for other
    products (``x @ W``), the parameter added to it where that add is its only user."""
    if node.target == aten.addmm.default:
        return node.args[0]
    if node.target in BIASED:
        return arg(node, "bias")
    added = next((u for u in node.users if u.target == aten.add.Tensor and u.args[0] is node), None)
    if added is None or len(node.users) != (2 if is_grouped_mm(node) else 1):  # an expert bias reads a column too
        return None
    bias = added.args[1]
    if is_grouped_mm(node) and isinstance(bias, Node) and bias.target == aten.index.Tensor:  # a row per expert
        bias = bias.args[0]
    return bias if isinstance(bias, Node) and bias.op == "get_attr" else None


def _added_biases(gm: GraphModule, group: WidthGroup, slices: _Slices) -> list[Use]:
    """Biases a mean fold gave to this group's producers after the plan was made (at the width
    their weights had then: ``slices`` learns that they lie as the weights do)."""
    known = {(u.param, u.offset) for u in group.producers}
    nodes = {n.name: n for n in gm.graph.nodes}
    extra = []
    for use in group.producers:  # the bias lies as the weight's rows do: in the same slice, as often repeated
        node = nodes.get(use.node)
        bias = _bias_of(node) if node is not None and node.op == "call_function" else None
        if isinstance(bias, Node) and bias.op == "get_attr" and (bias.target, use.offset) not in known:
            experts = is_grouped_mm(node)  # a bias per expert: (experts, out)
            extra.append(dataclasses.replace(use, param=bias.target, axis=1 if experts else 0,
                                             block_axis=use.block_axis if experts else None))
            slices.same_as(extra[-1], use)
            known.add((bias.target, use.offset))
    return extra


def _along(t: torch.Tensor, p: torch.Tensor, axis: int, start: int = 0, length: int | None = None) -> torch.Tensor:
    """Contract axis ``axis`` of ``t`` with ``P``'s columns (in float64 for float64 tensors, float32
    otherwise; original dtype out); with ``length``, only the slice ``[start, start + length)`` of
    the axis (a concatenation's part). A selection ``P`` is an index: the kept entries are copied."""
    index = _selection_index(p)
    if index is not None:
        end = t.shape[axis] if length is None else start + length
        keep = torch.cat([torch.arange(start), index + start, torch.arange(end, t.shape[axis])])
        return torch.index_select(t.detach(), axis, keep).contiguous()
    work = torch.float64 if t.dtype == torch.float64 else torch.float32
    moved, p = torch.movedim(t.detach().to(work), axis, -1), p.to(work)
    if length is None:
        moved = moved @ p.T
    else:
        moved = torch.cat([moved[..., :start], moved[..., start:start + length] @ p.T, moved[..., start + length:]], -1)
    # canonical strides (size-one axes included): convolution kernels pick their algorithm by them
    return torch.movedim(moved, -1, axis).to(t.dtype).clone(memory_format=torch.contiguous_format)


def _along_blocks(t: torch.Tensor, p: torch.Tensor, axis: int, block_axis: int, blocks: int, start: int = 0,
                  length: int | None = None) -> torch.Tensor:
    """A grouped convolution's input axis: the ``g``-th block of ``block_axis`` (its output
    channels) reads the group's block ``g``, so it is contracted with ``P``'s ``g``-th diagonal
    block; so is expert ``g``'s weight (its block of ``block_axis``, the experts' axis), in the
    slice ``[start, start + length)`` of ``axis`` where it is given."""
    parts = t.split(t.shape[block_axis] // blocks, dim=block_axis)
    return torch.cat([_along(part, _tile(p, blocks, g), axis, start, length) for g, part in enumerate(parts)],
                     dim=block_axis)


def _selection_index(p: torch.Tensor) -> torch.Tensor | None:
    """The kept columns if every row of ``p`` is a distinct unit vector ``eᵢ``, else None."""
    if p.numel() and int(torch.count_nonzero(p[0])) != 1:  # a rotation's first row already says no
        return None
    ones = p == 1
    if not bool((ones.sum(dim=1) == 1).all()) or int(torch.count_nonzero(p)) != p.shape[0]:
        return None
    index = ones.to(torch.int8).argmax(dim=1)
    return index if index.unique().numel() == index.numel() else None


def _narrow_channel(gm: GraphModule, use: Use, p: torch.Tensor, start: int) -> None:
    target = _resolve(gm, use.param)
    node = next((n for n in gm.graph.nodes if n.name == use.node), None)
    if isinstance(target, nn.modules.batchnorm._BatchNorm):
        _narrow_batch_norm(target, p, start, use.length)
    elif _selection_index(p) is None and use.length is None and node is not None and node.target == aten.mul.Tensor \
            and norm_scale(node) is not None and bool((target != target.reshape(-1)[0]).any()):
        _scale_as_matrix(gm, node, use.param, p)
    else:
        _set(gm, use.param, _along(target, p * p, use.axis, start, use.length))


def _scale_as_matrix(gm: GraphModule, node: Node, name: str, p: torch.Tensor) -> None:
    """A normalisation's per-channel scale ``w`` on a rotated group (one that could not be folded
    into its readers: a tied head): ``h·w`` becomes ``h·(P diag(w) Pᵀ)``, a ``k × k`` product,
    exact at ``k = d`` where the diagonal ``(P∘P)·w`` is not. (A constant scale, as folding
    leaves it, keeps its diagonal: ``P diag(c) Pᵀ = c·I``.)"""
    w = _get(gm, name).detach()
    matrix = (p * w.to(p.dtype)) @ p.T
    _set(gm, name, matrix.to(w.dtype).contiguous())
    scale = next(a for a in node.args if isinstance(a, Node) and a.op == "get_attr" and a.target == name)
    h = next(a for a in node.args if a is not scale)
    node.target, node.args, node.kwargs = aten.linear.default, (h, scale), {}


def _narrow_batch_norm(bn: nn.modules.batchnorm._BatchNorm, p: torch.Tensor, start: int, length: int | None) -> None:
    for name, matrix in (("weight", p * p), ("bias", p), ("running_mean", p), ("running_var", p * p)):
        tensor = getattr(bn, name, None)
        if tensor is not None:
            new = _along(tensor, matrix, 0, start, length)
            setattr(bn, name, nn.Parameter(new, requires_grad=tensor.requires_grad) if isinstance(tensor, nn.Parameter) else new)
    bn.num_features = bn.num_features - p.shape[1] + p.shape[0]


def _fold_mean(gm: GraphModule, use: Use, p: torch.Tensor, mean: torch.Tensor, start: int,
               lift: torch.Tensor | None = None) -> None:
    """``b ← b + W(I − LP)μ`` for a linear or convolution consumer (adds a bias if it had none);
    ``L``: the consumer's read-back, ``Pᵀ`` unless a ``lift`` is given."""
    node = next(n for n in gm.graph.nodes if n.name == use.node)
    weight = _get(gm, use.param).detach().to(torch.float64)
    lost = mean - (p.T if lift is None else lift) @ (p @ mean)
    if is_grouped_mm(node):  # each expert's output takes its own share, added row by row
        _add_expert_bias(gm, node, use.param, _expert_shift(weight, use, lost, start))
        return
    if use.block_axis is not None:  # a grouped convolution: output block g reads block g of what was lost
        moved = torch.movedim(weight, (use.block_axis, use.axis), (0, -1))
        lost = lost.reshape(-1, moved.shape[-1]).repeat_interleave(moved.shape[0] * moved.shape[-1] // lost.numel(), 0)
        shift = (moved.reshape(moved.shape[0], -1, moved.shape[-1]) * lost[:, None]).sum(dim=(1, 2))
    else:
        moved = torch.movedim(weight, use.axis, -1)
        if use.length is not None:
            moved = moved[..., start:start + use.length]
        shift = (moved @ lost).reshape(moved.shape[0], -1).sum(dim=1)  # sums kernel taps (interior pixels)
    bias = _bias_of(node)
    if isinstance(bias, Node) and bias.op == "get_attr":
        old = _get(gm, bias.target)
        _set(gm, bias.target, (old.detach().to(torch.float64) + shift).to(old.dtype))
    else:  # none, or one the graph computes (EVA-02's cat(q_bias, 0, v_bias)): a bias of its own, added after
        _add_bias(gm, node, use.param, shift.to(_get(gm, use.param).dtype), after=bias is not None)


def is_grouped_mm(node: Node) -> bool:
    """A mixture of experts' grouped product (see :func:`fxcompress.analysis.ops.grouped_mm`)."""
    return str(node.target) in GROUPED_MM


def _expert_shift(weight: torch.Tensor, use: Use, lost: torch.Tensor, start: int) -> torch.Tensor:
    """``W_e(I − PᵀP)μ`` of each expert ``e``, ``(experts, out)``: what it lost is its own
    block of ``lost`` where the group is the experts' hidden width, else all of it."""
    moved = torch.movedim(weight, use.axis, -1)  # (experts, out, in)
    if use.length is not None:
        moved = moved[..., start:start + use.length]
    lost = lost.reshape(moved.shape[0], -1) if use.block_axis is not None else lost.expand(moved.shape[0], -1)
    return (moved @ lost.unsqueeze(-1)).squeeze(-1)


def _add_expert_bias(gm: GraphModule, node: Node, weight_name: str, value: torch.Tensor) -> None:
    """Add row ``e`` of ``value`` to the rows of a grouped product that expert ``e`` computed:
    the expert of row ``r`` is the first whose offset exceeds ``r``."""
    offs = arg(node, "offs")
    name = _fresh_attribute(gm, weight_name.rpartition(".")[0].replace(".", "_") + "_expert_bias")
    _set(gm, name, value.to(_get(gm, weight_name).dtype), parameter=True)
    call = gm.graph.call_function
    with gm.graph.inserting_before(node.next):  # in this order, right after the product
        column = call(aten.select.int, (node, 1, 0))
        ones = call(aten.ones_like.default, (column,), {"dtype": offs.meta["val"].dtype})
        rows = call(aten.cumsum.default, (ones, 0))  # row r counts r + 1
        expert = call(aten.searchsorted.Tensor, (offs, rows))
        per_row = call(aten.index.Tensor, (gm.graph.get_attr(name), [expert]))
        added = call(aten.add.Tensor, (node, per_row))
    node.replace_all_uses_with(added, delete_user_cb=lambda user: user is not added and user is not column)


def _add_bias(gm: GraphModule, node: Node, weight_name: str, value: torch.Tensor, after: bool = False) -> None:
    """Give ``node`` the bias ``value``: as its bias argument, or (``after``, or a product without
    one) added to its output, along the channel axis of a convolution, the last of others."""
    name = weight_name.rpartition(".")[0] + ".bias" if "." in weight_name else weight_name + "_bias"
    if _exists(gm, name):
        name = _fresh_attribute(gm, name)
    if after and node.target in CONVS:
        value = value.reshape(-1, *[1] * (node.meta["val"].ndim - 2))
    _set(gm, name, value, parameter=True)
    with gm.graph.inserting_before(node):
        bias_node = gm.graph.get_attr(name)
    if after or node.target not in BIASED:  # a product without a bias argument: add one after it
        with gm.graph.inserting_after(node):
            added = gm.graph.call_function(aten.add.Tensor, (node, bias_node))
        node.replace_all_uses_with(added, delete_user_cb=lambda user: user is not added)
        return
    args = list(node.args)
    while len(args) < 3:
        args.append(None)
    args[2] = bias_node
    node.args = tuple(args)


def _fresh_attribute(gm: GraphModule, name: str) -> str:
    number = 1
    while _exists(gm, f"{name}_{number}"):
        number += 1
    return f"{name}_{number}"


def _rewrite_constants(gm: GraphModule, group: WidthGroup, k: int) -> None:
    nodes = {n.name: n for n in gm.graph.nodes}
    block, new_block = group.block_size, k // group.blocks
    for name, axis in group.activations:  # the whole, one block (a head), or repeated blocks: so many blocks
        _resize_constant(nodes[name], axis, lambda size: size // block * new_block if size % block == 0 else None)
    for name, axis, width in group.containers:  # concatenations the group lies in are narrower by as much
        if name in nodes:
            _resize_constant(nodes[name], axis, lambda size: size - width + width * k // group.size)
    _resize_splits(nodes, group, k)
    activations = set(group.activations)
    if group.blocks == 1 and k < group.size:
        _keep_mean_widths(gm, nodes, activations, group.size, k)
    for node in nodes.values():
        if node.target == aten.scaled_dot_product_attention.default:
            query = node.args[0]
            if (query.name, query.meta["val"].ndim - 1) in activations:
                _keep_attention_scale(node)


def _resize_constant(node: Node, axis: int, resize: Callable[[int], int | None]) -> None:
    """The graph constant naming the size of ``node``'s ``axis`` (a reshape size, a depthwise
    ``groups``, a norm's ``normalized_shape``) becomes ``resize(size)``, unless that is None."""
    if node.op != "call_function":
        return
    if node.target in RESHAPES and isinstance(node.args[1], (list, tuple)):
        sizes = list(node.args[1])
        if isinstance(sizes[axis], int) and sizes[axis] > 0 and resize(sizes[axis]) is not None:
            sizes[axis] = resize(sizes[axis])
            node.args = (node.args[0], sizes, *node.args[2:])
    elif node.target in CONVS and axis == 1 and _depthwise(node) and resize(arg(node, "groups")) is not None:
        _set_arg(node, "groups", resize(arg(node, "groups")))  # depthwise: one group per channel
    elif node.target in NORMS and axis == node.meta["val"].ndim - 1 and resize(node.args[1][-1]) is not None:
        node.args = (node.args[0], [*node.args[1][:-1], resize(node.args[1][-1])], *node.args[2:])


def _depthwise(node: Node) -> bool:
    """A convolution with one group per channel, as captured (its parts, a concatenation's, may
    then narrow one after another: each takes its share off ``groups``)."""
    if "fxcompress.depthwise" not in node.meta:
        node.meta["fxcompress.depthwise"] = 1 < arg(node, "groups", 1) == node.meta["val"].shape[1]
    return node.meta["fxcompress.depthwise"]


def _resize_splits(nodes: Mapping[str, Node], group: WidthGroup, k: int) -> None:
    """A split whose output narrows becomes ``split_with_sizes`` with that part's size ``k``; a
    part that holds the group (a part concatenated again, MambaOut's; a slice of a whole that
    holds it, ReXNet's) is narrower by as much."""
    for name, index in group.splits:
        _resize_split_part(nodes[name], index, lambda size: size * k // group.size)  # the group, or one block of it
    for name, axis, width in group.containers:
        resize = lambda size, width=width: size - width + width * k // group.size  # noqa: E731
        if name.startswith("slice:"):  # what a slice leaves before or after it holds the group
            _, sliced, where = name.split(":")
            _resize_slice(nodes[sliced], 0 if where == "before" else 2, resize)
            continue
        node = nodes[name]
        if node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[0], Node) \
                and node.args[0].target in SPLITS:
            _resize_split_part(node.args[0], node.args[1], resize)
        elif node.op == "call_function" and node.target == aten.slice.Tensor \
                and axis == arg(node, "dim", 0) % node.meta["val"].ndim:  # a slice that holds the group
            _resize_slice(node, 1, resize)


def _resize_split_part(node: Node, index: int, resize: Callable[[int], int]) -> None:
    if node.target == aten.slice.Tensor:
        _resize_slice(node, index, resize)
        return
    x, dim = node.args[0], arg(node, "dim", 0)
    if node.target == aten.split_with_sizes.default:
        sizes = list(node.args[1])
    else:
        sizes = [int(v.shape[dim]) for v in node.meta["val"]]
    sizes[index] = resize(sizes[index])
    node.target = aten.split_with_sizes.default
    node.args, node.kwargs = (x, sizes, dim), {}


def _resize_slice(node: Node, index: int, resize: Callable[[int], int]) -> None:
    """A slice is its axis in three parts (before, itself, after): one narrows, the bounds follow."""
    if "fxcompress.parts" not in node.meta:
        x, axis = node.args[0], arg(node, "dim", 0) % node.args[0].meta["val"].ndim
        size = int(x.meta["val"].shape[axis])
        start, stop, _ = slice(arg(node, "start"), arg(node, "end")).indices(size)
        node.meta["fxcompress.parts"] = [start, max(start, stop) - start, size - max(start, stop)]
    sizes = node.meta["fxcompress.parts"]
    sizes[index] = resize(sizes[index])
    _set_arg(node, "start", sizes[0])
    _set_arg(node, "end", sizes[0] + sizes[1])


MEANS = {aten.mean.dim}
KEPT_WIDTH = "fxcompress.kept_width"  # on a mean (or rms_norm) node: (original width d, channels now k)


def _keep_mean_widths(gm: GraphModule, nodes: Mapping[str, Node], activations: set, d: int, k: int) -> None:
    """A mean over the narrowed channels keeps dividing by the original width ``d``: the
    kept directions carry (nearly) all of the energy, so ``sum/d`` is what the layer saw
    before, where ``sum/k`` would inflate it by ``d/k`` (RMSNorm's ``mean(x²)``: SliceGPT
    keeps the original width there too). A fused ``rms_norm`` gets the same through its
    ``eps`` and a factor on its output."""
    for node in list(nodes.values()):
        if node.op != "call_function" or not node.args or not isinstance(node.args[0], Node):
            continue
        x = node.args[0]
        ndim = getattr(x.meta.get("val"), "ndim", None)
        if node.target in MEANS and ndim and any((x.name, a % ndim) in activations for a in node.args[1]):
            _scale_output(gm, node, k / d)
        elif hasattr(aten, "rms_norm") and node.target == aten.rms_norm.default and ndim and (node.name, ndim - 1) in activations:
            eps = arg(node, "eps") or torch.finfo(x.meta["val"].dtype).eps
            _set_arg(node, "eps", eps * d / k)
            _scale_output(gm, node, (d / k) ** 0.5)
        else:
            continue
        node.meta[KEPT_WIDTH] = (node.meta.get(KEPT_WIDTH, (d, d))[0], k)  # what to_module gives the module


def _scale_output(gm: GraphModule, node: Node, factor: float) -> None:
    with gm.graph.inserting_after(node):
        scaled = gm.graph.call_function(aten.mul.Tensor, (node, factor))
    node.replace_all_uses_with(scaled, delete_user_cb=lambda user: user is not scaled)


def _keep_attention_scale(node: Node) -> None:
    """SDPA scales scores by 1/√(head dim) unless told: narrowing the query must not change that."""
    if node.kwargs.get("scale") is None:
        node.kwargs = {**node.kwargs, "scale": float(node.args[0].meta["val"].shape[-1]) ** -0.5}


def _set_arg(node: Node, name: str, value: object) -> None:
    """Set an ATen call's argument by schema name, filling defaults before it if needed."""
    if name in node.kwargs:
        node.kwargs = {**node.kwargs, name: value}
        return
    arguments = node.target._schema.arguments
    index = next(i for i, a in enumerate(arguments) if a.name == name)
    args = list(node.args)
    while len(args) <= index:
        args.append(arguments[len(args)].default_value)
    args[index] = value
    node.args = tuple(args)


# -- parameter access ----------------------------------------------------------------------
def _resolve(gm: GraphModule, name: str):
    try:
        return operator.attrgetter(name)(gm)
    except AttributeError:
        raise RewriteError(f"the plan names {name!r}, which this module does not have: "
                           "apply a plan to the module it was made from") from None


def _get(gm: GraphModule, name: str) -> torch.Tensor:
    value = _resolve(gm, name)
    if not isinstance(value, torch.Tensor):
        raise RewriteError(f"{name!r} is a {type(value).__name__}, not a tensor")
    return value


def _exists(gm: GraphModule, name: str) -> bool:
    try:
        operator.attrgetter(name)(gm)
        return True
    except AttributeError:
        return False


def _set(gm: GraphModule, name: str, value: torch.Tensor, parameter: bool | None = None) -> None:
    """Install ``value`` as ``name``, and as every other name of the tensor it replaces: a tied
    weight (an embedding and its language-model head) stays one tensor, none left behind."""
    owner_name, _, attr = name.rpartition(".")
    owner = gm.get_submodule(owner_name) if owner_name else gm
    old = getattr(owner, attr, None)
    as_parameter = isinstance(old, nn.Parameter) if parameter is None else parameter
    if as_parameter:
        value = nn.Parameter(value, requires_grad=old.requires_grad if isinstance(old, nn.Parameter) else True)
    held = () if old is None else (*gm.named_parameters(remove_duplicate=False),
                                   *gm.named_buffers(remove_duplicate=False))
    aliases = [n for n, t in held if t is old and n != name]
    for target in (name, *aliases):
        _install(gm, target, value, as_parameter)


def _install(gm: GraphModule, name: str, value: torch.Tensor, as_parameter: bool) -> None:
    owner_name, _, attr = name.rpartition(".")
    owner = gm.get_submodule(owner_name) if owner_name else gm
    if as_parameter:
        if attr in owner._parameters or getattr(owner, attr, None) is None:
            owner.register_parameter(attr, value)
        else:
            setattr(owner, attr, value)
    elif attr in owner._buffers:
        owner.register_buffer(attr, value)
    else:
        setattr(owner, attr, value)