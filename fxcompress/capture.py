"""Capture: any user model → one ATen-level ``torch.fx.GraphModule`` with shapes on every node.

Every model goes through ``torch.export`` (non-strict), so torchvision and transformers
models — and ``symbolic_trace`` GraphModules — all arrive in one op vocabulary
(``aten.linear``, ``aten.conv2d``, ``aten.layer_norm``, ...), and the width analysis needs
one rule per op kind, not one per frontend. The capture then makes the graph a drop-in,
trainable module:

* the model is deep-copied first: exported parameters alias the user's tensors, and the
  user's model is never mutated, not even on failure (``share_weights`` copies the module
  structure only, for a caller that gives the result its own tensors: :func:`own_weights`);
* batch axes (and the sequence axes of integer inputs) are dynamic, so the module accepts
  other batch sizes, and the export's shape guards are dropped;
* ``nn.MultiheadAttention`` is computed with an explicit head axis (:mod:`fxcompress.attention`);
* dropout (every ``aten`` variant) and ``aten.batch_norm`` have the mode of capture time baked
  in; they become ``nn.Dropout*`` / ``nn.BatchNorm*d`` submodules that follow ``.train()``/``.eval()``;
* a non-tensor input (a float, a flag) is baked into the graph at its example value: the
  module checks it on every call and refuses another value with a clear error, rather than
  computing with the captured one;
* a buffer that ``forward`` writes (a call counter, running statistics) is never shared with
  the user's model, not even under ``share_weights``.

Example:
    >>> import torchvision
    >>> gm = capture(torchvision.models.resnet18(), (torch.randn(2, 3, 32, 32),))
    >>> gm(torch.randn(5, 3, 32, 32)).shape
    torch.Size([5, 1000])
"""

from __future__ import annotations

import contextlib
import copy
import operator
from collections.abc import Iterator, Mapping
from typing import Any
from unittest import mock

import torch
from torch import nn
from torch.fx import GraphModule, Node

from fxcompress.attention import make_headwise
from fxcompress.errors import CaptureError, ConfigError, DataError

aten = torch.ops.aten


def capture(model: Any, example_args: Any = (), example_kwargs: Mapping[str, Any] | None = None, *,
            share_weights: bool = False) -> GraphModule:
    """Capture ``model`` (``nn.Module``, ``GraphModule`` or ``ExportedProgram``) as an ATen graph.

    ``example_args``/``example_kwargs`` are one real input, as the model is called; an
    ``ExportedProgram`` needs none. The returned module is independent of ``model``, except
    with ``share_weights=True``: its parameters and buffers are then ``model``'s own tensors,
    which nothing in fxcompress writes to, and the caller must call ``own_weights(module,
    model)`` before handing the module to anything that may (an optimizer, ``.train()``
    BatchNorm). ``compress`` does so after its rewrite, which replaces every tensor it
    narrows, so a compressed model's weights are copied once, not twice.
    """
    args = example_args if isinstance(example_args, tuple) else (example_args,)
    kwargs = dict(example_kwargs or {})
    program = _export(model, args, kwargs, share_weights)
    gm = program.module()
    gm = GraphModule(gm, copy.deepcopy(gm.graph), class_name=f"Captured{type(model).__name__}")
    _drop_guards(gm)
    _guard_inputs(gm, args, kwargs, dynamic_shapes(args, kwargs) is not None)
    for name in written_attributes(gm):  # forward writes it: the user's tensor must not see that
        _set_path(gm, name, _copy_tensor(operator.attrgetter(name)(gm)))
    _restore_train_eval(gm)
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    _keep_tied_names(gm, model)
    gm.recompile()
    gm.eval()
    return gm


def output_names(gm: GraphModule) -> list[str]:
    """The name of each output leaf of a captured module, by its first key: a field of a
    ``ModelOutput`` (``logits``), a dict key, or an index."""
    spec = gm.graph._codegen.pytree_info.out_spec
    tree = torch.utils._pytree.tree_unflatten(list(range(spec.num_leaves)), spec)
    return [_first_key(path) for path, _ in torch.utils._pytree.tree_flatten_with_path(tree)[0]]


