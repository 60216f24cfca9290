"""Width propagation: a pure pass from an ATen graph to its :class:`Plan` of width groups.

Every axis of every tensor in the graph (activations and parameters alike) is an element of
a union-find. The op rules in :mod:`fxcompress.analysis.ops` tie axes that must keep one
size, tag what each op does to them, and record which parameter axes produce or consume
them. The classes that hold parameter axes are the width groups. Model inputs and outputs
keep their sizes, and an op without a rule freezes every dimension it touches: nothing is
ever assumed to be elementwise.
"""

from __future__ import annotations

import dataclasses
import functools
import operator
from collections import defaultdict
from typing import Any

import torch
from torch.fx import GraphModule, Node

from fxcompress.analysis.ops import IDENTITY_LIKE, MODULE_RULES, OP_RULES, SIZE_READS, TRANSPOSES, UNIT_VIEWS
from fxcompress.analysis.plan import Plan, Use, WidthGroup
from fxcompress.capture import capture

DimKey = tuple[str, int]


class Context:
    """What rules see: shapes of nodes, and the operations on the union-find of axes."""

    def __init__(self, gm: GraphModule):
        self.gm = gm
        self.nodes = {node.name: node for node in gm.graph.nodes}
        self.parent: dict[DimKey, DimKey] = {}
        self.effects: dict[DimKey, list[tuple[str, str]]] = defaultdict(list)
        self.frozen: dict[DimKey, list[str]] = defaultdict(list)
        self.uses: list[tuple[DimKey, Use, str | None]] = []
        self.splits: dict[str, tuple[Node, int]] = {}
        self.blocks: list[tuple[DimKey, int, str]] = []  # an axis cut into equal blocks: count, by what
        self.repeats: list[tuple[DimKey, int, int]] = []  # blocks of an axis that another axis repeats
        self.head_axes: list[tuple[DimKey, DimKey]] = []  # a feature axis split into heads, and the heads' axis
        self.block_widths: dict[DimKey, int] = {}  # a part whose slices each hold one of its blocks: their width
        # (whole, first, second, last axis, (sizes), view): a packed axis viewed as a grid of parts and heads
        self.grids: list[tuple[DimKey, DimKey, DimKey, DimKey, tuple[int, int, int], str]] = []
        self.segments: list[tuple[DimKey, list[tuple[DimKey, int, str]], str]] = []  # whole, parts, cat node
        self.split_index: dict[DimKey, tuple[str, int]] = {}  # a split output's axis → (split node, index)
        self.rests: dict[DimKey, int] = {}  # what a slice leaves of an axis, before and after it: its size
        self.picked: list[DimKey] = []  # axes taken apart entry by entry (select, unbind): parts, not heads
        self.repeated: set[DimKey] = set()  # parts that a whole holds once per head (see _leaves)
        self.experts: dict[str, tuple[int, str]] = {}  # a grouped (experts') product: its experts, its offsets
        self.stacked: list[DimKey] = []  # the new axes of stacks: their entries share the other axes

    # -- shapes -------------------------------------------------------------------------
    def value(self, node: Any) -> torch.Tensor | None:
        if not isinstance(node, Node):
            return None
        if node.op == "get_attr":  # a parameter, a buffer, or a higher-order op's subgraph (not a tensor)
            val = operator.attrgetter(node.target)(self.gm)
            return val if isinstance(val, torch.Tensor) else None
        val = node.meta.get("val")
        return val if isinstance(val, torch.Tensor) else None

    def shape(self, node: Any) -> tuple | None:
        val = self.value(node)
        return None if val is None else tuple(_size_key(s) for s in val.shape)

    def ndim(self, node: Any) -> int:
        shape = self.shape(node)
        return 0 if shape is None else len(shape)

    def size(self, node: Any, axis: int) -> Any:
        return self.shape(node)[axis]

    def same_size(self, a: Node, ai: int, b: Node, bi: int) -> bool:
        return self.size(a, ai) == self.size(b, bi)

    def dim(self, node: Any, axis: int) -> DimKey | None:
        """The key of one axis; parameters are keyed by name, so a tied weight is one tensor."""
        n = self.ndim(node)
        if not n:
            return None
        return (f"param:{node.target}" if node.op == "get_attr" else node.name, axis % n)

    def dims(self, node: Any) -> list[DimKey]:
        return [self.dim(node, a) for a in range(self.ndim(node))]

    # -- union-find ---------------------------------------------------------------------
    def find(self, key: DimKey) -> DimKey:
        root = self.parent.setdefault(key, key)
        while root != self.parent[root]:
            self.parent[root] = self.parent[self.parent[root]]
            root = self.parent[root]
        return root

    def tie(self, a: DimKey | None, b: DimKey | None) -> None:
        if a is not None and b is not None:
            ra, rb = self.find(a), self.find(b)
            if ra != rb:
                self.parent[rb] = ra

    def tie_all(self, x: Node, node: Node) -> None:
        if self.ndim(x) == self.ndim(node):
            for a in range(self.ndim(node)):
                self.tie(self.dim(x, a), self.dim(node, a))
        else:
            self.broadcast(node, [x], param_role="channel")

    def tie_leading(self, x: Node, node: Node, count: int) -> None:
        for a in range(count):
            self.tie(self.dim(x, a), self.dim(node, a))

    def broadcast(self, node: Node, operands: list[Any], param_role: str) -> None:
        """Tie each operand axis to the output axis it lines up with (from the right), unless broadcast."""
        out = self.shape(node)
        if out is None:
            return
        for operand in operands:
            shape = self.shape(operand)
            if shape is None:
                continue
            offset = len(out) - len(shape)
            for a, size in enumerate(shape):
                if size == out[a + offset] and size != 1:
                    self.tie(self.dim(operand, a), self.dim(node, a + offset))
                    if self.parameter(operand) is not None:
                        self.record(self.dim(node, a + offset), operand, a, param_role, node, None)

    def broadcast_axis(self, node: Node, operands: list[Node], axis: int) -> None:
        out = self.shape(node)
        for operand in operands:
            shape = self.shape(operand)
            a = axis - (len(out) - len(shape))
            if a >= 0 and shape[a] == out[axis] and shape[a] != 1:
                self.tie(self.dim(operand, a), self.dim(node, axis))

    # -- what ops do --------------------------------------------------------------------
    def effect(self, key: DimKey | None, effect: str, node: Node) -> None:
        if key is not None:
            self.effects[key].append((effect, node.name))

    def effect_all(self, node: Node, effect: str) -> None:
        for key in self.dims(node):
            self.effect(key, effect, node)

    def freeze(self, key: DimKey | None, reason: str) -> None:
        if key is not None:
            self.frozen[key].append(reason)

    def freeze_all(self, node: Any, reason: str) -> None:
        for key in self.dims(node):
            self.freeze(key, reason)

    def parameter(self, node: Any) -> Node | None:
        """The parameter (``get_attr``) that ``node`` is, or is a cast, a copy, a transpose or a
        view with unit axes added or dropped of (a layer scale ``γ.reshape(1, -1, 1, 1)``, a
        weight used as ``x @ W.T``); None for computed tensors."""
        found = (self.parameter_axis(node, axis) for axis in range(self.ndim(node)))
        return next((f[0] for f in found if f is not None), None)

    def parameter_axis(self, node: Any, axis: int) -> tuple[Node, int] | None:
        """``(parameter, its axis)`` that ``node``'s ``axis`` is (see :meth:`parameter`)."""
        while isinstance(node, Node) and node.op == "call_function" and self.ndim(node):
            source, axis = node.args[0], axis % self.ndim(node)
            if node.target in IDENTITY_LIKE:
                pass
            elif node.target in TRANSPOSES:
                axis = _transposed_axis(node, axis, self.ndim(node))
            elif node.target in UNIT_VIEWS:
                axis = _unit_view_axis(self.shape(source), self.shape(node), axis)
            else:
                return None
            if axis is None:
                return None
            node = source
        return (node, axis) if isinstance(node, Node) and node.op == "get_attr" else None

    def record(self, key: DimKey, param: Node, axis: int, role: str, node: Node, activation: Node | None,
               block_axis: int | None = None) -> None:
        """``param``'s ``axis`` is in ``key``'s group, as ``role``; a weight computed by the graph
        (weight normalisation, an activation) freezes the group: only parameters are narrowed."""
        self.tie(key, self.dim(param, axis))
        found = self.parameter_axis(param, axis)
        if found is None:
            self.freeze(key, f"{node.name} takes a computed {role} weight ({param.name}): only parameters are narrowed")
            return
        source, axis = found
        use = Use(param=str(source.target), axis=axis, role=role, node=node.name, block_axis=block_axis)
        self.uses.append((key, use, None if activation is None else activation.name))

    def consume(self, x: Node, x_axis: int, weight: Node, w_axis: int, node: Node, block_axis: int | None = None) -> None:
        self.record(self.dim(x, x_axis), weight, w_axis, "consumer", node, x, block_axis)

    def produce(self, node: Node, axis: int, weight: Node, w_axis: int, bias: Any) -> None:
        self.record(self.dim(node, axis), weight, w_axis, "producer", node, node)
        if isinstance(bias, Node):
            self.record(self.dim(node, axis), bias, 0, "producer", node, None)

    def channel(self, node: Node, axis: int, param: Node, p_axis: int, op: Node) -> None:
        self.record(self.dim(node, axis), param, p_axis, "channel", op, None)

    def channel_module(self, node: Node, axis: int) -> None:
        """A submodule's per-channel state (BatchNorm: weight, bias, running statistics)."""
        key = self.dim(node, axis)
        self.uses.append((key, Use(param=str(node.target), axis=0, role="channel", node=node.name), None))

    def cut_into_blocks(self, key: DimKey | None, count: int, why: str) -> None:
        """The axis ``key`` is ``count`` equal blocks that must narrow alike (heads, convolution groups)."""
        if key is not None:
            self.blocks.append((key, count, why))

    def repeat_blocks(self, key: DimKey | None, base: int, count: int) -> None:
        """Where ``key``'s group is cut into ``count`` blocks, block ``i`` repeats block ``i // (count / base)``
        of its cut into ``base`` (grouped-query attention)."""
        if key is not None:
            self.repeats.append((key, base, count))

    # -- reshapes and splits ---------------------------------------------------------------
    def match_reshape(self, x: Node, node: Node) -> None:
        """Tie input and output axes that a view maps one to one; freeze those it merges or splits,
        except a last axis split into heads (or merged from them), as attention does."""
        a_shape, b_shape = self.shape(x), self.shape(node)
        if self._repeat_heads(x, node, a_shape, b_shape) or self._split_heads(x, node, a_shape, b_shape, node) \
                or self._split_heads(node, x, b_shape, a_shape, node) or self._split_grid(x, node, a_shape, b_shape):
            return
        tail = 0  # axes equal from the right map one to one (the feature axis of a (B·S, d) view)
        while tail < min(len(a_shape), len(b_shape)) and a_shape[-1 - tail] == b_shape[-1 - tail] != 1:
            self.tie(self.dim(x, len(a_shape) - 1 - tail), self.dim(node, len(b_shape) - 1 - tail))
            tail += 1
        a_shape, b_shape = a_shape[: len(a_shape) - tail], b_shape[: len(b_shape) - tail]
        i = j = 0
        while i < len(a_shape) or j < len(b_shape):
            if i < len(a_shape) and a_shape[i] == 1:
                i += 1
            elif j < len(b_shape) and b_shape[j] == 1:
                j += 1
            elif i < len(a_shape) and j < len(b_shape) and a_shape[i] == b_shape[j]:
                self.tie(self.dim(x, i), self.dim(node, j))
                i, j = i + 1, j + 1
            else:
                i, j = self._freeze_block(x, node, a_shape, b_shape, i, j)

    def _split_heads(self, whole: Node, split: Node, a: tuple, b: tuple, at: Node) -> bool:
        """``(…, H·h, …) ↔ (…, H, h, …)``: the split axis and the head dim are one width group of
        ``H`` blocks (the rewrite keeps the block structure, so every head narrows alike); the
        head count stays. The axis is the last (``(B, S, H, h)``) or one before axes that pass
        as they are, or are merged or split and keep their sizes (attention on feature maps:
        ``(B, H·h, 7, 7) → (B, H, h, 49)``). The last axis is tried first."""
        return any(self._split_heads_at(whole, split, a, b, at, i, j)
                   for i in reversed(range(len(a))) for j in reversed(range(len(b) - 1)))

    def _split_heads_at(self, whole: Node, split: Node, a: tuple, b: tuple, at: Node, i: int, j: int) -> bool:
        """:meth:`_split_heads` of the whole's axis ``i`` into the split's axes ``j`` (heads), ``j + 1``."""
        lead_a, lead_b = ([k for k, size in enumerate(shape) if size != 1] for shape in (a[:i], b[:j]))
        suffix = 0  # the axes after it that pass as they are, from the right
        while suffix < min(len(a) - i - 1, len(b) - j - 2) and a[-1 - suffix] == b[-1 - suffix] != 1:
            suffix += 1
        rest_a, rest_b = a[i + 1:len(a) - suffix], b[j + 2:len(b) - suffix]  # merged or split between
        if not (_product(rest_a) == _product(rest_b) is not None
                and (i < len(a) - 1 or len(b) >= 3) and [a[k] for k in lead_a] == [b[k] for k in lead_b]
                and all(isinstance(v, int) for v in (a[i], b[j], b[j + 1])) and b[j] > 1 and b[j + 1] > 1
                and a[i] == b[j] * b[j + 1]):
            return False
        for k, m in (*zip(lead_a, lead_b), *((len(a) - 1 - t, len(b) - 1 - t) for t in range(suffix))):
            self.tie(self.dim(whole, k), self.dim(split, m))  # unit axes may go: GPTBigCode's (B, 1, S, H·h)
        reason = f"{at.name} reshapes {a} → {b}: merged or split dims keep their size"
        for key in (*(self.dim(whole, k) for k in range(i + 1, i + 1 + len(rest_a))),
                    *(self.dim(split, k) for k in range(j + 2, j + 2 + len(rest_b)))):
            self.freeze(key, reason)
        self.tie(self.dim(whole, i), self.dim(split, j + 1))
        self.cut_into_blocks(self.dim(whole, i), b[j], f"{at.name} splits it into {b[j]} heads")
        self.freeze(self.dim(split, j), f"{at.name} splits heads: the number of heads stays")
        self.head_axes.append((self.dim(whole, i), self.dim(split, j)))
        return True

    def _split_grid(self, x: Node, node: Node, a: tuple, b: tuple) -> bool:
        """``(…, A·B·h) → (…, A, B, h)``: a packed projection (query, key and value) viewed as a
        grid of parts and heads at once: ``(3, H, h)`` in Swin, ``(H, 3, h)`` head by head in
        BLOOM. Which axis holds the heads, the attention downstream says (see :func:`_resolve_grids`)."""
        if not (len(b) == len(a) + 2 >= 4 and a[:-1] == b[:-3] and all(isinstance(v, int) for v in (a[-1], *b[-3:]))
                and min(b[-3:]) > 1 and a[-1] == b[-3] * b[-2] * b[-1]):
            return False
        for axis in range(len(a) - 1):
            self.tie(self.dim(x, axis), self.dim(node, axis))
        self.grids.append((self.dim(x, -1), self.dim(node, -3), self.dim(node, -2), self.dim(node, -1), b[-3:], node.name))
        for axis in (-3, -2):
            self.freeze(self.dim(node, axis), f"{node.name} views packed parts and heads: their numbers stay")
        return True

    def _repeat_heads(self, x: Node, node: Node, a: tuple, b: tuple) -> bool:
        """``(…, G, R, …) → (…, G·R, …)`` where ``x`` expanded the ``R`` axis from size 1: each of
        ``G`` heads repeated ``R`` times in turn (``repeat_kv`` of grouped-query attention). The
        head counts stay; the axes after them are each ``G`` blocks that ``G·R`` blocks repeat."""
        source = self.shape(x.args[0]) if x.op == "call_function" and x.target == torch.ops.aten.expand.default else None
        if source is None or not len(source) == len(a) == len(b) + 1:
            return False
        for i in range(len(b)):
            g, r = a[i], a[i + 1]
            if a[:i] == b[:i] and a[i + 2:] == b[i + 1:] and source[i + 1] == 1 and isinstance(g, int) \
                    and isinstance(r, int) and r > 1 and g * r == b[i]:
                reason = f"{node.name} repeats each of {g} entries {r} times (grouped-query heads): their number stays"
                for key in (self.dim(x, i), self.dim(x, i + 1), self.dim(node, i)):
                    self.freeze(key, reason)
                for axis in range(i):
                    self.tie(self.dim(x, axis), self.dim(node, axis))
                for axis in range(i + 1, len(b)):
                    self.tie(self.dim(x, axis + 1), self.dim(node, axis))
                    self.repeat_blocks(self.dim(node, axis), g, g * r)
                return True
        return False

    def _freeze_block(self, x: Node, node: Node, a: tuple, b: tuple, i: int, j: int) -> tuple[int, int]:
        """Freeze the run of axes whose products match (a merge or a split); return where it ends."""
        reason = f"{node.name} reshapes {a} → {b}: merged or split dims keep their size"
        pa, pb, i0, j0 = 1, 1, i, j
        while True:
            if pa == pb and i > i0 and j > j0 or (i >= len(a) and j >= len(b)):
                break
            if (pa <= pb or j >= len(b)) and i < len(a):
                pa, i = _mul(pa, a[i]), i + 1
            elif j < len(b):
                pb, j = _mul(pb, b[j]), j + 1
            else:
                break
            if isinstance(pa, str) or isinstance(pb, str):  # symbolic sizes: freeze the rest
                i, j = len(a), len(b)
                break
        for k in range(i0, i):
            self.freeze(self.dim(x, k), reason)
        for k in range(j0, j):
            self.freeze(self.dim(node, k), reason)
        return i, j

    def concatenate(self, node: Node, axis: int, parts: list[Node]) -> None:
        sizes = [self.size(t, axis) for t in parts]
        if len(parts) != len(node.args[0]) or not all(isinstance(size, int) for size in sizes):
            reason = f"concatenated by {node.name} along an axis of unknown size"
            for key in (self.dim(node, axis), *(self.dim(t, axis) for t in parts)):
                self.freeze(key, reason)
            return
        self.segments.append((self.dim(node, axis), [(self.dim(t, axis), size, t.name) for t, size in zip(parts, sizes)],
                              node.name))

    def record_split(self, node: Node, x: Node, axis: int) -> None:
        self.splits[node.name] = (x, axis)

    def split_into_parts(self, node: Node, x: Node, axis: int) -> None:
        outputs = {u.args[1]: u for u in node.users if u.target is operator.getitem}
        values = node.meta.get("val")
        count = len(values) if isinstance(values, (list, tuple)) else -1
        sizes = [_size_key(v.shape[axis]) for v in values] if count > 0 else []
        if sorted(outputs) != list(range(count)) or not all(isinstance(size, int) for size in sizes):
            self.freeze(self.dim(x, axis), f"split by {node.name} into parts not all used or of unknown size")
            return
        parts = [outputs[i] for i in range(count)]
        self.segments.append((self.dim(x, axis), [(self.dim(t, axis), size, t.name) for t, size in zip(parts, sizes)],
                              node.name))
        for index, t in enumerate(parts):
            self.split_index[self.dim(t, axis)] = (node.name, index)

    def slice_part(self, node: Node, x: Node, axis: int, start: int, end: int) -> None:
        """``x[..., start:end]`` along ``axis`` cuts the axis in three: what lies before, the
        slice, what lies after (channel slices of DPN and ReXNet, a packed projection cut by
        slices). The rests are parts with no tensor of their own; another cut of the axis
        (a second slice, a split) ties them to its parts."""
        size = self.size(x, axis)
        parts = []
        for index, (key, length) in enumerate(((("slice:" + node.name + ":before", axis), start),
                                              (self.dim(node, axis), end - start),
                                              (("slice:" + node.name + ":after", axis), size - end))):
            if index != 1:
                self.rests[key] = length
            self.split_index[key] = (node.name, index)
            if length:
                parts.append((key, length, node.name if index == 1 else x.name))
        self.segments.append((self.dim(x, axis), parts, node.name))

    def take_split_output(self, node: Node) -> None:
        source = node.args[0]
        if not isinstance(source, Node) or source.name not in self.splits:
            freeze_untouched(self, node)
            return
        x, axis = self.splits[source.name]
        if "unbind" in str(source.target):  # the axis is gone: the rest shift down past it
            for a in range(self.ndim(node)):
                self.tie(self.dim(x, a if a < axis else a + 1), self.dim(node, a))
            return
        for a in range(self.ndim(node)):
            if a != axis:
                self.tie(self.dim(x, a), self.dim(node, a))
            elif self.dim(node, a) not in self.split_index:
                self.freeze(self.dim(node, a), f"split by {source.name}")


