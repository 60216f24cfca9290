"""ONNX export, validated: what is written computes what the PyTorch module computes.

The dynamo exporter (``torch.onnx.export(..., dynamo=True)``, opset 18) is the default,
the TorchScript exporter an option and the fallback. Batch axes are dynamic, and so are
the sequence axes of integer (token) inputs. Every export is checked by ``onnx.checker``
and then run in ONNX Runtime (basic graph optimisations) against PyTorch in float32 at the
export shape and at two others, to ``atol = rtol = 1e-4``: a dynamo export can freeze an
axis that should stay dynamic, and only running another shape shows it.

The file is written atomically; its metadata records the FLOPs per sample PyTorch counted
at the export shape (``fxcompress.flops_per_sample``), which ``fxcompress-bench`` reports.

Example:
    >>> report = export_onnx(result.module, (images,), "resnet-compressed.onnx")   # doctest: +SKIP
    >>> report.max_error, report.size_bytes                                          # doctest: +SKIP
"""

from __future__ import annotations

import copy
import dataclasses
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from fxcompress.atomic import atomic_path
from fxcompress.bench import FLOPS_KEY, count_parameters, size_on_disk
from fxcompress.calibrate import as_call
from fxcompress.capture import dynamic_shapes
from fxcompress.errors import ConfigError, ExportError

EXPORTERS = ("dynamo", "torchscript")
MIN_OPSET = 7  # the oldest opset either exporter writes


@dataclasses.dataclass(frozen=True)
class ExportReport:
    """What was written and how well it matched PyTorch."""

    path: str
    exporter: str
    opset: int
    size_bytes: int
    parameters: int
    flops_per_sample: float | None
    checked_shapes: tuple[dict[str, list[int]], ...]
    max_error: float


def export_onnx(module: nn.Module, example_inputs: Any, path: str | os.PathLike, *, exporter: str = "dynamo",
                opset: int = 18, validate: bool = True, atol: float = 1e-4, rtol: float = 1e-4,
                fallback: bool = True) -> ExportReport:
    """Export ``module`` called on ``example_inputs`` (a tensor, a tuple, or a dict of keyword
    inputs) to ``path``; validate it unless ``validate=False``. The module is not modified."""
    if exporter not in EXPORTERS:
        raise ConfigError(f"exporter must be one of {EXPORTERS}, got {exporter!r}")
    if not isinstance(module, nn.Module):
        raise ConfigError(f"export_onnx needs an nn.Module (e.g. CompressResult.module), got {type(module).__name__}")
    newest = onnx.defs.onnx_opset_version()
    if not isinstance(opset, int) or isinstance(opset, bool) or not MIN_OPSET <= opset <= newest:
        raise ConfigError(f"opset must be an integer in [{MIN_OPSET}, {newest}] (this onnx package's range), "
                          f"got {opset!r}")
    args, kwargs = as_call(example_inputs)
    work = copy.deepcopy(module).eval()
    target = Path(path)
    with atomic_path(target) as tmp:
        used = _export(work, args, kwargs, tmp, exporter, opset, fallback)
        flops = _flops_per_sample(work, args, kwargs)
        model = onnx.load(str(tmp), load_external_data=False)
        if flops is not None:
            onnx.helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props}, FLOPS_KEY: repr(flops)})
        onnx.save(model, str(tmp))
        shapes, error = validate_onnx(work, example_inputs, tmp, atol=atol, rtol=rtol) if validate else ((), float("nan"))
    written = opset_of(model)
    if written != opset:
        warnings.warn(f"asked for opset {opset}, the {used} exporter wrote opset {written}", stacklevel=2)
    return ExportReport(str(target), used, written, size_on_disk(target), count_parameters(model), flops, shapes, error)


def opset_of(model: onnx.ModelProto) -> int:
    """The default-domain opset a model imports."""
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


# -- export ----------------------------------------------------------------------------------
def _export(module: nn.Module, args: tuple, kwargs: dict, path: Path, exporter: str, opset: int, fallback: bool) -> str:
    order = [exporter] + ([e for e in EXPORTERS if e != exporter] if fallback else [])
    failures = []
    for name in order:
        try:
            if name == "dynamo":
                _export_dynamo(module, args, kwargs, path, opset)
            else:
                _export_torchscript(module, args, kwargs, path, opset)
            if failures:
                warnings.warn(f"the {order[0]} exporter failed ({failures[0]}); exported with {name}", stacklevel=3)
            return name
        except Exception as exc:  # noqa: BLE001 — every exporter failure is reported below
            failures.append(f"{name}: {type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}")
    raise ExportError("ONNX export failed — " + "; ".join(failures) +
                      ". Check that the module runs on the example inputs; an op ONNX lacks needs a custom translation")


def _export_dynamo(module: nn.Module, args: tuple, kwargs: dict, path: Path, opset: int) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module, args, kwargs=kwargs or None, dynamo=True, opset_version=opset,
                                    dynamic_shapes=dynamic_shapes(args, kwargs), verbose=False)
    program.save(str(path))


def _export_torchscript(module: nn.Module, args: tuple, kwargs: dict, path: Path, opset: int) -> None:
    names = [f"input_{i}" for i in range(len(args))] + list(kwargs)
    specs = dynamic_shapes(args, kwargs)  # the same dynamic axes as the dynamo path
    specs = list(specs.values()) if isinstance(specs, dict) else list(specs or ())
    axes = {name: {axis: f"{name}_{axis}" for axis in spec} for name, spec in zip(names, specs) if spec}
    inputs = tuple(args) + ((kwargs,) if kwargs else ())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, inputs, str(path), dynamo=False, opset_version=opset, input_names=names,
                          dynamic_axes=axes)