def _first_key(path: tuple) -> str:
    """The first entry of a pytree key path as a name: a mapping key, an attribute, an index."""
    if not path:
        return ""
    entry = path[0]
    return str(getattr(entry, "key", getattr(entry, "name", getattr(entry, "idx", ""))))


def keep_outputs(gm: GraphModule, names: tuple[str, ...]) -> GraphModule:
    """Make ``gm`` return None for every output not named in ``names`` (an encoder's hidden
    states returned beside the logits), in place: a width that only such an output pinned is
    then free to narrow. Unknown names are a :class:`~fxcompress.errors.ConfigError`."""
    known = output_names(gm)
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ConfigError(f"outputs {unknown} are not outputs of the model; it returns {known}")
    output = next(n for n in gm.graph.nodes if n.op == "output")
    leaves = list(output.args[0]) if isinstance(output.args[0], (tuple, list)) else [output.args[0]]
    output.args = (tuple(leaf if name in names else None for leaf, name in zip(leaves, known)),)
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm


def own_weights(module: nn.Module, source: Any) -> None:
    """Give ``module`` its own copy of every parameter and buffer that shares memory with
    ``source``'s (a module or an ``ExportedProgram``), views included; tied tensors stay tied."""
    shared = {t.untyped_storage().data_ptr() for t in _tensors(source) if t.numel()}
    copies: dict[int, torch.Tensor] = {}
    for sub in module.modules():
        for store in (sub._parameters, sub._buffers):
            for key, tensor in store.items():
                if tensor is not None and tensor.numel() and tensor.untyped_storage().data_ptr() in shared:
                    if id(tensor) not in copies:
                        copies[id(tensor)] = _copy_tensor(tensor)
                    store[key] = copies[id(tensor)]


def _keep_tied_names(gm: GraphModule, model: Any) -> None:
    """Export keeps one name of a tensor the model holds under several (an embedding tied to
    its language-model head): the others come back as names of that same tensor, so every
    state-dict key of the user's model is there, and the weights stay tied."""
    if not isinstance(model, nn.Module):
        return
    names: dict[int, list[str]] = {}
    for name, tensor in (*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)):
        names.setdefault(id(tensor), []).append(name)
    held = dict((*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)))
    for tied in names.values():
        present = [name for name in tied if name in held]
        for name in tied if len(tied) > 1 and present else ():
            if name not in held:
                _set_path(gm, name, held[present[0]])


def _set_path(gm: GraphModule, name: str, tensor: torch.Tensor) -> None:
    """Register ``tensor`` (a parameter or a buffer, as it is) under ``name``, making the modules
    on its path where there are none."""
    *path, leaf = name.split(".")
    owner: nn.Module = gm
    for atom in path:
        if not isinstance(getattr(owner, atom, None), nn.Module):
            owner.add_module(atom, nn.Module())
        owner = getattr(owner, atom)
    if isinstance(tensor, nn.Parameter):
        owner.register_parameter(leaf, tensor)
    else:  # a buffer replaced keeps whether it is saved
        owner.register_buffer(leaf, tensor, persistent=leaf not in owner._non_persistent_buffers_set)


def written_attributes(gm: GraphModule) -> list[str]:
    """The parameters and buffers that ``gm``'s graph writes to (in-place ops, ``copy_``)."""
    written = []
    for node in gm.graph.nodes:
        schema = getattr(node.target, "_schema", None) if node.op == "call_function" else None
        if schema is None or not schema.is_mutable:
            continue
        values = dict(zip((a.name for a in schema.arguments), node.args)) | node.kwargs
        for argument in schema.arguments:
            value = values.get(argument.name)
            if argument.alias_info is not None and argument.alias_info.is_write and isinstance(value, Node) \
                    and value.op == "get_attr" and value.target not in written:
                written.append(value.target)
    return written