def _transposed_axis(node: Node, axis: int, ndim: int) -> int:
    """The input axis that a transpose or permutation puts at ``axis``."""
    if "permute" in str(node.target):
        return node.args[1][axis] % ndim
    if "numpy_T" in str(node.target):
        return ndim - 1 - axis
    a, b = ((node.args[1], node.args[2]) if len(node.args) > 2 else (0, 1))
    a, b = a % ndim, b % ndim
    return b if axis == a else a if axis == b else axis


def _unit_view_axis(before: tuple | None, after: tuple | None, axis: int) -> int | None:
    """The input axis a view maps to ``axis``, where the view only adds or drops unit axes."""
    if before is None or after is None or after[axis] == 1:
        return None
    kept_before = [i for i, size in enumerate(before) if size != 1]
    kept_after = [i for i, size in enumerate(after) if size != 1]
    if [before[i] for i in kept_before] != [after[i] for i in kept_after]:
        return None
    return kept_before[kept_after.index(axis)]


def _size_key(size: Any) -> int | str:
    return int(size) if isinstance(size, int) or str(size).lstrip("-").isdigit() else str(size)


def _product(sizes: tuple) -> int | None:
    """The product of known sizes; None if any is symbolic."""
    out = functools.reduce(_mul, sizes, 1)
    return out if isinstance(out, int) else None


