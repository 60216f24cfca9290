"""One rule per op kind: how each op ties tensor dimensions together.

A rule receives the :class:`~fxcompress.analysis.propagate.Context` and the node, and
states, for the node's tensor axes: which are the same dimension (``ctx.tie``), what the
op does to them (``ctx.effect``), which parameter axes produce or consume them
(``ctx.use``), and which must never change size (``ctx.freeze``). Rules are registered by
ATen overload (or ``nn.Module`` type for the submodules capture creates); an op with no
rule freezes every dimension it touches. Supporting a new op is one entry here.
"""

from __future__ import annotations

import operator
from collections.abc import Callable

import torch
from torch import nn
from torch.fx import Node

aten = torch.ops.aten

Rule = Callable[..., None]
OP_RULES: dict[object, Rule] = {}
MODULE_RULES: dict[type, Rule] = {}


def op_rule(*targets: object) -> Callable[[Rule], Rule]:
    """Register a rule for ATen overloads (or other call_function targets; a custom op that
    may not be loaded by its qualified name, ``namespace.op.overload``)."""
    def wrap(fn: Rule) -> Rule:
        for target in targets:
            OP_RULES[target] = fn
        return fn
    return wrap


def module_rule(*types: type) -> Callable[[Rule], Rule]:
    def wrap(fn: Rule) -> Rule:
        for t in types:
            MODULE_RULES[t] = fn
        return fn
    return wrap


def arg(node: Node, name: str, default: object = None) -> object:
    """An argument of an ATen call by its schema name, whether passed positionally, by keyword or defaulted."""
    if name in node.kwargs:
        return node.kwargs[name]
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return default
    for i, argument in enumerate(schema.arguments):
        if argument.name == name:
            if i < len(node.args):
                return node.args[i]
            return argument.default_value if argument.has_default_value() else default
    return default


def _overloads(*names: str) -> list[object]:
    """ATen overloads by ``name`` or ``name.overload`` (missing ones are skipped)."""
    found = []
    for name in names:
        packet, _, overload = name.partition(".")
        op = getattr(aten, packet, None)
        if op is not None:
            found.append(getattr(op, overload or "default", None))
    return [f for f in found if f is not None]


# -- elementwise ------------------------------------------------------------------------
IDENTITY_LIKE = _overloads("clone", "contiguous", "alias", "detach", "_to_copy", "to.dtype", "to.device",
                           "to.dtype_layout", "type_as", "lift_fresh_copy", "dropout")
TRANSPOSES = _overloads("t", "transpose.int", "permute", "numpy_T")
UNIT_VIEWS = _overloads("view", "reshape", "_unsafe_view", "unsqueeze", "squeeze.dim", "squeeze.dims",
                        "squeeze")  # a view that only adds or drops unit axes keeps a parameter a parameter
LINEAR_UNARY = _overloads("neg", "mul.Scalar", "div.Scalar", "mul_.Scalar", "div_.Scalar")
CHANNELWISE_UNARY = _overloads(
    "relu", "relu_", "gelu", "gelu_", "silu", "silu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "hardtanh",
    "hardtanh_", "hardswish", "hardswish_", "hardsigmoid", "hardsigmoid_", "leaky_relu", "leaky_relu_", "elu",
    "elu_", "mish", "softplus", "abs", "sqrt", "rsqrt", "exp", "log", "pow.Tensor_Scalar", "erf", "clamp",
    "clamp_min", "clamp_max", "relu6", "add.Scalar", "sub.Scalar", "reciprocal", "sin", "cos", "sign", "isnan",
    "isinf", "logical_not", "bitwise_not", "gt.Scalar", "lt.Scalar", "ge.Scalar", "le.Scalar", "eq.Scalar", "ne.Scalar")


def elementwise(effect: str) -> Rule:
    """The rule of a one-input op that keeps every dim of its input, with ``effect`` on them."""
    def rule(ctx, node: Node) -> None:
        ctx.tie_all(node.args[0], node)
        ctx.effect_all(node, effect)
    return rule


op_rule(*IDENTITY_LIKE, *LINEAR_UNARY, *_overloads("zeros_like"))(elementwise("linear"))
op_rule(*CHANNELWISE_UNARY, *_overloads("ones_like", "full_like"))(elementwise("channelwise"))  # a constant per channel
module_rule(nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout,
            nn.Identity)(elementwise("linear"))  # identity in eval; a random diagonal in training