@contextlib.contextmanager
def state_kept(gm: GraphModule) -> Iterator[None]:
    """Run ``gm`` inside without a trace: the tensors its graph writes get their values back."""
    saved = {name: operator.attrgetter(name)(gm).detach().clone() for name in written_attributes(gm)}
    try:
        yield
    finally:
        with torch.no_grad():
            for name, value in saved.items():
                operator.attrgetter(name)(gm).copy_(value)


@torch.fx.node.has_side_effect
def check_constant_input(value: Any, expected: Any, name: str) -> None:
    """Refuse a call whose non-tensor input ``name`` differs from the value the graph was captured with."""
    if value != expected or isinstance(value, (str, bool)) != isinstance(expected, (str, bool)):
        raise DataError(f"input {name!r} was {expected!r} when the model was captured, and that value is part of "
                        f"the graph; this call passes {value!r}. Capture (compress) with the value you need, or "
                        "pass it as a tensor")


@torch.fx.node.has_side_effect
def check_axis_size(value: torch.Tensor, axis: int, expected: int, name: str) -> None:
    """Refuse a call whose input ``name`` has another size on an axis that export fixed."""
    if value.shape[axis] != expected:
        raise DataError(f"axis {axis} of input {name!r} was fixed to {expected} when the model was captured (its code "
                        f"made torch.export treat that size as a constant); this call passes {value.shape[axis]}. "
                        f"Call it with {expected}, or capture (compress) with the size you need")


def _guard_inputs(gm: GraphModule, args: tuple, kwargs: dict, dynamic: bool) -> None:
    """Guard what export baked into the graph: every non-tensor input's value, and every axis
    capture asked to keep free (``dynamic``) that export fixed all the same (the model's code
    turned its size into a number). Other values or sizes would compute something else."""
    leaves = torch.utils._pytree.tree_leaves((args, kwargs))
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if not placeholders or len(leaves) != len(placeholders):
        return
    last = placeholders[-1]
    for node, value in zip(placeholders, leaves):
        for guard in _guards(node, value, dynamic):
            with gm.graph.inserting_after(last):
                last = gm.graph.call_function(*guard)


def _guards(node: Node, value: Any, dynamic: bool) -> list[tuple[Any, tuple]]:
    """The checks one input needs: ``(function, args)`` for each."""
    if not isinstance(value, torch.Tensor):
        if not isinstance(value, (bool, int, float, str, type(None))):
            raise CaptureError(f"input {node.name!r} is a {type(value).__name__}; fxcompress captures tensors and "
                               "plain values (numbers, flags, strings): pass it as one of those")
        return [(check_constant_input, (node, value, node.name))]
    shape = getattr(node.meta.get("val"), "shape", None)
    if not dynamic or shape is None:
        return []
    return [(check_axis_size, (node, axis, int(str(shape[axis])), node.name)) for axis in _dynamic_axes(value)
            if str(shape[axis]).isdigit()]  # a number, not a symbol (a SymInt export replaced by one)


def _copy_tensor(tensor: torch.Tensor) -> torch.Tensor:
    if isinstance(tensor, nn.Parameter):
        return nn.Parameter(tensor.detach().clone(), requires_grad=tensor.requires_grad)
    return tensor.detach().clone()


def _tensors(source: Any) -> Iterator[torch.Tensor]:
    """The parameters and buffers of a module, or the state and constants of a program."""
    if isinstance(source, torch.export.ExportedProgram):
        yield from source.state_dict.values()
        yield from (c for c in source.constants.values() if isinstance(c, torch.Tensor))
    elif isinstance(source, nn.Module):
        yield from source.parameters()
        yield from source.buffers()


def copy_module(model: Any, share_weights: bool) -> Any:
    """A deep copy of ``model``; with ``share_weights``, of its structure only (its tensors are shared)."""
    return copy.deepcopy(model, {id(t): t for t in _tensors(model)} if share_weights else None)