def _mul(a: Any, b: Any) -> Any:
    return a * b if isinstance(a, int) and isinstance(b, int) else f"({a})*({b})"


def freeze_untouched(ctx: Context, node: Node) -> None:
    """The fallback for ops without a rule: freeze every dim of their tensor inputs and outputs."""
    reason = f"{node.name} ({_describe(ctx.gm, node)}) has no width rule"
    for arg in node.all_input_nodes:
        ctx.freeze_all(arg, reason)
    ctx.freeze_all(node, reason)


def _describe(gm: GraphModule, node: Node) -> str:
    if node.op == "call_module":
        return type(gm.get_submodule(node.target)).__name__
    return str(node.target)


def analyze_graph(gm: GraphModule) -> Plan:
    """The width groups of a captured graph (see :func:`fxcompress.capture.capture`). Pure."""
    ctx = Context(gm)
    order = {node.name: i for i, node in enumerate(gm.graph.nodes)}
    for node in gm.graph.nodes:
        _apply_rule(ctx, gm, node)
    return _collect(ctx, order)


def analyze(model: Any, example_args: Any = (), example_kwargs: dict | None = None) -> Plan:
    """Capture ``model`` and return its plan.

    Example:
        >>> plan = analyze(torchvision.models.resnet18(), (torch.randn(2, 3, 32, 32),))  # doctest: +SKIP
        >>> print(plan)                                                                    # doctest: +SKIP
    """
    return analyze_graph(capture(model, example_args, example_kwargs))


