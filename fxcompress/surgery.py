"""The narrowed widths on the user's own class: a copy of their ``nn.Module`` that computes what
the compressed ``GraphModule`` computes, and keeps every method the class has (``generate``
with its KV cache, ``save_pretrained``, the user's own helpers).

A compressed graph names its tensors as the model does (``layer1.0.conv1.weight``), so the
copy takes each narrowed tensor under its own name, and a bias the mean fold added where a
layer had none becomes that layer's ``bias``. Module attributes that name a width are kept in
step, one rule per module kind (:data:`RULES`): ``in_features``, ``out_channels``,
``num_features``, ``normalized_shape``, ``embedding_dim``, an attention module's
``head_dim``. A ``forward`` that computes a width some other way cannot be rewritten from
outside; the copy is therefore run on an example batch beside the graph before it is returned,
and a mismatch is an error that names the module.

Example:
    >>> result = compress(model, calib_loader, CompressConfig(rule="fixed", ratio=0.5))   # doctest: +SKIP
    >>> narrowed = result.to_module()   # the model's own class, narrower                  # doctest: +SKIP
    >>> narrowed.generate(input_ids, max_new_tokens=8)                                     # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule

from fxcompress.atomic import staged_dir
from fxcompress.capture import state_kept
from fxcompress.errors import SurgeryError
from fxcompress.rewrite import KEPT_WIDTH

TOLERANCE = 1e-5  # largest output change, relative to the largest output, between the copy and the graph


def narrowed_copy(model: nn.Module, compressed: GraphModule, example: tuple[tuple, dict],
                  tolerance: float = TOLERANCE) -> nn.Module:
    """A deep copy of ``model`` with ``compressed``'s tensors, checked on ``example`` (args, kwargs)."""
    if not isinstance(model, nn.Module) or isinstance(model, GraphModule):
        raise SurgeryError(f"to_module needs the original nn.Module (its class is what the copy keeps), got "
                           f"{type(model).__name__}; a GraphModule or program has no class of its own: use result.module")
    new = copy.deepcopy(model)
    before = {name: tuple(t.shape) for name, t in named_tensors(new)}
    changed = _install(new, compressed)
    for name in sorted({name.rpartition(".")[0] for name in changed}):
        module = new.get_submodule(name)
        rule = _rule(module)
        if rule is not None:
            rule(module)
    _sync_attention(new, before)
    _keep_mean_widths(new, compressed)
    _check(model, new, compressed, example, tolerance, before)
    return new


def save_pretrained(model: nn.Module, compressed: GraphModule, example: tuple[tuple, dict],
                    path: str | os.PathLike) -> Path:
    """Write the narrowed copy of ``model`` (a transformers model) as a folder stock
    ``from_pretrained`` loads: its config takes the widths the narrowed tensors have, if a
    config can say them. The folder is loaded back and checked against the graph before it
    is moved in."""
    import transformers

    if not isinstance(model, transformers.PreTrainedModel):
        raise SurgeryError(f"save_pretrained is for transformers models, not {type(model).__name__}: "
                           "use result.save(dir), which fxcompress.load reads")
    narrowed = narrowed_copy(model, compressed, example)
    config = narrowed_config(model, narrowed)
    target = Path(path)
    with staged_dir(target) as stage:
        narrowed.config = config  # narrowed is this call's own copy
        narrowed.save_pretrained(stage)
        reloaded = type(narrowed).from_pretrained(stage).eval()
        _check(model, reloaded, compressed, example, TOLERANCE, {})
    return target


WIDTH_NAME = re.compile(r"inner|intermediate|ffn|head_dim|hidden|embd|d_model")


