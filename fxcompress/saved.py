"""Save a compressed model to a folder, and load it back, without pickle.

A saved folder holds:

* ``model.safetensors`` — every parameter and buffer of the compressed module (a tensor tied
  under several names is stored once; ``fxcompress.json`` lists its other names);
* ``inputs.safetensors`` — the example batch it was captured with (replayed by :func:`load`
  with ``model=``);
* ``fxcompress.json`` — the steps that rebuild the architecture from the original model
  (:func:`fxcompress.rebuild`), the report, the versions that wrote it;
* ``report.txt`` — the report as printed;
* ``program.pt2`` — the compressed model as a ``torch.export`` program, where it exports, so
  it loads without the original model or its class.

:func:`load` reads only safetensors, JSON and a ``.pt2`` archive that it has checked holds no
pickled payload (``torch.export.load`` would unpickle one: arbitrary code), so a folder from
elsewhere can be loaded without running its code. A folder is written whole or not at all.

Example:
    >>> result.save("out/resnet18-half")                                  # doctest: +SKIP
    >>> module = fxcompress.load("out/resnet18-half")                     # no original needed  # doctest: +SKIP
    >>> narrowed = fxcompress.load("out/resnet18-half", model, own_class=True)  # its own class  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import re
import tokenize
import zipfile
from collections.abc import Iterator, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
import torch.utils._sympy.functions
from torch import nn
from torch.utils import _pytree as pytree

from fxcompress.atomic import staged_dir, umask
from fxcompress.capture import dynamic_shapes
from fxcompress.errors import ConfigError
from fxcompress.surgery import named_tensors, narrowed_copy

FORMAT = "fxcompress.saved/1"
META, WEIGHTS, INPUTS, PROGRAM = "fxcompress.json", "model.safetensors", "inputs.safetensors", "program.pt2"
REPORT = "report.txt"
SCALARS = (type(None), bool, int, float, str)


def save(result: Any, path: str | os.PathLike) -> Path:
    """Write ``result`` (a :class:`CompressResult` or :class:`RMTKDResult`) to the folder ``path``."""
    steps = list(result.steps) if hasattr(result, "steps") else [result.step]
    if result.example is None:
        raise ConfigError("this result has no example batch (made by an older fxcompress?): compress again to save it")
    tensors, aliases = _unique(result.module)
    inputs, spec, constants = _flat_inputs(result.example)
    meta = {"format": FORMAT, "versions": _versions(), "model_class": _class_name(result.source),
            "steps": steps, "summary": result.to_dict(), "aliases": aliases,
            "inputs": {"spec": spec, "constants": constants}, "program": None}
    target = Path(path)
    with staged_dir(target) as stage:
        safetensors.torch.save_file(tensors, stage / WEIGHTS, metadata={"format": FORMAT})
        safetensors.torch.save_file(inputs, stage / INPUTS, metadata={"format": FORMAT})
        meta["program"] = _save_program(result.module, result.example, stage / PROGRAM)
        (stage / META).write_text(json.dumps(meta, indent=2), encoding="utf-8")
        (stage / REPORT).write_text(f"{result}\n", encoding="utf-8")
        for file in stage.iterdir():
            file.chmod(0o666 & ~umask())  # as any file the user writes
    return target


def load(path: str | os.PathLike, model: nn.Module | None = None, *, own_class: bool = False) -> nn.Module:
    """The compressed model saved in ``path``.

    Without ``model``: the saved ``torch.export`` program as a module (the original class is
    not needed). With ``model`` (the original, uncompressed): the architecture rebuilt from it
    by the saved steps, with the saved weights; ``own_class=True`` returns it as an instance
    of ``model``'s class (:meth:`CompressResult.to_module`).
    """
    folder = Path(path)
    meta = _meta(folder)
    if model is None:
        if own_class:
            raise ConfigError("own_class=True needs model=, the original model whose class the result takes")
        return _load_program(folder, meta)
    from fxcompress.compress import rebuild  # compress imports this module's users
    example = _example(folder, meta)
    module = rebuild(model, example[1] if example[1] else example[0], meta["steps"])  # a batch, as compress took it
    _assign(module, _saved_tensors(folder, meta), folder)
    return narrowed_copy(model, module, example) if own_class else module


# -- what is written ---------------------------------------------------------------------------
def _unique(module: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every parameter and buffer once, contiguous; each further name of a tied tensor → its first."""
    tensors: dict[str, torch.Tensor] = {}
    first: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, tensor in named_tensors(module):
        if id(tensor) in first:
            aliases[name] = first[id(tensor)]
            continue
        first[id(tensor)] = name
        tensors[name] = tensor.detach().contiguous().clone()
    return tensors, aliases