def _apply_rule(ctx: Context, gm: GraphModule, node: Node) -> None:
    if node.op == "placeholder":
        ctx.freeze_all(node, f"model input {node.name}")
    elif node.op == "output":
        for out in node.all_input_nodes:
            ctx.freeze_all(out, f"model output {out.name}")
    elif node.op == "call_function":
        rule = OP_RULES.get(node.target) or OP_RULES.get(str(node.target))
        (rule or freeze_untouched)(ctx, node)
    elif node.op == "call_module":
        rule = MODULE_RULES.get(type(gm.get_submodule(node.target)))
        (rule or freeze_untouched)(ctx, node)
    elif node.op == "call_method":
        freeze_untouched(ctx, node)


def _collect(ctx: Context, order: dict[str, int]) -> Plan:
    _freeze_unrecorded_parameters(ctx)
    _share_stacked_heads(ctx)
    _resolve_grids(ctx)
    _tie_cuts(ctx)
    members: dict[DimKey, list[DimKey]] = defaultdict(list)
    for key in list(ctx.parent):
        members[ctx.find(key)].append(key)
    containers = _distribute_segments(ctx, members)
    by_root: dict[DimKey, list[tuple[Use, str | None]]] = defaultdict(list)
    for key, use, activation in ctx.uses:
        by_root[ctx.find(key)].append((use, activation))
    blocks: dict[DimKey, dict[int, str]] = defaultdict(dict)
    for key, count, why in ctx.blocks:
        blocks[ctx.find(key)].setdefault(count, why)
    repeats: dict[DimKey, set[tuple[int, int]]] = defaultdict(set)
    for key, base, count in ctx.repeats:
        repeats[ctx.find(key)].add((base, count))
    wholes = {ctx.find(whole) for whole, _, _ in ctx.segments}
    # a concatenated part that no op tied to another axis is its own only member
    groups = [_group(ctx, root, uses, members[root] or [root], order, blocks.get(root, {}), repeats.get(root, set()),
                     containers.get(root, []))
              for root, uses in by_root.items() if root not in wholes and any(u.role != "channel" for u, _ in uses)]
    groups.sort(key=lambda g: g[0])
    return Plan(tuple(_unique_names([g for _, g in groups])))