def narrowed_config(model: nn.Module, narrowed: nn.Module) -> Any:
    """``model.config`` with the widths of ``narrowed``: of the config's integers whose value is
    an old width that narrowed (and its unset widths, such as GPT-2's ``n_inner``), the choice
    of old or new values under which the class builds tensors of exactly ``narrowed``'s shapes
    (tried on the meta device)."""
    old, new = model.state_dict(), narrowed.state_dict()
    seen: dict[int, set[int]] = {}
    for name, tensor in new.items():
        for a, b in zip(old[name].shape if name in old else (), tensor.shape):
            if a != b:
                seen.setdefault(a, set()).add(b)
    values = model.config.to_dict()
    floats = _changed_floats(model, narrowed)  # a norm's eps, where the graph keeps its mean's width
    floats = {attr: next(iter(floats[v])) for attr, v in values.items() if type(v) is float and len(floats.get(v, ())) == 1}
    options = {attr: [value, *sorted(seen[value])] for attr, value in values.items() if type(value) is int and value in seen}
    for attr, value in values.items():  # a width the config leaves to a default (GPT-2's n_inner: 4 · n_embd)
        if value is None and WIDTH_NAME.search(attr):
            options[attr] = [None, *sorted(set().union(*seen.values()))]
    shapes = {name: tuple(t.shape) for name, t in new.items()}
    combos = list(itertools.product(*options.values()))
    if len(combos) > 256:
        raise SurgeryError(f"too many config widths to try ({len(combos)} choices of {list(options)})")
    closest = None
    for combo in combos:
        config = copy.deepcopy(model.config)
        try:
            for attr, value in [*floats.items(), *zip(options, combo)]:
                setattr(config, attr, value)
            with torch.device("meta"):
                fresh = type(narrowed)(config)
        except Exception:  # the config's or the class's own checks (a width not divisible by the heads)
            continue
        built = {name: tuple(t.shape) for name, t in fresh.state_dict().items()}
        differ = sorted(set(built) ^ set(shapes)) + [n for n in built if n in shapes and built[n] != shapes[n]]
        if not differ:
            return config
        closest = min(closest or differ, differ, key=len)
    raise SurgeryError(f"no {type(model.config).__name__} says these widths (the nearest differs at "
                       f"{(closest or ['every choice'])[:4]}): "
                       "a family whose config has one width per kind qualifies when every layer of a kind narrows "
                       "alike (CompressConfig(uniform=True)) and no bias was added where the config has none "
                       "(CompressConfig(fold_mean=False)); result.save(dir) saves any model")


def _changed_floats(model: nn.Module, narrowed: nn.Module) -> dict[float, set[float]]:
    """Each norm ``eps`` of ``model`` that changed in ``narrowed``: old value → new values."""
    out: dict[float, set[float]] = {}
    for name, module in narrowed.named_modules():
        old = model.get_submodule(name)
        for attr in EPS:
            if type(getattr(module, attr, None)) is float and getattr(old, attr) != getattr(module, attr):
                out.setdefault(getattr(old, attr), set()).add(getattr(module, attr))
    return out