def _flat_inputs(example: tuple[tuple, dict]) -> tuple[dict[str, torch.Tensor], str, dict[str, Any]]:
    leaves, spec = pytree.tree_flatten(example)
    tensors, constants = {}, {}
    for index, leaf in enumerate(leaves):
        if isinstance(leaf, torch.Tensor):
            tensors[str(index)] = leaf.detach().contiguous().clone()
        elif isinstance(leaf, SCALARS):
            constants[str(index)] = leaf
        else:
            raise ConfigError(f"the example batch holds a {type(leaf).__name__}, which cannot be saved without "
                              "pickle: give compress batches of tensors and plain numbers")
    return tensors, pytree.treespec_dumps(spec), constants


def _save_program(module: nn.Module, example: tuple[tuple, dict], path: Path) -> str | dict[str, str]:
    """``program.pt2``, or why the module did not export (it then loads only with ``model=``)."""
    args, kwargs = example
    try:
        program = torch.export.export(module, args, kwargs, dynamic_shapes=dynamic_shapes(args, kwargs), strict=False)
        torch.export.save(program, path)
    except Exception as exc:  # torch raises many types; all mean "no program"
        path.unlink(missing_ok=True)
        return {"error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}"}
    return PROGRAM


def _versions() -> dict[str, str]:
    versions = {}
    for package in ("fxcompress", "torch", "transformers", "torchvision"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return versions


def _class_name(model: Any) -> str | None:
    return None if model is None else f"{type(model).__module__}.{type(model).__qualname__}"


# -- what is read --------------------------------------------------------------------------------
def _meta(folder: Path) -> dict[str, Any]:
    if not (folder / META).is_file():
        raise ConfigError(f"{folder} is not a saved fxcompress model: it has no {META} (write one with result.save)")
    try:
        meta = json.loads((folder / META).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{folder / META} is not valid JSON ({exc}): the folder is damaged; save it again") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ConfigError(f"{folder / META} is format {meta.get('format') if isinstance(meta, dict) else None!r}; "
                          f"this fxcompress reads {FORMAT!r}")
    return meta


def _load_program(folder: Path, meta: Mapping[str, Any]) -> nn.Module:
    if meta.get("program") != PROGRAM:
        why = (meta.get("program") or {}).get("error", "not saved")
        raise ConfigError(f"{folder} holds no program ({why}): load it with model=, the original model, "
                          "from which the saved steps rebuild it")
    return load_program(folder / PROGRAM, remedy="load the folder with model= (the original model) instead, "
                                                 "which reads only its safetensors").module()


def load_program(path: str | os.PathLike, *, trust: bool = False,
                 remedy: str = "pass trust=True only for a file you made yourself") -> torch.export.ExportedProgram:
    """``torch.export.load(path)``, once :func:`check_archive` found nothing in it that would run
    code (unless ``trust``); ``remedy`` ends the refusal's message."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no such program file: {path}")
    if not trust:
        check_archive(path, remedy)
    _register_outputs(path)
    try:
        return torch.export.load(path)
    except Exception as exc:  # torch raises many types; all mean "not a program"
        raise ConfigError(f"{path} is not a program saved by torch.export.save: {type(exc).__name__}: "
                          f"{str(exc).strip()[:300]}") from None


def _register_outputs(path: Path) -> None:
    """Import the transformers modules whose output classes (``CausalLMOutputWithPast``) the
    program returns: a class is known to pytree once its module is imported. Only modules of
    transformers are imported, never one a file names elsewhere."""
    with zipfile.ZipFile(path) as archive:
        text = " ".join(archive.read(n).decode("utf-8", "replace") for n in archive.namelist()
                        if n.split("/", 1)[-1].startswith("models/"))
    for name in sorted(set(re.findall(r"transformers(?:\.\w+)+", text))):
        module = name.rpartition(".")[0]
        if module.startswith("transformers."):
            with contextlib.suppress(ImportError):
                importlib.import_module(module)


def check_archive(path: Path, remedy: str) -> None:
    """Refuse a ``.pt2`` archive that holds anything ``torch.export.load`` would unpickle
    (pickled weights or constants, custom objects, non-tensor sample inputs), evaluate (a
    shape expression that is not one), or call (a node target outside the operator
    registries), or compiled code."""
    try:
        archive = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as exc:
        raise ConfigError(f"{path} is not a torch.export archive ({exc}): the folder is damaged; save it again") from None
    with archive:
        for name in archive.namelist():
            _check_entry(archive, name, path, remedy)


def _check_entry(archive: zipfile.ZipFile, name: str, path: Path, remedy: str) -> None:
    part = name.split("/", 1)[-1]
    refuse = None
    if part.startswith(("data/aotinductor/", "data/extra/")) or part.endswith((".so", ".cpp")):
        refuse = "compiled code"
    elif part.startswith(("data/weights/", "data/constants/")) and part.endswith(".pt"):
        refuse = "a pickled weights file"
    elif part.startswith(("data/weights/", "data/constants/")) and part.endswith("config.json"):
        entries = json.loads(archive.read(name)).get("config", {})
        if any(e.get("use_pickle") or not str(e.get("path_name", "")).startswith(("weight_", "tensor_"))
               for e in entries.values()):
            refuse = "pickled tensors or custom objects"
    elif part.startswith("models/") and part.endswith(".json"):
        refuse = _unsafe_graph(json.loads(archive.read(name)))
    elif part.startswith("data/sample_inputs/"):
        try:
            torch.load(io.BytesIO(archive.read(name)), weights_only=True)  # the safe unpickler; export.load falls back to the unsafe one
        except Exception:  # any failure here is what the unsafe fallback would have run
            refuse = "sample inputs that only the unsafe unpickler reads"
    if refuse:
        raise ConfigError(f"{path} holds {refuse} ({name}): refused, since loading it could run code; {remedy}")


#: What a graph node may call: registered operators, and the few Python functions export writes.
SAFE_TARGET = re.compile(r"(torch\.ops\.(aten|prims|higher_order)|_operator|math)\.[A-Za-z_][\w.]*")
#: The names a shape expression may hold (it is read with ``sympy.sympify``, which evaluates Python).
SYMPY_NAMES = frozenset({
    "Symbol", "Integer", "Rational", "Float", "Add", "Mul", "Pow", "Max", "Min", "Mod", "Abs", "floor", "ceiling",
    "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "Equality", "Unequality", "StrictLessThan", "StrictGreaterThan",
    "LessThan", "GreaterThan", "And", "Or", "Not", "Piecewise", "ExprCondPair", "true", "false", "oo", "zoo",
    "nan", "Infinity", "NegativeInfinity", "BooleanTrue", "BooleanFalse", "True", "False", "None",
    "positive", "negative", "nonnegative", "nonpositive", "integer", "real", "finite", "nonzero", "zero", "even",
    "odd", "rational", "commutative", *torch.utils._sympy.functions.__all__})


def _unsafe_graph(graph: Any) -> str | None:
    """What in a serialised program would run code when it is read or called: a node target
    outside the operator registries, or a shape expression beyond numbers, symbols and the
    functions of :data:`SYMPY_NAMES` (``sympy.sympify`` evaluates the string as Python)."""
    for key, value in _items(graph):
        if key == "target" and isinstance(value, str) and not SAFE_TARGET.fullmatch(value):
            return f"a call of {value[:80]!r}"
        if key == "expr_str" and isinstance(value, str) and not _plain_expression(value):
            return f"the shape expression {value[:80]!r}"
    return None


def _items(tree: Any) -> Iterator[tuple[str, Any]]:
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield key, value
            yield from _items(value)
    elif isinstance(tree, list):
        for value in tree:
            yield from _items(value)


def _plain_expression(text: str) -> bool:
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(text).readline))
    except (tokenize.TokenError, SyntaxError):
        return False
    for token in tokens:
        if token.type == tokenize.NAME and token.string not in SYMPY_NAMES \
                or token.type == tokenize.STRING and not re.fullmatch(r"'[A-Za-z]+\d*'", token.string) \
                or token.type == tokenize.OP and token.string not in {"(", ")", ",", "=", "+", "-", "*", "/", "**"} \
                or token.type not in (tokenize.NAME, tokenize.STRING, tokenize.OP, tokenize.NUMBER,
                                      tokenize.NEWLINE, tokenize.ENDMARKER):
            return False
    return True


def _example(folder: Path, meta: Mapping[str, Any]) -> tuple[tuple, dict]:
    tensors = safetensors.torch.load_file(folder / INPUTS)
    inputs = meta["inputs"]
    spec = pytree.treespec_loads(inputs["spec"])
    leaves = [tensors[str(i)] if str(i) in tensors else inputs["constants"][str(i)] for i in range(spec.num_leaves)]
    args, kwargs = pytree.tree_unflatten(leaves, spec)
    return tuple(args), dict(kwargs)


def _saved_tensors(folder: Path, meta: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    tensors = safetensors.torch.load_file(folder / WEIGHTS)
    return {**tensors, **{alias: tensors[name] for alias, name in meta.get("aliases", {}).items()}}


def _assign(module: nn.Module, tensors: Mapping[str, torch.Tensor], folder: Path) -> None:
    """Copy each saved tensor into the rebuilt module's tensor of that name; every name must match."""
    own = dict(named_tensors(module))
    missing, extra = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    wrong = [n for n in own if n in tensors and own[n].shape != tensors[n].shape]
    if missing or extra or wrong:
        raise ConfigError(f"the weights in {folder} do not fit the model rebuilt from model= (another model, or "
                          f"another version of it): missing {missing[:3]}, unexpected {extra[:3]}, "
                          f"other shapes {wrong[:3]}")
    with torch.no_grad():
        for name, tensor in own.items():
            tensor.copy_(tensors[name])