def _share_stacked_heads(ctx: Context) -> None:
    """Heads whose axis is a stack's (SelectiveKernel: the paths' attention ``(B, P·C)`` viewed
    ``(B, P, C, 1, 1)`` against the paths stacked ``(B, P, C, H, W)``) hold the same channels,
    which the stack ties: each of those blocks repeats one block, as grouped-query heads do."""
    stacked = {ctx.find(key) for key in ctx.stacked}
    for whole, heads in ctx.head_axes:
        count = _key_size(ctx, heads)
        if ctx.find(heads) in stacked and count > 1:
            ctx.repeat_blocks(whole, 1, count)


def _freeze_unrecorded_parameters(ctx: Context) -> None:
    """A parameter axis that joined a group through ops no rule records as a use (a weight
    transformed before it is applied) would keep its size while the rest narrows: freeze."""
    recorded = {(f"param:{use.param}", use.axis) for _, use, _ in ctx.uses}
    for key in list(ctx.parent):
        if key[0].startswith("param:") and key not in recorded:
            ctx.freeze(key, f"parameter {key[0][len('param:'):]} reaches this dim (its axis {key[1]}) by a way "
                            "no width rule records")


def _resolve_grids(ctx: Context) -> None:
    """Each packed axis viewed as a grid (:meth:`Context._split_grid`) is a concatenation: of
    the parts, each all heads (the heads' axis second), or of the heads, each all parts (first)."""
    heads: dict[DimKey, set[DimKey]] = defaultdict(set)
    for key, axis in ctx.head_axes:
        heads[ctx.find(key)].add(ctx.find(axis))
    picked = {ctx.find(key) for key in ctx.picked}
    for whole, first, second, part, (rows, columns, size), node in ctx.grids:
        found = heads[ctx.find(part)]
        if ctx.find(second) in found:  # (parts, heads, h)
            ctx.segments.append((whole, [(part, columns * size, node)] * rows, node))
        elif ctx.find(first) in found:  # (heads, parts, h): the parts alternate head by head
            ctx.segments.append((whole, [(part, size, node)] * columns, node))
            ctx.cut_into_blocks(whole, rows, f"{node} splits it into {rows} heads")
        elif ctx.find(first) in picked and ctx.find(second) not in picked and rows <= 3:
            # query, key (and value) taken apart one by one, as attention written out does
            # (``q, k = qk[0], qk[1]``; no output merges the heads back): (parts, heads, h)
            ctx.segments.append((whole, [(part, columns * size, node)] * rows, node))
            ctx.cut_into_blocks(part, columns, f"{node} views it as {rows} parts of {columns} heads")
            ctx.block_widths[part] = size
        else:
            reason = f"{node} views it as a ({rows}, {columns}, {size}) grid, and no attention says which axis holds heads"
            ctx.freeze(whole, reason)
            ctx.freeze(part, reason)