@op_rule(*_overloads("add.Tensor", "add_.Tensor", "sub.Tensor", "sub_.Tensor"))
def add(ctx, node: Node) -> None:
    """Residual adds and bias adds: linear; a parameter operand transforms like a producer."""
    ctx.broadcast(node, list(node.args[:2]), param_role="producer")
    ctx.effect_all(node, "linear")


@op_rule(*_overloads("mul.Tensor", "mul_.Tensor", "div.Tensor", "div_.Tensor", "maximum", "minimum", "gt.Tensor",
                     "lt.Tensor", "ge.Tensor", "le.Tensor", "eq.Tensor", "ne.Tensor", "logical_and", "logical_or",
                     "__and__.Tensor", "__or__.Tensor", "bitwise_and.Tensor", "bitwise_or.Tensor"))
def multiply(ctx, node: Node) -> None:
    """Gates, squeeze-excite and layer scales: per channel; a parameter operand is per-channel."""
    ctx.broadcast(node, list(node.args[:2]), param_role="channel")
    ctx.effect_all(node, "channelwise")


@op_rule(*_overloads("where.self", "where.ScalarOther", "where.ScalarSelf", "masked_fill.Scalar", "masked_fill.Tensor"))
def where(ctx, node: Node) -> None:
    """A choice element by element between tensors or scalars (masks): per channel."""
    ctx.broadcast(node, list(node.args[:3]), param_role="channel")
    ctx.effect_all(node, "channelwise")


# -- layers with weights ------------------------------------------------------------------
@op_rule(aten.linear.default)
def linear(ctx, node: Node) -> None:
    x, weight, bias = node.args[0], node.args[1], arg(node, "bias")
    ctx.tie_leading(x, node, ctx.ndim(node) - 1)
    ctx.consume(x, -1, weight, 1, node)
    ctx.produce(node, -1, weight, 0, bias)


@op_rule(*_overloads("addmm"))
def addmm(ctx, node: Node) -> None:
    """``bias + x @ W`` with a weight stored (in, out), as GPT-2's Conv1D."""
    bias, x, weight = node.args[:3]
    if not (isinstance(weight, Node) and weight.op == "get_attr"):
        ctx.freeze_all(node, f"{node.name}: addmm of two activations")
        return
    ctx.tie(ctx.dim(x, 0), ctx.dim(node, 0))
    ctx.consume(x, -1, weight, 0, node)
    ctx.produce(node, -1, weight, 1, bias if isinstance(bias, Node) and bias.op == "get_attr" else None)


@op_rule(*_overloads("conv1d", "conv2d", "conv3d", "convolution", "conv1d.padding", "conv2d.padding",
                     "conv3d.padding"))
def conv(ctx, node: Node) -> None:
    x, weight, bias = node.args[0], node.args[1], arg(node, "bias")
    groups = arg(node, "groups", 1)
    if arg(node, "transposed", False):
        ctx.freeze_all(node, "transposed convolution is not supported yet")
        return
    ctx.tie(ctx.dim(x, 0), ctx.dim(node, 0))
    freeze_spatial(ctx, node, x)
    channels_in, channels_out = ctx.size(x, 1), ctx.size(node, 1)
    if groups == 1:
        ctx.consume(x, 1, weight, 1, node)
        ctx.produce(node, 1, weight, 0, bias)
    elif groups == channels_in == channels_out:  # depthwise: per channel, in = out
        ctx.tie(ctx.dim(x, 1), ctx.dim(node, 1))
        ctx.channel(node, 1, weight, 0, node)
        if isinstance(bias, Node):
            ctx.record(ctx.dim(node, 1), bias, 0, "producer", node, None)
        ctx.effect(ctx.dim(node, 1), "channelwise", node)
    else:  # output group g reads input group g: both sides are ``groups`` blocks that narrow alike
        # (a side of one channel per group, a depthwise channel multiplier's input, has nothing to narrow)
        ctx.consume(x, 1, weight, 1, node, block_axis=0)  # the weight's axis 1 indexes within a group
        ctx.produce(node, 1, weight, 0, bias)
        why = f"{node.name} convolves them in {groups} groups"
        ctx.cut_into_blocks(ctx.dim(x, 1), groups, why)
        ctx.cut_into_blocks(ctx.dim(node, 1), groups, why)