# -- tensors ------------------------------------------------------------------------------------
def named_tensors(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Every parameter and buffer under every name it has (a tied tensor once per name)."""
    yield from module.named_parameters(remove_duplicate=False)
    yield from module.named_buffers(remove_duplicate=False)


def _install(new: nn.Module, compressed: GraphModule) -> list[str]:
    """Put each of ``compressed``'s tensors under its name in ``new``; the names that changed.
    Tensors one object in the graph (a tied embedding and head) are one object in the copy."""
    copies: dict[int, torch.Tensor] = {}
    changed, homeless = [], []
    for name, tensor in named_tensors(compressed):
        owner_name, _, attr = name.rpartition(".")
        owner = _submodule(new, owner_name)
        if owner is None or attr not in owner._parameters and attr not in owner._buffers:
            if isinstance(tensor, nn.Parameter):  # a buffer only the graph has is a lifted constant
                homeless.append(name)
            continue
        old = getattr(owner, attr)
        if old is not None and old.shape == tensor.shape and torch.equal(old, tensor.detach()):
            continue
        if id(tensor) not in copies:
            value = tensor.detach().clone()
            copies[id(tensor)] = nn.Parameter(value, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else value
        _put(owner, attr, copies[id(tensor)])
        changed.append(name)
    if homeless:
        raise SurgeryError(f"the compressed graph has parameters {homeless[:4]} that {type(new).__name__} has no place "
                           "for (a bias added after an op its code computes itself); use result.module, or "
                           "CompressConfig(fold_mean=False)")
    return changed


def _submodule(root: nn.Module, name: str) -> nn.Module | None:
    try:
        return root.get_submodule(name) if name else root
    except AttributeError:
        return None


def _put(owner: nn.Module, attr: str, value: torch.Tensor) -> None:
    if attr in owner._parameters:
        owner._parameters[attr] = value if isinstance(value, nn.Parameter) else nn.Parameter(value)
    else:
        owner._buffers[attr] = value


# -- attributes that name a width, one rule per module kind -------------------------------------
def _linear(m: nn.Linear) -> None:
    m.out_features, m.in_features = m.weight.shape


def _conv(m: nn.modules.conv._ConvNd) -> None:
    depthwise = m.groups > 1 and m.groups == m.in_channels == m.out_channels
    m.out_channels = m.weight.shape[0] if not m.transposed else m.weight.shape[1] * m.groups
    if depthwise:
        m.groups = m.out_channels
    m.in_channels = m.weight.shape[0] if m.transposed else m.weight.shape[1] * m.groups


def _batch_norm(m: nn.modules.batchnorm._NormBase) -> None:
    m.num_features = (m.weight if m.weight is not None else m.running_mean).shape[0]


def _layer_norm(m: nn.LayerNorm) -> None:
    if m.weight is not None:
        m.normalized_shape = tuple(m.weight.shape)


def _group_norm(m: nn.GroupNorm) -> None:
    if m.weight is not None:
        m.num_channels = m.weight.shape[0]


def _embedding(m: nn.Embedding) -> None:
    m.num_embeddings, m.embedding_dim = m.weight.shape


def _conv1d_transformers(m: nn.Module) -> None:  # GPT-2's Conv1D: weight (nx, nf)
    m.nx, m.nf = m.weight.shape


RULES: dict[type | str, Callable[[Any], None]] = {
    nn.Linear: _linear,
    nn.modules.conv._ConvNd: _conv,
    nn.modules.batchnorm._NormBase: _batch_norm,
    nn.LayerNorm: _layer_norm,
    nn.GroupNorm: _group_norm,
    nn.Embedding: _embedding,
    "transformers.pytorch_utils.Conv1D": _conv1d_transformers,
}


def _rule(module: nn.Module) -> Callable[[Any], None] | None:
    for cls in type(module).__mro__:
        rule = RULES.get(cls) or RULES.get(f"{cls.__module__}.{cls.__qualname__}")
        if rule is not None:
            return rule
    return None


PROJECTIONS = (("q_proj", "k_proj", "v_proj"), ("query", "key", "value"), ("q_lin", "k_lin", "v_lin"),
               ("c_attn",), ("qkv",), ("Wqkv",))  # query first; one name: packed query, key and value
HEAD_WIDTH = ("head_dim", "attention_head_size")  # what attention modules reshape by
ALL_HEADS = ("split_size", "all_head_size", "attn_dim", "dim")  # the query heads' total width, where kept


def _sync_attention(new: nn.Module, before: dict[str, tuple]) -> None:
    """An attention module that keeps its head width (transformers' and timm's do) reshapes
    query, key and value by it: each projection's new width over its head count is the new
    head width, which must then be one. The softmax scale is the module's own, computed at
    construction, which the compressed graph kept too (timm's fused path would compute it
    anew, so such a module takes its unfused path)."""
    for name, module in new.named_modules():
        attr = next((a for a in HEAD_WIDTH if type(getattr(module, a, None)) is int), None)
        if attr is None:
            continue
        head = getattr(module, attr)
        for names in PROJECTIONS:
            widths = {child: _head_width(module, child, f"{name}.{child}.weight".lstrip("."), head, len(names) == 1,
                                         before) for child in names if hasattr(module, child)}
            if not widths or None in widths.values():
                continue
            if len(set(widths.values())) > 1:
                raise SurgeryError(f"{name} ({type(module).__name__}) reshapes by one {attr}, but its heads are now "
                                   f"{widths} wide: give the query/key and value groups the same share (rule='fixed' "
                                   "with round_to=1), or use result.module (the GraphModule)")
            width = next(iter(widths.values()))
            query = before[f"{name}.{names[0]}.weight".lstrip(".")]
            total = query[1 if _rule(getattr(module, names[0])) is _conv1d_transformers else 0] // (3 if len(names) == 1 else 1)
            for other in ALL_HEADS:
                if getattr(module, other, None) == total:
                    setattr(module, other, total // head * width)
            if width != head and getattr(module, "fused_attn", False) and isinstance(getattr(module, "scale", None), float):
                module.fused_attn = False  # timm's fused path scales by the new width; its own path by `scale`
            setattr(module, attr, width)
            break


def _head_width(module: nn.Module, child: str, key: str, head: int, packed: bool, before: dict[str, tuple]) -> int | None:
    """A projection's new width per head (its heads counted at the old width ``head``); a packed
    query-key-value projection counts as three equal parts."""
    proj = getattr(module, child)
    if key not in before or not isinstance(getattr(proj, "weight", None), torch.Tensor):
        return None
    axis = 1 if _rule(proj) is _conv1d_transformers else 0
    parts = 3 if packed else 1
    heads = before[key][axis] // (parts * head)
    return proj.weight.shape[axis] // (parts * heads) if heads else None


EPS = ("variance_epsilon", "eps")  # a normalisation's epsilon: transformers' RMSNorms, torch's


def _keep_mean_widths(new: nn.Module, compressed: GraphModule) -> None:
    """A normalisation whose mean the graph keeps dividing by the original width ``d`` over
    ``k`` channels (:func:`fxcompress.rewrite._keep_mean_widths`) is, in the module's own code,
    the same norm over ``k`` with ``eps·d/k`` and its scale times ``√(d/k)``:
    ``x/√(Σx²/d + ε) = √(d/k)·x/√(Σx²/k + ε·d/k)``."""
    for node in compressed.graph.nodes:
        if KEPT_WIDTH not in node.meta:
            continue
        (d, k), stack = node.meta[KEPT_WIDTH], node.meta.get("nn_module_stack") or {}
        path = next(reversed(stack.values()))[0] if stack else None
        module = _submodule(new, path) if path is not None else None
        attr = next((a for a in EPS if type(getattr(module, a, None)) is float), None)
        weight = getattr(module, "weight", None)
        if attr is None or not isinstance(weight, torch.Tensor) or weight.ndim != 1:
            where = f"{path} ({type(module).__name__})" if module is not None else f"node {node.name}"
            raise SurgeryError(f"{where} takes a mean over channels that narrowed from {d} to {k}; the graph keeps "
                               f"dividing by {d}, which only a normalisation with an eps attribute "
                               f"({' or '.join(EPS)}) and a per-channel weight can say in its own code: use "
                               "result.module (the GraphModule), or leave that group whole (CompressConfig(targets=...))")
        setattr(module, attr, getattr(module, attr) * d / k)
        with torch.no_grad():
            weight.mul_((d / k) ** 0.5)


# -- the check ------------------------------------------------------------------------------------
def _check(model: nn.Module, new: nn.Module, compressed: GraphModule, example: tuple[tuple, dict], tolerance: float,
           before: dict[str, tuple]) -> None:
    args, kwargs = example
    with torch.no_grad(), _evaluating(new), _evaluating(compressed), state_kept(compressed), _no_cache(new):
        expected = compressed(*args, **kwargs)
        with _innermost(new) as where:
            try:
                got = new(*args, **kwargs)
            except Exception as exc:  # the user's code; any failure means a width it fixes itself
                raise SurgeryError(f"the narrowed {type(model).__name__} fails in {where[-1] or 'its forward'} "
                                   f"({type(new.get_submodule(where[-1])).__name__}): {type(exc).__name__}: "
                                   f"{str(exc).splitlines()[0][:200]}. {_advice(new, before)}") from None
    change = _change(_leaves(expected), _leaves(got))
    if change is None or change > tolerance:
        found = "shares no output with" if change is None else f"differs by {change:.2e} (relative) from"
        raise SurgeryError(f"the narrowed {type(model).__name__} {found} the compressed graph on the example batch. "
                           f"{_advice(new, before)}")


def _advice(new: nn.Module, before: dict[str, tuple]) -> str:
    suspects = _suspects(new, before)
    named = f"Modules that keep an old width as an attribute: {', '.join(suspects)}. " if suspects else ""
    return (f"{named}Its code fixes a width that fxcompress cannot change from outside: use result.module "
            "(the GraphModule), or leave that group whole (CompressConfig(targets=...)).")


def _suspects(new: nn.Module, before: dict[str, tuple]) -> list[str]:
    """Modules with an int attribute equal to a width that narrowed, nearest the changes first."""
    narrowed = {d for name, shape in before.items() for d, now in zip(shape, _shape(new, name)) if now < d}
    found = []
    for name, module in new.named_modules():
        attrs = [a for a, v in vars(module).items() if not a.startswith("_") and type(v) is int and v in narrowed]
        if attrs and _rule(module) is None:
            found.append(f"{name or type(new).__name__}.{attrs[0]} = {getattr(module, attrs[0])}")
    return found[:4]


def _shape(root: nn.Module, name: str) -> tuple:
    owner, _, attr = name.rpartition(".")
    module = _submodule(root, owner)
    value = getattr(module, attr, None) if module is not None else None
    return tuple(value.shape) if isinstance(value, torch.Tensor) else ()


@contextlib.contextmanager
def _innermost(module: nn.Module) -> Iterator[list[str]]:
    """The path of the module whose forward is running, deepest last, as the list's last entry
    (when ``forward`` raises, the one that raised)."""
    names = {id(m): n for n, m in module.named_modules()}
    stack: list[str] = [""]

    def enter(m, *_):
        stack.append(names.get(id(m), ""))

    def leave(m, *_):
        stack.pop()

    handles = [nn.modules.module.register_module_forward_pre_hook(enter),
               nn.modules.module.register_module_forward_hook(leave)]
    try:
        yield stack
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def _evaluating(module: nn.Module) -> Iterator[None]:
    modes = {m: m.training for m in module.modules()}
    module.eval()
    try:
        yield
    finally:
        for m, mode in modes.items():
            m.training = mode


@contextlib.contextmanager
def _no_cache(module: nn.Module) -> Iterator[None]:
    """As at capture: a KV cache is not an output the graph has."""
    configs = {id(c): c for m in module.modules() if (c := getattr(m, "config", None)) is not None
               and getattr(c, "use_cache", False)}
    for config in configs.values():
        config.use_cache = False
    try:
        yield
    finally:
        for config in configs.values():
            config.use_cache = True


def _leaves(out: Any) -> dict[str, torch.Tensor]:
    flat = torch.utils._pytree.tree_flatten_with_path(out)[0]
    return {torch.utils._pytree.keystr(path): t for path, t in flat
            if isinstance(t, torch.Tensor) and t.is_floating_point()}


def _change(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> float | None:
    common = [key for key in expected if key in got and expected[key].shape == got[key].shape]
    if not common:
        return None
    scale = max(float(expected[k].double().abs().max()) for k in common if expected[k].numel())
    change = max(float((expected[k].double() - got[k].double()).abs().max()) for k in common if expected[k].numel())
    return change / scale if scale > 0 else change