def _tie_cuts(ctx: Context) -> None:
    """Every cut of one axis is one cut. A second concatenation or split of an axis cut the same
    way (SelectiveKernel splits a stream twice; GhostNet adds two concatenations) ties its parts
    to the first's, part by part. Cuts in different places (a packed projection taken apart by
    three slices, each of which leaves the rest whole) are refined into one: the axis is cut at
    every place any of them cuts it, and a part that spans several pieces is a concatenation of
    them. Ties can make more wholes one, so this runs to a fixed point."""
    changed = True
    while changed:
        changed = False
        by_root: dict[DimKey, list[tuple]] = defaultdict(list)
        for segment in ctx.segments:
            by_root[ctx.find(segment[0])].append(segment)
        for root, segments in by_root.items():
            if len({tuple(size for _, size, _ in parts) for _, parts, _ in segments}) > 1:
                changed |= _refine(ctx, root, segments)
                continue
            for _, parts, _ in segments[1:]:
                for (a, _, _), (b, _, _) in zip(segments[0][1], parts):
                    if ctx.find(a) != ctx.find(b):
                        ctx.tie(a, b)
                        changed = True


def _refine(ctx: Context, root: DimKey, segments: list[tuple]) -> bool:
    """Replace the cuts of one axis by the cut at all their places (see :func:`_tie_cuts`)."""
    spans = [_spans(parts) for _, parts, _ in segments]
    ends = {end for span in spans for _, end, _ in span}
    if len({span[-1][1] for span in spans}) > 1 or any(ctx.find(key) == root for _, parts, _ in segments
                                                        for key, _, _ in parts):
        reason = f"{' and '.join(node for _, _, node in segments)} cut one axis in ways that do not add up"
        for _, parts, _ in segments:
            for key, _, _ in parts:
                ctx.freeze(key, reason)
        ctx.segments = [s for s in ctx.segments if all(s is not t for t in segments[1:])]
        return False
    bounds = sorted({0} | ends)
    exact = {(start, end): (key, tensor) for span in spans for start, end, (key, tensor) in span}
    pieces = []
    for start, end in zip(bounds, bounds[1:]):  # a piece no cut has as a part of its own: a key of its own
        key, tensor = exact.get((start, end), ((f"piece:{segments[0][2]}:{start}", root[1]), None))
        if key[0].startswith("piece:"):
            ctx.rests[key] = end - start
        pieces.append((start, end, key, tensor))
    refined = [(segments[0][0], [(key, end - start, tensor) for start, end, key, tensor in pieces], segments[0][2])]
    for (_, _, node), span in zip(segments, spans):
        for start, end, (key, _) in span:
            inside = [(k, e - s, t) for s, e, k, t in pieces if start <= s and e <= end]
            if len(inside) == 1:
                ctx.tie(key, inside[0][0])
            else:  # the part is a concatenation of the pieces it spans
                refined.append((key, inside, node))
    ctx.segments = [s for s in ctx.segments if all(s is not t for t in segments)] + refined
    return True


def _spans(parts: list[tuple[DimKey, int, str]]) -> list[tuple[int, int, tuple[DimKey, str]]]:
    """Each part of a cut with where it starts and ends."""
    out, offset = [], 0
    for key, size, tensor in parts:
        out.append((offset, offset + size, (key, tensor)))
        offset += size
    return out