def freeze_spatial(ctx, node: Node, x: Node) -> None:
    """The axes after the channels, which a window slides along (and may shrink), keep their
    sizes on both sides: they are no width, whatever is added or multiplied along them."""
    reason = f"{node.name} slides a window along this axis: its size stays"
    for axis in range(2, max(ctx.ndim(x), ctx.ndim(node))):
        ctx.freeze(ctx.dim(x, axis) if axis < ctx.ndim(x) else None, reason)
        ctx.freeze(ctx.dim(node, axis) if axis < ctx.ndim(node) else None, reason)


@op_rule(aten.embedding.default)
def embedding(ctx, node: Node) -> None:
    weight, indices = node.args[0], node.args[1]
    ctx.tie_leading(indices, node, ctx.ndim(indices))
    ctx.produce(node, -1, weight, 1, None)


@module_rule(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
def batch_norm(ctx, node: Node) -> None:
    ctx.tie_all(node.args[0], node)
    ctx.channel_module(node, 1)
    ctx.effect(ctx.dim(node, 1), "channelwise", node)


@op_rule(*_overloads("layer_norm", "rms_norm"))
def layer_norm(ctx, node: Node) -> None:
    x, shape = node.args[0], node.args[1]
    weight, bias = arg(node, "weight"), arg(node, "bias")
    ctx.tie_all(x, node)
    for axis in range(-len(shape), 0):
        ctx.effect(ctx.dim(node, axis), "normalizing", node)
    if len(shape) == 1:  # the scale acts per channel; the shift is added like a producer's bias
        if isinstance(weight, Node):
            ctx.channel(node, -1, weight, 0, node)
        if isinstance(bias, Node):
            ctx.record(ctx.dim(node, -1), bias, 0, "producer", node, None)
    else:
        ctx.freeze_all(node, f"{node.name} normalises over {len(shape)} dims")


@op_rule(*_overloads("group_norm"))
def group_norm(ctx, node: Node) -> None:
    """Channels normalised together in ``G`` groups (one group: a channel norm, as PoolFormer
    uses): ``G`` blocks that narrow alike; the scale acts per channel, the shift as a bias."""
    x, groups, weight, bias = node.args[0], node.args[1], arg(node, "weight"), arg(node, "bias")
    ctx.tie_all(x, node)
    ctx.effect(ctx.dim(node, 1), "normalizing", node)
    if groups > 1:
        ctx.cut_into_blocks(ctx.dim(node, 1), groups, f"{node.name} normalises them in {groups} groups")
    if isinstance(weight, Node):
        ctx.channel(node, 1, weight, 0, node)
    if isinstance(bias, Node):
        ctx.record(ctx.dim(node, 1), bias, 0, "producer", node, None)


# -- attention and matrix products ------------------------------------------------------------
@op_rule(aten.scaled_dot_product_attention.default)
def sdpa(ctx, node: Node) -> None:
    q, k, v = node.args[:3]
    lead = ctx.ndim(node) - 2
    for axis in range(lead):  # batch and heads, broadcast-aware
        ctx.broadcast_axis(node, [q, k, v], axis)
    ctx.tie(ctx.dim(q, -2), ctx.dim(node, -2))
    ctx.tie(ctx.dim(k, -2), ctx.dim(v, -2))
    ctx.tie(ctx.dim(q, -1), ctx.dim(k, -1))
    ctx.effect(ctx.dim(q, -1), "attention", node)
    ctx.tie(ctx.dim(v, -1), ctx.dim(node, -1))
    ctx.effect(ctx.dim(node, -1), "linear", node)
    _scores_mask(ctx, node, q, k, arg(node, "attn_mask"))
    if arg(node, "enable_gqa", False) and ctx.ndim(q) >= 3:  # query head i reads key/value head i // (H/G)
        query_heads, kv_heads = ctx.size(q, -3), ctx.size(k, -3)
        if isinstance(kv_heads, int) and query_heads != kv_heads:
            ctx.repeat_blocks(ctx.dim(q, -1), kv_heads, query_heads)
            ctx.repeat_blocks(ctx.dim(v, -1), kv_heads, query_heads)


def _scores_mask(ctx, node: Node, q: Node, k: Node, mask: object) -> None:
    """A mask (or bias) added to the scores ``(…, L, S)`` broadcasts against them: its head
    axis is the attention's (T5's relative position bias), its last two the query and key tokens."""
    if not isinstance(mask, Node) or ctx.shape(mask) is None:
        return
    scores = [ctx.dim(q, axis) for axis in range(ctx.ndim(q) - 1)] + [ctx.dim(k, -2)]
    sizes = [ctx.size(q, axis) for axis in range(ctx.ndim(q) - 1)] + [ctx.size(k, -2)]
    for back, size in enumerate(reversed(ctx.shape(mask)), start=1):
        if back <= len(scores) and size == sizes[-back] and size != 1:
            ctx.tie(ctx.dim(mask, -back), scores[-back])


@op_rule(*_overloads("matmul", "bmm"))
def matmul(ctx, node: Node) -> None:
    _matmul(ctx, node, *node.args[:2])


@op_rule(*_overloads("baddbmm"))
def baddbmm(ctx, node: Node) -> None:
    """``β·input + α·(batch1 @ batch2)`` (attention scores with a bias, ALiBi's)."""
    _matmul(ctx, node, *node.args[1:3])
    ctx.broadcast(node, [node.args[0]], param_role="producer")


def _matmul(ctx, node: Node, a: Node, b: Node) -> None:
    if ctx.ndim(a) < 2 or ctx.ndim(b) < 2:
        ctx.freeze_all(node, f"{node.name}: matmul with a vector operand")
        return
    if ctx.parameter(b) is not None and ctx.ndim(b) == 2:  # x @ W, a weight stored (in, out)
        ctx.tie_leading(a, node, ctx.ndim(node) - 1)
        ctx.consume(a, -1, b, 0, node)
        ctx.produce(node, -1, b, 1, None)
        return
    for axis in range(ctx.ndim(node) - 2):
        ctx.broadcast_axis(node, [a, b], axis)
    ctx.tie(ctx.dim(a, -2), ctx.dim(node, -2))
    ctx.tie(ctx.dim(b, -1), ctx.dim(node, -1))
    ctx.tie(ctx.dim(a, -1), ctx.dim(b, -2))
    ctx.effect(ctx.dim(a, -1), "channelwise", node)  # contracted between two activations
    ctx.effect(ctx.dim(node, -1), "linear", node)


@op_rule(*_overloads("einsum"))
def einsum(ctx, node: Node) -> None:
    """An axis is its letter: every axis of one letter is one dim (a letter of size 1 broadcasts).
    ``x`` times a 2-d parameter along ``x``'s last letter (``bsd,df->bsf``) is a linear layer;
    otherwise a letter summed over is normalised (one operand) or contracted (channelwise, as
    :func:`matmul` has it), a letter kept from one operand passes linearly, and one kept
    from several is a product entry by entry (channelwise)."""
    equation, operands = node.args[0].replace(" ", ""), list(node.args[1])
    inputs, _, output = equation.partition("->")
    subscripts = [_letters(term, ctx.ndim(t)) for term, t in zip(inputs.split(","), operands)]
    if not output and "->" not in equation or any(s is None or len(set(s)) != len(s) for s in subscripts):
        for t in (*operands, node):  # an implicit output or a diagonal (``ii->i``): no rule
            ctx.freeze_all(t, f"{node.name} (einsum {equation!r}) has no width rule")
        return
    out = _letters(output, ctx.ndim(node))
    if len(operands) == 2 and ctx.ndim(operands[1]) == 2 and ctx.parameter(operands[1]) is not None \
            and _as_linear(subscripts, out):
        x, weight = operands
        ctx.tie_leading(x, node, ctx.ndim(node) - 1)
        ctx.consume(x, -1, weight, subscripts[1].index(subscripts[0][-1]), node)
        ctx.produce(node, -1, weight, subscripts[1].index(out[-1]), None)
        return
    for letter in dict.fromkeys(l for s in (*subscripts, out) for l in s):
        axes = [(t, s.index(letter)) for t, s in zip([*operands, node], [*subscripts, out]) if letter in s]
        size = max((ctx.size(t, a) for t, a in axes), key=lambda v: v != 1)
        keys = [ctx.dim(t, a) for t, a in axes if ctx.size(t, a) == size and size != 1]
        for key in keys[1:]:
            ctx.tie(keys[0], key)
        readers = sum(letter in s for s in subscripts)
        effect = ("normalizing" if readers == 1 else "channelwise") if letter not in out else \
            ("linear" if readers == 1 else "channelwise")
        ctx.effect(keys[0] if keys else None, effect, node)


def _letters(term: str, ndim: int) -> list[str] | None:
    """The letters of one einsum term, ``...`` spelled out as one symbol per axis it stands for."""
    head, dots, tail = term.partition("...")
    if not dots:
        return list(term) if len(term) == ndim else None
    count = ndim - len(head) - len(tail)
    return None if count < 0 else [*head, *(f"...{i}" for i in range(count, 0, -1)), *tail]


def _as_linear(subscripts: list[list[str]], out: list[str]) -> bool:
    """``…i, io -> …o`` (or ``oi``): the activation's last letter contracted with the weight's."""
    x, w = subscripts
    return bool(out) and x[-1] in w and out[-1] in w and x[-1] != out[-1] and out[:-1] == x[:-1] \
        and x[-1] not in out


GROUPED_MM = {"aten._grouped_mm.default", "transformers.grouped_mm_fallback.default"}  # by name: one may not be loaded


@op_rule(*GROUPED_MM)
def grouped_mm(ctx, node: Node) -> None:
    """A mixture of experts' matrix product: the rows of ``x`` (tokens sorted by expert),
    cut at the offsets ``offs``, each times its expert's weight ``w[e]`` ``(in, out)``. The
    weight's axes 1 and 2 take part as a linear layer's would. Where a width lies between
    experts' products alone (an expert's hidden layer), each expert narrows it its own way:
    the uses carry the expert axis, and the plan makes it a group of one block per expert
    whose rows the offsets route (see ``Context.experts``); elsewhere (the stream every
    expert reads and writes) all experts take one transform."""
    x, weight, offs = node.args[0], node.args[1], arg(node, "offs")
    if ctx.ndim(x) != 2 or ctx.ndim(weight) != 3 or not isinstance(offs, Node):
        ctx.freeze_all(node, f"{node.name}: a grouped product of a shape other than (rows, in) × (experts, in, out)")
        return
    ctx.tie(ctx.dim(x, 0), ctx.dim(node, 0))
    ctx.consume(x, 1, weight, 1, node, block_axis=0)
    ctx.record(ctx.dim(node, 1), weight, 2, "producer", node, node, block_axis=0)
    ctx.experts[node.name] = (ctx.size(weight, 0), offs.name)


@op_rule(*_overloads("topk", "sort", "sort.stable"))
def topk(ctx, node: Node) -> None:
    """Picks or orders entries along one axis (a router's choice of experts): that axis keeps
    its size; the others pass to the values and the indices."""
    x = node.args[0]
    axis = arg(node, "dim", -1) % ctx.ndim(x)
    ctx.record_split(node, x, axis)
    ctx.freeze(ctx.dim(x, axis), f"{node.name} picks entries along this axis: its size stays")
    ctx.effect_all(x, "channelwise")


@op_rule(*_overloads("softmax.int", "_softmax", "log_softmax.int", "_log_softmax"))
def softmax(ctx, node: Node) -> None:
    """Normalises along its axis; along every other axis it acts entry by entry, nonlinearly:
    a permutation passes, a rotation does not (talking-heads attention mixes heads around it)."""
    ctx.tie_all(node.args[0], node)
    axis = arg(node, "dim") % ctx.ndim(node)
    for a, key in enumerate(ctx.dims(node)):
        ctx.effect(key, "normalizing" if a == axis else "channelwise", node)


# -- shape ops ----------------------------------------------------------------------------
@op_rule(*_overloads("permute"))
def permute(ctx, node: Node) -> None:
    for out_axis, in_axis in enumerate(node.args[1]):
        ctx.tie(ctx.dim(node.args[0], in_axis), ctx.dim(node, out_axis))


@op_rule(*_overloads("numpy_T"))
def reverse_axes(ctx, node: Node) -> None:
    """``x.T``: every axis reversed."""
    n = ctx.ndim(node)
    for axis in range(n):
        ctx.tie(ctx.dim(node.args[0], n - 1 - axis), ctx.dim(node, axis))


@op_rule(*_overloads("transpose.int", "t"))
def transpose(ctx, node: Node) -> None:
    n = ctx.ndim(node)
    a, b = arg(node, "dim0", 0), arg(node, "dim1", 1)
    order = list(range(n))
    order[a % n], order[b % n] = order[b % n], order[a % n]
    for out_axis, in_axis in enumerate(order):
        ctx.tie(ctx.dim(node.args[0], in_axis), ctx.dim(node, out_axis))


@op_rule(*_overloads("view", "reshape", "_unsafe_view", "flatten.using_ints", "unflatten.int",
                     "unsqueeze", "squeeze.dim", "squeeze.dims", "squeeze", "view_as", "reshape_as"))
def reshape(ctx, node: Node) -> None:
    ctx.match_reshape(node.args[0], node)


@op_rule(*_overloads("expand", "expand_as"))
def expand(ctx, node: Node) -> None:
    """The output is its input, repeated: an expanded parameter (a class token, ConViT's
    relative positions) is a value that enters the graph, transformed as a producer's output."""
    ctx.broadcast(node, [node.args[0]], param_role="producer")


@op_rule(*_overloads("select.int"))
def select(ctx, node: Node) -> None:
    x, axis = node.args[0], node.args[1] % ctx.ndim(node.args[0])
    kept = [a for a in range(ctx.ndim(x)) if a != axis]
    for out_axis, in_axis in enumerate(kept):
        ctx.tie(ctx.dim(x, in_axis), ctx.dim(node, out_axis))
    ctx.freeze(ctx.dim(x, axis), f"{node.name} selects one index of this dim")
    ctx.picked.append(ctx.dim(x, axis))


@op_rule(*_overloads("index.Tensor"))
def index(ctx, node: Node) -> None:
    """Advanced indexing (CLIP pools the token at each sequence's end): the axes after the last
    indexed one keep their place at the end; the indexed axes and those before them freeze."""
    x, indices = node.args[0], node.args[1]
    last = max((i for i, t in enumerate(indices) if t is not None), default=-1)
    trailing = ctx.ndim(x) - last - 1
    for k in range(1, trailing + 1):
        ctx.tie(ctx.dim(x, -k), ctx.dim(node, -k))
    reason = f"{node.name} indexes this dim or moves it"
    for axis in range(last + 1):
        ctx.freeze(ctx.dim(x, axis), reason)
    for axis in range(ctx.ndim(node) - trailing):
        ctx.freeze(ctx.dim(node, axis), reason)


@op_rule(*_overloads("slice.Tensor"))
def slice_(ctx, node: Node) -> None:
    """A contiguous part of one axis is a part of it, as a split's outputs are; the other axes pass."""
    x = node.args[0]
    axis = arg(node, "dim", 0) % ctx.ndim(x)
    for a in range(ctx.ndim(x)):
        if a != axis or ctx.same_size(x, a, node, a):
            ctx.tie(ctx.dim(x, a), ctx.dim(node, a))
    if ctx.same_size(x, axis, node, axis):
        return
    size, start, end, step = ctx.size(x, axis), arg(node, "start"), arg(node, "end"), arg(node, "step", 1)
    if isinstance(size, int) and isinstance(start, (int, type(None))) and isinstance(end, (int, type(None))) \
            and step == 1:
        start, end = _bounds(start, end, size)
        ctx.slice_part(node, x, axis, start, end)
        return
    ctx.freeze(ctx.dim(x, axis), f"{node.name} slices part of this dim")
    ctx.freeze(ctx.dim(node, axis), f"{node.name} slices part of this dim")


def _bounds(start: int | None, end: int | None, size: int) -> tuple[int, int]:
    """Python's slice bounds, clamped to the axis."""
    begin, stop, _ = slice(start, end).indices(size)
    return begin, max(begin, stop)


@op_rule(*_overloads("cat"))
def cat(ctx, node: Node) -> None:
    """The output's axis is the inputs' axes end to end: each input stays its own group, and
    the output's consumers read each one in a slice."""
    tensors = [t for t in node.args[0] if ctx.ndim(t) == ctx.ndim(node)]
    axis = arg(node, "dim", 0) % ctx.ndim(node)
    for t in tensors:
        for a in range(ctx.ndim(node)):
            if a != axis:
                ctx.tie(ctx.dim(t, a), ctx.dim(node, a))
    ctx.concatenate(node, axis, tensors)


@op_rule(*_overloads("split.Tensor", "split_with_sizes", "chunk", "unbind.int"))
def split(ctx, node: Node) -> None:
    """Splitting an axis into parts (a packed QKV projection): each part is its own group, the
    producers of the whole write each in a slice. ``unbind`` removes the axis: frozen."""
    x = node.args[0]
    axis = arg(node, "dim", 0) % ctx.ndim(x)
    ctx.record_split(node, x, axis)
    if "unbind" in str(node.target):
        ctx.freeze(ctx.dim(x, axis), f"unbound by {node.name}")
        ctx.picked.append(ctx.dim(x, axis))
    else:
        ctx.split_into_parts(node, x, axis)


@op_rule(operator.getitem)
def getitem(ctx, node: Node) -> None:
    ctx.take_split_output(node)


LINEAR_REDUCTIONS = _overloads("mean.dim", "sum.dim_IntList", "mean", "sum")


@op_rule(*LINEAR_REDUCTIONS, *_overloads("amax", "amin", "var.correction", "std.correction", "linalg_vector_norm",
                                         "norm.ScalarOpt_dim"))
def reduce(ctx, node: Node) -> None:
    x = node.args[0]
    axes = arg(node, "dim")
    axes = list(range(ctx.ndim(x))) if axes is None else axes
    axes = {a % ctx.ndim(x) for a in ([axes] if isinstance(axes, int) else axes)}
    keep = ctx.ndim(node) == ctx.ndim(x)
    linear = node.target in LINEAR_REDUCTIONS  # a sum or mean is linear in the axes it keeps; a max or a variance not
    out_axis = 0
    for a in range(ctx.ndim(x)):
        if a in axes:  # a normaliser (RMSNorm written out) or a pooling: it changes as the dim narrows
            ctx.effect(ctx.dim(x, a), "normalizing", node)
            out_axis += keep
        else:
            ctx.tie(ctx.dim(x, a), ctx.dim(node, out_axis))
            ctx.effect(ctx.dim(node, out_axis), "linear" if linear else "channelwise", node)
            out_axis += 1


@op_rule(*_overloads("addcmul"))
def addcmul(ctx, node: Node) -> None:
    """``input + value·t1·t2`` (timm's affine layers: ``addcmul(β, α, x)``): per channel; a
    parameter added is a bias, one multiplied a per-channel scale."""
    ctx.broadcast(node, [node.args[0]], param_role="producer")
    ctx.broadcast(node, list(node.args[1:3]), param_role="channel")
    ctx.effect_all(node, "channelwise")


@op_rule(*_overloads("stack"))
def stack(ctx, node: Node) -> None:
    """Tensors of one shape side by side along a new axis: their axes are one another's; the
    new axis (as many entries as tensors) stays."""
    axis = arg(node, "dim", 0) % ctx.ndim(node)
    for t in node.args[0]:
        for a in range(ctx.ndim(t)):
            ctx.tie(ctx.dim(t, a), ctx.dim(node, a if a < axis else a + 1))
    ctx.freeze(ctx.dim(node, axis), f"{node.name} stacks {len(node.args[0])} tensors along it")
    ctx.stacked.append(ctx.dim(node, axis))


@op_rule(*_overloads("repeat"))
def repeat(ctx, node: Node) -> None:
    """Tiling: the axes repeated once pass; a tiled axis is its input many times over, and stays."""
    x, times = node.args[0], list(node.args[1])
    lead = len(times) - ctx.ndim(x)
    for a in range(ctx.ndim(x)):
        if times[lead + a] == 1:
            ctx.tie(ctx.dim(x, a), ctx.dim(node, lead + a))
        else:
            ctx.freeze(ctx.dim(x, a), f"{node.name} tiles this axis")
            ctx.freeze(ctx.dim(node, lead + a), f"{node.name} tiles this axis")


@op_rule(*_overloads("repeat_interleave.self_int", "repeat_interleave.self_Tensor"))
def repeat_interleave(ctx, node: Node) -> None:
    """Each entry of one axis repeated in place (``[a a b b]``): that axis keeps its size (an
    interleaved layout no rule narrows), the others pass."""
    x, axis = node.args[0], arg(node, "dim")
    if axis is None:  # flattened first
        ctx.freeze_all(x, f"{node.name} repeats the flattened tensor")
        ctx.freeze_all(node, f"{node.name} repeats the flattened tensor")
        return
    axis %= ctx.ndim(x)
    for a in range(ctx.ndim(x)):
        if a == axis:
            ctx.freeze(ctx.dim(x, a), f"{node.name} repeats each entry of this axis in place")
            ctx.freeze(ctx.dim(node, a), f"{node.name} repeats each entry of this axis in place")
        else:
            ctx.tie(ctx.dim(x, a), ctx.dim(node, a))


@op_rule(*_overloads("upsample_nearest1d.vec", "upsample_nearest2d.vec", "upsample_nearest3d.vec",
                     "upsample_bilinear2d.vec", "upsample_linear1d.vec", "upsample_trilinear3d.vec",
                     "upsample_bicubic2d.vec", "_upsample_nearest_exact2d.vec", "upsample_nearest2d",
                     "upsample_bilinear2d"))
def upsample(ctx, node: Node) -> None:
    """Resizing a feature map interpolates pixels, channel by channel: linear in the channels."""
    x = node.args[0]
    ctx.tie(ctx.dim(x, 0), ctx.dim(node, 0))
    ctx.tie(ctx.dim(x, 1), ctx.dim(node, 1))
    freeze_spatial(ctx, node, x)
    ctx.effect(ctx.dim(node, 1), "linear", node)


@op_rule(*_overloads("max_pool1d", "max_pool2d", "max_pool3d", "max_pool2d_with_indices", "avg_pool1d",
                     "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d",
                     "adaptive_avg_pool3d", "adaptive_max_pool2d"))
def pool(ctx, node: Node) -> None:
    x = node.args[0]
    ctx.tie(ctx.dim(x, 0), ctx.dim(node, 0))
    ctx.tie(ctx.dim(x, 1), ctx.dim(node, 1))
    freeze_spatial(ctx, node, x)
    effect = "channelwise" if "max" in str(node.target) else "linear"
    ctx.effect(ctx.dim(node, 1), effect, node)


@op_rule(*_overloads("pad", "constant_pad_nd", "reflection_pad1d", "reflection_pad2d", "reflection_pad3d",
                     "replication_pad1d", "replication_pad2d", "replication_pad3d"))
def pad(ctx, node: Node) -> None:
    """``pad`` lists (before, after) pairs from the last axis backwards. A constant other than
    zero is a per-channel offset."""
    n = ctx.ndim(node)
    padded = {n - 1 - i // 2 for i, w in enumerate(node.args[1]) if w != 0}
    effect = "channelwise" if arg(node, "value") else "linear"  # only constant padding has a value
    _only_some_axes(ctx, node, padded, effect, "pads")


@op_rule(*_overloads("roll"))
def roll(ctx, node: Node) -> None:
    """A cyclic shift along some axes (Swin's shifted windows); with no axes, of the flattened tensor."""
    n = ctx.ndim(node)
    _only_some_axes(ctx, node, {d % n for d in arg(node, "dims", [])} or set(range(n)), "linear", "rolls")


def _only_some_axes(ctx, node: Node, changed: set[int], effect: str, verb: str) -> None:
    """An op that rearranges some axes of its input: those freeze; the others pass with ``effect``."""
    x = node.args[0]
    for axis in range(ctx.ndim(node)):
        if axis in changed:
            ctx.freeze(ctx.dim(x, axis), f"{node.name} {verb} this axis")
            ctx.freeze(ctx.dim(node, axis), f"{node.name} {verb} this axis")
        else:
            ctx.tie(ctx.dim(x, axis), ctx.dim(node, axis))
            ctx.effect(ctx.dim(node, axis), effect, node)


# -- ops that only read shapes or build index tensors -------------------------------------------
SIZE_READS = _overloads("sym_size.int", "sym_numel", "sym_stride.int", "size.int", "dim", "arange", "arange.start",
                        "arange.start_step", "zeros", "ones", "full", "empty.memory_format", "scalar_tensor",
                        "new_zeros", "new_ones", "new_full", "new_empty",  # a fresh tensor of given sizes
                        "_assert_scalar", "_assert_tensor_metadata")


@op_rule(*SIZE_READS)
def shape_query(ctx, node: Node) -> None:
    """Reads sizes or builds fresh tensors: couples nothing."""


# -- regions the graph does not show --------------------------------------------------------------
REGIONS = [getattr(torch.ops.higher_order, name) for name in ("wrap_with_set_grad_enabled", "wrap_with_autocast")
           if hasattr(torch.ops.higher_order, name)]


@op_rule(*REGIONS)
def region(ctx, node: Node) -> None:
    """A ``torch.no_grad()`` or ``autocast`` block, captured as a subgraph the width rules do not
    enter: whatever flows in or out keeps its size."""
    reason = f"{node.name} runs a torch.no_grad()/autocast block, whose ops the analysis does not enter"
    for arg_node in node.all_input_nodes:
        ctx.freeze_all(arg_node, reason)
    for user in node.users:
        ctx.freeze_all(user, reason)