def _export(model: Any, args: tuple, kwargs: dict, share_weights: bool) -> torch.export.ExportedProgram:
    if isinstance(model, torch.export.ExportedProgram):
        return copy_module(model, share_weights)
    if not isinstance(model, nn.Module):
        raise CaptureError(f"expected an nn.Module, a torch.fx.GraphModule or a torch.export.ExportedProgram, "
                           f"got {type(model).__name__}")
    if not args and not kwargs:
        raise CaptureError("capturing a module needs example inputs: pass one batch as the model is called")
    work = copy_module(model, share_weights).eval()
    make_headwise(work)  # nn.MultiheadAttention with an explicit head axis the analysis can follow
    for module in work.modules():  # encoder-decoder models keep a config per stack
        if getattr(getattr(module, "config", None), "use_cache", False):
            module.config.use_cache = False  # a KV cache object is not a tensor output; compression needs none
    dynamic = dynamic_shapes(args, kwargs)
    try:
        with _tracing(oblivious=dynamic is not None and _has_unit_axis(args, kwargs)):
            return torch.export.export(work, args, kwargs, dynamic_shapes=dynamic, strict=False)
    except Exception as exc:  # torch raises many types; all mean "could not capture"
        raise CaptureError(
            f"torch.export could not capture {type(model).__name__}: {type(exc).__name__}: {_first_line(exc)}\n"
            "Check that the example inputs are valid for the model; data-dependent Python control flow "
            "must become torch.cond or be moved out of forward()."
        ) from exc


@contextlib.contextmanager
def _tracing(oblivious: bool) -> Iterator[None]:
    """Export's settings: no Python stack trace on every node (nothing here reads them, and
    they cost a fifth of the export); with ``oblivious``, sizes 0 and 1 are not specialised."""
    with mock.patch.object(torch.fx.config, "do_not_emit_stack_traces", True), \
            torch.fx.experimental._config.patch(backed_size_oblivious=oblivious):
        yield


def dynamic_shapes(args: tuple, kwargs: dict) -> tuple[Any, dict[str, Any]] | None:
    """Batch axes dynamic; for integer inputs (token ids, masks) the sequence axis too."""
    def spec(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return {axis: torch.export.Dim.AUTO for axis in _dynamic_axes(value)} or None
        if isinstance(value, (list, tuple)):
            return type(value)(spec(v) for v in value)
        if isinstance(value, dict):
            return {k: spec(v) for k, v in value.items()}
        return None

    if not args:
        return {k: spec(v) for k, v in kwargs.items()}
    if not kwargs:
        return tuple(spec(a) for a in args)
    return None  # mixed positional and keyword inputs: let export keep static shapes


def _dynamic_axes(value: torch.Tensor) -> tuple[int, ...]:
    if value.ndim == 0:
        return ()
    return (0, 1) if not value.is_floating_point() and value.ndim >= 2 else (0,)


def _has_unit_axis(args: tuple, kwargs: dict) -> bool:
    """Whether a dynamic axis of the example has size 0 or 1. Export would specialise it (a
    batch of one baked into every reshape), unless it reasons about sizes obliviously."""
    leaves = torch.utils._pytree.tree_leaves((args, kwargs))
    return any(t.shape[axis] <= 1 for t in leaves if isinstance(t, torch.Tensor) for axis in _dynamic_axes(t))


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else ""


def _drop_guards(gm: GraphModule) -> None:
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            gm.graph.erase_node(node)
        elif node.op == "call_function" and node.target in (aten._assert_tensor_metadata.default,
                                                            torch._assert, aten._assert_scalar.default):
            gm.graph.erase_node(node)


def _restore_train_eval(gm: GraphModule) -> None:
    """Turn mode-baked dropout / batch-norm calls into submodules that follow ``.train()``."""
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in DROPOUTS:
            module = DROPOUTS[node.target](float(node.args[1]), node.args[0].meta["val"].ndim)
            _swap_for_module(gm, node, module, (node.args[0],))
        elif node.target == aten.batch_norm.default and _stateful(node):
            owner = _common_owner(node.args[1:5])
            _swap_for_module(gm, node, _batch_norm_module(gm, node), (node.args[0],), owner)


def _feature_dropout(p: float, ndim: int) -> nn.Module:
    """Whole channels dropped: ``(N, C)`` has one value per channel, so it is plain dropout."""
    return {3: nn.Dropout1d, 4: nn.Dropout2d, 5: nn.Dropout3d}.get(ndim, nn.Dropout)(p)


#: Dropout ops (in place or not: the module computes the same values) → their module, by (p, input ndim).
DROPOUTS = {
    aten.dropout.default: lambda p, ndim: nn.Dropout(p),
    aten.dropout_.default: lambda p, ndim: nn.Dropout(p),
    aten.feature_dropout.default: _feature_dropout,
    aten.feature_dropout_.default: _feature_dropout,
    aten.alpha_dropout.default: lambda p, ndim: nn.AlphaDropout(p),
    aten.alpha_dropout_.default: lambda p, ndim: nn.AlphaDropout(p),
    aten.feature_alpha_dropout.default: lambda p, ndim: nn.FeatureAlphaDropout(p),
    aten.feature_alpha_dropout_.default: lambda p, ndim: nn.FeatureAlphaDropout(p),
}


def _stateful(node: Node) -> bool:
    """A batch norm with running statistics (buffers), whose mode matters, and whose weight and
    bias are parameters or absent, as ``nn.BatchNorm`` holds them. One without statistics uses
    the batch's in either mode (weight standardisation, ``track_running_stats=False``): it stays."""
    weight, bias, mean, var = node.args[1:5]
    held = lambda p: isinstance(p, Node) and p.op == "get_attr"  # noqa: E731
    return held(mean) and held(var) and all(p is None or held(p) for p in (weight, bias))


def _common_owner(params: tuple) -> str | None:
    """The module path holding all of ``params`` (e.g. ``layer1.0.bn1``), if they share one."""
    owners = {p.target.rpartition(".")[0] for p in params if isinstance(p, Node) and p.op == "get_attr"}
    return owners.pop() if len(owners) == 1 else None


def _swap_for_module(gm: GraphModule, node: Node, module: nn.Module, args: tuple, path: str | None = None) -> None:
    """Replace ``node`` by a call of ``module``, installed at ``path`` (the original
    module's, so state-dict keys stay those of the user's model) or under a fresh name."""
    if path and not any(n.op == "get_attr" and n.target.startswith(path + ".") and n.users and n not in node.args
                        for n in gm.graph.nodes):
        _carry_buffers(gm.get_submodule(path), module)
        name = path
        gm.delete_submodule(path)
    else:
        name = _fresh_name(gm, node.name)
    gm.add_submodule(name, module)
    with gm.graph.inserting_before(node):
        new = gm.graph.call_module(name, args)
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)