def _distribute_segments(ctx: Context, members: dict[DimKey, list[DimKey]]) -> dict[DimKey, list[tuple[str, int, int]]]:
    """Hand the parameters, effects and freezes of each concatenated (or split) axis to its
    parts, as slices.

    Such an axis is no group of its own: each part is narrowed by itself, and the consumers of
    a concatenation (the producers of a split) take it in the slice where it lies; nested
    concatenations are flattened. A whole cut into heads whose parts are cut head by head
    (a projection packed ``[q₀ k₀ v₀ q₁ k₁ v₁ …]``) gives each part one slice per head, each
    holding that block of the part's group. Returns, per part, the activations of the wholes
    it lies in, with its width there, once per time it lies there.
    """
    cuts: dict[DimKey, tuple[list[tuple[DimKey, int, str]], str]] = {}
    cut = {ctx.find(key): (count, why) for key, count, why in ctx.blocks}
    data = _data_dependent(ctx.gm)
    for whole, parts, node in ctx.segments:  # cuts of one axis are one (see _tie_cuts): the first stands for all,
        # the first of the model's data (not of a table computed from positions) where there is one: it is probed
        known = cuts.get(ctx.find(whole))
        if known is None or not _of_data(known[0], data) and _of_data(parts, data):
            cuts[ctx.find(whole)] = (parts, node)
    uses_of: dict[DimKey, list[Use]] = defaultdict(list)
    for key, use, _ in ctx.uses:
        uses_of[ctx.find(key)].append(use)
    containers: dict[DimKey, list[tuple[str, int, int]]] = defaultdict(list)
    for root, (_, node) in cuts.items():
        leaves = _leaves(ctx, root, cuts, ())
        if leaves is None:
            reason = f"{node} concatenates an axis with itself, or into parts that do not add up to it"
            for key in (root, *(key for key, _, _ in cuts[root][0])):
                ctx.freeze(key, reason)
            leaves = []
        for part, _, length, _ in leaves:  # a part once per head takes one transform in all: only a table's
            if part in ctx.repeated and not _shared(ctx, part, length, uses_of):
                ctx.freeze(part, f"{node} holds it once per head, and no table it reads says they narrow alike")
        keys = members[root] or [root]  # an axis that no op tied to another is its own only member
        activations = [k for k in keys if _is_activation(k) or k[0].startswith("slice:")]  # a slice's rest holds it too
        width = sum(length for _, _, length, _ in leaves)
        blocks, why = cut.get(root, (1, None))
        frozen = [r for k in keys for r in ctx.frozen.get(k, [])]
        extents = {use: _extent(ctx, use) for use in uses_of[root]}
        counts = {extent // width if width and extent % width == 0 else 0 for extent in extents.values()}
        sizes = [size for size in (_key_size(ctx, k) for k in keys) if size > 0]
        tiled = counts <= {blocks} and width * blocks == max(sizes, default=-1)
        within = width == min(sizes, default=-1)  # the cut is of one head (not of several heads at once)
        shared = {part for part, _, length, _ in leaves
                  if blocks > 1 and within and 0 not in counts and (not tiled or _shared(ctx, part, length, uses_of))}
        if blocks > 1 and not tiled and len(shared) < len({part for part, _, _, _ in leaves}):
            frozen = frozen or [f"{node}'s output is cut into blocks ({why}) that its parts do not tile"]
            blocks, shared = 1, set()
        for part, _, length, _ in leaves:
            if blocks > 1 and part not in shared:  # each part is as many blocks as the whole, one in each of its slices
                ctx.cut_into_blocks(part, blocks, f"{node} takes it from each of {blocks} heads ({why})")
                ctx.block_widths[part] = length
        effects = [e for k in keys for e in ctx.effects.get(k, [])]
        for part, offset, length, tensor in leaves:
            # probed at the part itself: where it enters a concatenation, or leaves a split
            copies = {use: extent // width if part in shared else blocks for use, extent in extents.items()}
            for block in range(max(copies.values(), default=0)):
                for use in (use for use in uses_of[root] if block < copies[use]):
                    sliced = dataclasses.replace(use, offset=use.offset + block * width + offset, length=length,
                                                 block=block if blocks > 1 and part not in shared else None)
                    ctx.uses.append((part, sliced, tensor if use.role != "channel" else None))
            ctx.effects[part].extend(effects)
            ctx.frozen[part].extend(f"lies in {node}'s output, which is frozen: {r}" for r in dict.fromkeys(frozen))
            containers[part].extend((name, axis, length) for name, axis in activations  # once per block it lies in
                                    for _ in range(max(_key_size(ctx, (name, axis)) // width, 1)))
    return containers


def _data_dependent(gm: GraphModule) -> set[str]:
    """The nodes whose values depend on the model's input values (not only on their sizes)."""
    data: set[str] = set()
    for node in gm.graph.nodes:
        if node.op == "placeholder" or node.op in ("call_function", "call_module") and node.target not in SIZE_READS \
                and any(n.name in data for n in node.all_input_nodes):
            data.add(node.name)
    return data


def _of_data(parts: list[tuple[DimKey, int, str]], data: set[str]) -> bool:
    return all(tensor in data for _, _, tensor in parts)


def _extent(ctx: Context, use: Use) -> int:
    """How much of its parameter's axis ``use`` covers (a BatchNorm's: its channels)."""
    if use.length is not None:
        return use.length
    value = operator.attrgetter(use.param)(ctx.gm)
    return int(value.shape[use.axis]) if isinstance(value, torch.Tensor) else int(value.num_features)


def _shared(ctx: Context, part: DimKey, length: int, uses_of: dict[DimKey, list[Use]]) -> bool:
    """Whether a part of a whole cut into heads must take one transform in every head: a
    parameter as wide as one head's part acts on every head alike (a rotary table's
    frequencies ``inv_freq``, broadcast over the heads). The whole's producers are then cut
    into as many heads as each holds, and every slice takes the part's one transform; so
    are they where the heads differ in number (query and key heads in grouped-query
    attention). A rotary embedding's two halves are such a part, tied to each other by
    ``rotate_half``'s concatenation: the frequency pairs ``(i, i + h/2)`` are kept or
    dropped together, in every head and every layer that reads the table."""
    return any(_extent(ctx, use) == length for use in uses_of[ctx.find(part)])


def _leaves(ctx: Context, root: DimKey, cuts: dict, seen: tuple) -> list[tuple[DimKey, int, int, str]] | None:
    """The innermost parts of a concatenated axis: offset, length and the tensor concatenated."""
    if root in seen:
        return None
    out, offset = [], 0
    for key, size, tensor in cuts[root][0]:
        part = ctx.find(key)
        if not size:  # an empty part (a rotary embedding's pass-through where it covers the head) holds nothing
            continue
        inner = _leaves(ctx, part, cuts, (*seen, root)) if part in cuts else [(part, 0, size, tensor)]
        width = sum(length for _, _, length, _ in inner or [])
        if inner is None or not width or size % width:
            return None
        if size > width:  # the part is its cut once per head (a packed projection's query, cut by a rotary table)
            ctx.repeated.update(leaf for leaf, _, _, _ in inner)
        out += [(leaf, offset + copy * width + start, length, name) for copy in range(size // width)
                for leaf, start, length, name in inner]
        offset += size
    return out


def _group(ctx: Context, root: DimKey, uses: list, keys: list[DimKey], order: dict[str, int],
           blocks: dict[int, str], repeats: set[tuple[int, int]], containers: list[DimKey]) -> tuple[int, WidthGroup]:
    effects = sorted({e for k in keys for e, _ in ctx.effects.get(k, [])})
    passthrough = tuple(sorted({n for k in keys for _, n in ctx.effects.get(k, [])}, key=lambda n: order.get(n, 0)))
    frozen = tuple(dict.fromkeys(r for k in keys for r in ctx.frozen.get(k, [])))
    key_sizes = {k: _key_size(ctx, k) for k in keys}
    size, count, mixed = _sizes(ctx, key_sizes, blocks, repeats)
    routed = _routing(ctx, uses)
    if routed is not None:  # one block per expert, each as wide as the activations
        count, routing = routed
        size *= count
    else:  # every expert reads or writes the group alike
        routing = None
        uses = [(dataclasses.replace(u, block_axis=None) if u.node in ctx.experts else u, a) for u, a in uses]
    uses = [(_with_repeat(ctx, u, size), a) for u, a in uses]
    odd = [str(u) for u, _ in uses
           if u.repeat < 1 or u.length not in (None, size * u.repeat if u.block is None and not routing else size // count)]
    if odd and not mixed:  # a slice (of a concatenation, a packed projection) is as wide as the group
        mixed = f"{', '.join(odd)} fit neither its width {size} nor its blocks"
    if mixed:
        frozen += (mixed,)
    by_role = {role: tuple(dict.fromkeys(u for u, _ in uses if u.role == role)) for role in ("producer", "consumer", "channel")}
    # the activation entering the first consumer; without consumers (attention's query and key),
    # the first producer's output; at the group's own width (not a repeated view of it)
    width = {name: s for (name, axis), s in key_sizes.items() if _is_activation((name, axis))}
    probes = [[a for u, a in uses if u.role == role and a is not None and width.get(a) == (size // count if routing else size)]
              for role in ("consumer", "producer")]
    probe = min(probes[0] or probes[1], key=order.__getitem__) if any(probes) else None
    first = min(order.get(u.node, 0) for u, _ in uses)
    activations = tuple(sorted((k for k in keys if _is_activation(k)), key=lambda k: (order.get(k[0], 0), k[1])))
    return first, WidthGroup(_name(by_role), size, by_role["producer"], by_role["consumer"], by_role["channel"],
                             passthrough, tuple(effects), probe, frozen, activations, count,
                             tuple(containers), tuple(ctx.split_index[k] for k in keys if k in ctx.split_index),
                             routing)


def _routing(ctx: Context, uses: list[tuple[Use, str | None]]) -> tuple[int, str] | None:
    """``(experts, offsets node)`` where every use is one mixture of experts' grouped products:
    a width that lies between them alone (an expert's hidden layer) narrows expert by expert."""
    found = {ctx.experts.get(u.node) if u.role != "channel" else None for u, _ in uses}
    return found.pop() if len(found) == 1 and None not in found else None


def _sizes(ctx: Context, key_sizes: dict[DimKey, int], blocks: dict[int, str],
           repeats: set[tuple[int, int]]) -> tuple[int, int, str | None]:
    """The group's width, its number of blocks, and why it is frozen if its sizes disagree.

    An axis cut into more blocks than the others is a repeated view of them only where an op
    said so (grouped-query attention: ``H`` query heads read ``G`` key/value heads, ``H/G``
    each): the group is then the ``G`` blocks.
    """
    sizes = {s for s in key_sizes.values() if s > 0}
    # a single key/value head (multi-query attention) is no cut, but its query heads repeat it
    counts = sorted(set(blocks) | {base for base, count in repeats if count in blocks}) or [1]
    unexplained = [blocks[c] for c in counts[1:] if (counts[0], c) not in repeats]
    if unexplained:
        return max(sizes, default=-1), 1, f"it is cut into blocks in different ways: {'; '.join(blocks.values())}"
    widths = {ctx.block_widths[k] for k in key_sizes if k in ctx.block_widths}
    if len(widths) == 1:  # parts taken head by head: their width is one block
        block = widths.pop()
    elif len(sizes) > 1:  # the narrowest axis is one block (a head's dim, a convolution group's channels)
        block = min(sizes)
    else:
        block = max(sizes, default=-1) // counts[0]
    if block > 0 and sizes <= {block, *(block * c for c in counts)}:
        return block * counts[0], counts[0], None
    return max(sizes, default=-1), 1, f"its axes have sizes {sorted(sizes)} that no cut into equal blocks explains"


def _with_repeat(ctx: Context, use: Use, size: int) -> Use:
    """``use`` with how often its axis repeats each of the group's blocks (grouped-query
    attention's query side); 0 where its width is no whole number of repeats."""
    value = operator.attrgetter(use.param)(ctx.gm)
    if use.block_axis is not None or use.block is not None or not isinstance(value, torch.Tensor):
        return use
    width = int(value.shape[use.axis]) if use.length is None else use.length  # a packed query's slice, too
    return use if width == size else dataclasses.replace(use, repeat=width // size if width % size == 0 else 0)


def _is_activation(key: DimKey) -> bool:
    """An axis of a graph node (not a parameter's, nor an unnamed rest or piece of a cut axis)."""
    return not key[0].startswith(("param:", "slice:", "piece:"))


def _key_size(ctx: Context, key: DimKey) -> int:
    name, axis = key
    if key in ctx.rests:
        return ctx.rests[key]
    if name.startswith("param:"):
        return int(operator.attrgetter(name[len("param:"):])(ctx.gm).shape[axis])
    size = ctx.size(ctx.nodes[name], axis)
    return size if isinstance(size, int) else -1


def _name(by_role: dict[str, tuple[Use, ...]]) -> str:
    if by_role["producer"]:
        return by_role["producer"][0].param.rsplit(".", 1)[0]
    return by_role["consumer"][0].param.rsplit(".", 1)[0] + ".in"


def _unique_names(groups: list[WidthGroup]) -> list[WidthGroup]:
    seen: dict[str, int] = {}
    out = []
    for g in groups:
        count = seen.get(g.name, 0)
        seen[g.name] = count + 1
        out.append(g if not count else dataclasses.replace(g, name=f"{g.name}#{count}"))
    return out