def _flops_per_sample(module: nn.Module, args: tuple, kwargs: dict) -> float | None:
    from torch.utils.flop_counter import FlopCounterMode

    batch = _batch_size(args, kwargs)
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            module(*args, **kwargs)
    except Exception:  # noqa: BLE001 — FLOPs are informative; the export itself already ran
        return None
    return counter.get_total_flops() / batch if batch else None


def _batch_size(args: tuple, kwargs: dict) -> int | None:
    first = next((v for v in list(args) + list(kwargs.values()) if isinstance(v, torch.Tensor) and v.ndim), None)
    return int(first.shape[0]) if first is not None else None


# -- validation ------------------------------------------------------------------------------
def validate_onnx(module: nn.Module, example_inputs: Any, path: str | os.PathLike, *, atol: float = 1e-4,
                  rtol: float = 1e-4) -> tuple[tuple[dict[str, list[int]], ...], float]:
    """Check ``path`` with ``onnx.checker``, then run it in ONNX Runtime against ``module`` at the
    example shape and two others. Returns the input shapes checked and the largest error;
    raises :class:`~fxcompress.errors.ExportError` naming the output that differs."""
    ort = _onnxruntime()
    args, kwargs = as_call(example_inputs)
    was_training = module.training
    try:
        module.eval()
        return _validate(ort, module, args, kwargs, path, atol, rtol)
    finally:
        module.train(was_training)  # the caller's module keeps its mode


def _validate(ort, module: nn.Module, args: tuple, kwargs: dict, path: str | os.PathLike, atol: float,
              rtol: float) -> tuple[tuple[dict[str, list[int]], ...], float]:
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:  # noqa: BLE001
        raise ExportError(f"onnx.checker rejects the export: {exc}") from None
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    checked, worst = [], 0.0
    for shape_args, shape_kwargs in _shapes(args, kwargs):
        flat = [v for v in list(shape_args) + list(shape_kwargs.values()) if isinstance(v, torch.Tensor)]
        if len(flat) != len(names):
            raise ExportError(f"the ONNX model takes {len(names)} inputs {names}, but the module was called with "
                              f"{len(flat)} tensors")
        feed = {n: v.detach().cpu().numpy() for n, v in zip(names, flat)}
        shape = {n: list(v.shape) for n, v in feed.items()}
        with torch.no_grad():
            expected = [t.detach().float().cpu().numpy() for t in torch.utils._pytree.tree_leaves(
                module(*shape_args, **shape_kwargs)) if isinstance(t, torch.Tensor)]
        try:
            got = session.run(None, feed)
        except Exception as exc:  # noqa: BLE001
            raise ExportError(f"ONNX Runtime cannot run the export at input shapes {shape}: "
                              f"{str(exc).splitlines()[0][:300]} (an axis the export froze?)") from None
        worst = max(worst, _compare(expected, got, [o.name for o in session.get_outputs()], shape, atol, rtol))
        checked.append(shape)
    return tuple(checked), worst


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise ExportError("ONNX Runtime is not installed: pip install 'fxcompress[cpu]' (or '[gpu]', never both)") from None
    return onnxruntime


def _compare(expected: list, got: list, names: list[str], shape: dict, atol: float, rtol: float) -> float:
    if len(expected) != len(got):
        raise ExportError(f"the ONNX model returns {len(got)} outputs, PyTorch {len(expected)}")
    worst = 0.0
    for name, e, g in zip(names, expected, got):
        g = np.asarray(g, dtype=np.float32)
        if e.shape != g.shape:
            raise ExportError(f"output {name!r} has shape {list(g.shape)} in ONNX but {list(e.shape)} in PyTorch "
                              f"at input shapes {shape}")
        err = np.abs(e - g)
        worst = max(worst, float(err.max(initial=0.0)))
        if not np.all(err <= atol + rtol * np.abs(e)):
            raise ExportError(f"output {name!r} differs from PyTorch at input shapes {shape}: largest error "
                              f"{float(err.max()):.3g} (atol {atol}, rtol {rtol})")
    return worst


def _shapes(args: tuple, kwargs: dict):
    """The export shape, then batch 1 (and the sequence one shorter), then a larger batch."""
    yield args, kwargs
    generator = torch.Generator().manual_seed(0)
    for batch_of, seq_delta in ((lambda b: 1, -1), (lambda b: b + 2, 0)):
        remake = lambda v: _resized(v, batch_of, seq_delta, generator)  # noqa: E731
        yield tuple(remake(a) for a in args), {k: remake(v) for k, v in kwargs.items()}


def _resized(value: Any, batch_of, seq_delta: int, generator: torch.Generator) -> Any:
    if not isinstance(value, torch.Tensor) or value.ndim == 0:
        return value
    shape = list(value.shape)
    shape[0] = batch_of(shape[0])
    if not value.is_floating_point():
        if value.ndim >= 2 and shape[1] > 2:
            shape[1] += seq_delta
        low, high = int(value.min()), int(value.max()) + 1
        return torch.randint(low, high, shape, generator=generator, dtype=value.dtype)
    return torch.randn(shape, generator=generator, dtype=value.dtype)