def _batch_norm_module(gm: GraphModule, node: Node) -> nn.Module:
    x, weight, bias, mean, var = node.args[:5]
    momentum, eps = float(node.args[6]), float(node.args[7])
    channels = node.args[0].meta["val"].shape[1]
    dims = node.args[0].meta["val"].ndim
    cls = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[dims]
    dtype = next((_fetch(gm, p).dtype for p in (weight, mean) if isinstance(p, Node)), None)
    bn = cls(channels, eps=eps, momentum=momentum, affine=weight is not None, track_running_stats=mean is not None,
             dtype=dtype)
    with torch.no_grad():
        for attr, source in (("weight", weight), ("bias", bias), ("running_mean", mean), ("running_var", var)):
            if isinstance(source, Node):
                getattr(bn, attr).copy_(_fetch(gm, source))
    return bn


def _carry_buffers(old: nn.Module, new: nn.Module) -> None:
    """Keep state the graph did not use (BatchNorm's ``num_batches_tracked``)."""
    for name, buffer in old.named_buffers(recurse=False):
        if name in dict(new.named_buffers(recurse=False)) and name not in ("running_mean", "running_var"):
            getattr(new, name).copy_(buffer)


def _fetch(gm: GraphModule, node: Node) -> torch.Tensor:
    if node.op != "get_attr":
        raise CaptureError(f"batch_norm at {node.format_node()} takes a computed tensor; expected a parameter")
    return operator.attrgetter(node.target)(gm)


def _fresh_name(gm: GraphModule, base: str) -> str:
    name, i = base, 0
    while hasattr(gm, name):
        i += 1
        name = f"{base}_{i}"
    return name
