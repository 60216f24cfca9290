"""``fxcompress``: compress a model, and compare ONNX models side by side, as deployed.

    fxcompress compress torchvision:resnet18 --calib calib.safetensors --out resnet18-half/ --rule fixed --ratio 0.5
    fxcompress compare original.onnx compressed.onnx --batch-sizes 1,32 --out bench/
    fxcompress env

(``fxcompress-bench`` and ``python -m fxcompress`` are the same command.)

Bad input (a missing file, a file that is not ONNX, different input signatures, an unknown
device, a batch size of 0, an unreadable data directory, an ``--out`` that cannot be
written, a full disk) ends with one line on stderr, exit code 2, and nothing written:
results are written to a staging folder beside ``--out`` and moved in only when complete.

A ``.pt2`` program (``torch.export.save``) is read only after a check that it holds nothing
``torch.export.load`` would unpickle, evaluate or call outside the operator registries (a
crafted file can run code that way); ``--trust-pt2`` skips the check, for files you made
yourself. ONNX files carry no code.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any
from pathlib import Path

from fxcompress import __version__
from fxcompress.errors import ConfigError, FxCompressError


def cli(argv: list[str] | None = None) -> int:
    """The ``fxcompress`` command."""
    return main(argv, prog="fxcompress")


def main(argv: list[str] | None = None, prog: str = "fxcompress-bench") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.replace("``", ""),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_compress(sub)
    cmp = sub.add_parser("compare", help="measure two or more ONNX models side by side (the first is the reference)",
                         description="Latency, throughput, memory and energy of ONNX models, each run in fresh "
                                     "processes, alternating models over the repeats.")
    cmp.add_argument("models", nargs="+", help="ONNX files (or, with --trust-pt2, programs saved with torch.export.save, "
                                               "exported to ONNX first); the first is the reference of every ratio")
    cmp.add_argument("--trust-pt2", action="store_true",
                     help="read .pt2 programs unchecked (pickled payloads, Python in shape expressions): torch.export.load "
                          "would run them, so pass this only for files you made yourself")
    cmp.add_argument("--out", required=True, help="directory for results.json, results.csv, results.md, plots")
    cmp.add_argument("--batch-sizes", default="1,32", help="comma-separated batch sizes (default 1,32)")
    cmp.add_argument("--repeats", type=int, default=3, help="alternating repeats per model (default 3)")
    cmp.add_argument("--device", default="cpu", help="cpu (CPU provider) or cuda (CUDA provider, IO binding)")
    cmp.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: its default)")
    cmp.add_argument("--seq-len", type=int, default=128, help="length of symbolic sequence axes (default 128)")
    cmp.add_argument("--data", default=None, help="a labelled split for accuracy: cifar10 (its 1,000 test images)")
    cmp.add_argument("--data-dir", default=None, help="evaluation data directory (default: $FXCOMPRESS_DATA)")
    cmp.add_argument("--warmup-runs", type=int, default=10)
    cmp.add_argument("--warmup-seconds", type=float, default=2.0)
    cmp.add_argument("--min-runs", type=int, default=1000)
    cmp.add_argument("--min-seconds", type=float, default=10.0)
    cmp.add_argument("--max-seconds", type=float, default=60.0,
                     help="cap per measurement for slow models (fewer than --min-runs then; the count is reported)")
    sub.add_parser("env", help="print the environment a result would record (versions, CPU, GPU)",
                   description="Print the package versions, CPU and GPU that compare records.")
    args = parser.parse_args(argv)
    with _terminate_unwinds():
        try:
            if args.command == "compress":
                return _compress(args)
            if args.command == "env":
                from fxcompress.bench import environment

                print(json.dumps(environment("cpu"), indent=2))
                return 0
            return _compare(args)
        except (FxCompressError, OSError) as exc:  # OSError: an unwritable --out, a full disk, …
            print(f"{prog}: error: {_one_line(exc)}", file=sys.stderr)
            return 2


@contextlib.contextmanager
def _terminate_unwinds() -> Iterator[None]:
    """While the command runs, ``kill`` (SIGTERM) unwinds it like an error: temporary files go."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if isinstance(exc, FxCompressError) else f"{type(exc).__name__}: {text}"


def _compare(args: argparse.Namespace) -> int:
    from fxcompress.atomic import scratch_dir, staged_dir
    from fxcompress.bench import BenchConfig, compare, to_onnx
    from fxcompress.results import write_results

    try:
        batches = tuple(int(b) for b in args.batch_sizes.split(","))
    except ValueError:
        raise ConfigError(f"--batch-sizes must be comma-separated integers, got {args.batch_sizes!r}") from None
    config = BenchConfig(batch_sizes=batches, repeats=args.repeats, device=args.device, threads=args.threads,
                         sequence_length=args.seq_len, warmup_runs=args.warmup_runs,
                         warmup_seconds=args.warmup_seconds, min_runs=args.min_runs, min_seconds=args.min_seconds,
                         max_seconds=args.max_seconds, dataset=args.data, data_dir=args.data_dir)
    out = Path(args.out)
    _check_writable(out)
    with scratch_dir() as work, staged_dir(out) as stage:
        names = _unique_stems(args.models)
        paths = [str(to_onnx(p, work, trust_pt2=args.trust_pt2, name=n)) for p, n in zip(args.models, names)]
        results = compare(paths, config, progress=lambda line: print(line, file=sys.stderr, flush=True))
        for model, original in zip(results["models"], args.models):
            if model["path"] != original:  # exported from a .pt2: keep the ONNX beside the results
                shutil.move(model["path"], stage / Path(model["path"]).name)
                model.update(path=str(out / Path(model["path"]).name), source=original)
        written = [out / path.relative_to(stage) for path in write_results(results, stage)]
    for path in written:
        print(path)
    return 0


def _add_compress(sub: Any) -> None:
    cmd = sub.add_parser("compress", help="compress a model with the spectra of its activations, and save it",
                         description="Capture MODEL, calibrate it on --calib, narrow it and write the saved folder "
                                     "(model.safetensors, fxcompress.json, program.pt2, report.txt) to --out. "
                                     "Progress goes to stderr, the report to stdout.")
    cmd.add_argument("model", help="torchvision:NAME (e.g. torchvision:resnet18), transformers:TYPE or "
                                   "transformers:config.json (e.g. transformers:gpt2), both built with random weights "
                                   "unless --weights, or a torch.export.save program (.pt2)")
    cmd.add_argument("--calib", required=True, help="calibration inputs: a .safetensors or .npz file, one array per "
                                                    "input (one array: positional; several: keyword inputs by name), "
                                                    "samples along the first axis")
    cmd.add_argument("--out", required=True, help="folder to write the compressed model to")
    cmd.add_argument("--batch-size", type=int, default=32, help="calibration batch size (default 32)")
    cmd.add_argument("--weights", default=None, help="a .safetensors state dict for a torchvision/transformers model")
    cmd.add_argument("--num-classes", type=int, default=None, help="torchvision: classes of the head (default its own)")
    cmd.add_argument("--head", default="base", choices=sorted(HEADS),
                     help="transformers: the model class (default base: AutoModel)")
    cmd.add_argument("--rule", default=None, help="rank rule (default mp-hist, the paper's, at --agreement 0.8): "
                                                  "mp-hist, mp-robust, fixed, energy, gavish-donoho, …")
    for name, kind in (("q", float), ("alpha", float), ("tau", float), ("ratio", float), ("k", int), ("round-to", int)):
        cmd.add_argument(f"--{name}", type=kind, default=None, help=f"the rule's {name} (CompressConfig.{name.replace('-', '_')})")
    cmd.add_argument("--transform", default=None, help="auto, projection, selection or magnitude")
    cmd.add_argument("--targets", default=None, help="comma-separated group names or glob patterns (default all)")
    cmd.add_argument("--outputs", default=None, help="comma-separated output names the result keeps (default all)")
    cmd.add_argument("--fold-batchnorm", action="store_true", help="fold BatchNorm into the layer before it first")
    cmd.add_argument("--uniform", action="store_true", help="one width per kind of group (every layer's MLP alike)")
    cmd.add_argument("--no-fold-mean", action="store_true", help="add no bias for the lost mean")
    level = cmd.add_mutually_exclusive_group()
    level.add_argument("--agreement", type=float, default=None,
                       help="scale the rule's widths to the smallest model whose top-1 output agrees with the "
                            "original's on this fraction of the calibration data (default 0.8 for the spectral rules)")
    level.add_argument("--no-agreement", action="store_true", help="take the spectral rule's own widths, unscaled")
    level.add_argument("--params", type=float, default=None,
                       help="a size budget instead: scale the rule's widths to keep at most this fraction of the "
                            "parameters outside embeddings (0.75: 25 %% fewer)")
    cmd.add_argument("--no-reconstruct", action="store_true",
                     help="drop unselected channels for their mean instead of predicting them from the kept ones")
    cmd.add_argument("--onnx", action="store_true", help="also write model.onnx (validated against the module)")
    cmd.add_argument("--trust-pt2", action="store_true", help="read a .pt2 model unchecked (see compare --help)")
    cmd.add_argument("--quiet", action="store_true", help="no progress lines")


def _compress(args: argparse.Namespace) -> int:
    import logging

    import fxcompress

    if not args.quiet:
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    out = Path(args.out)
    _check_writable(out)
    config = _compress_config(args)
    batches = _calibration(Path(args.calib), args.batch_size)
    model = _model(args)
    result = fxcompress.compress(model, batches, config)
    result.save(out)
    if args.onnx:
        fxcompress.export_onnx(result.module, batches[0], out / "model.onnx")
    print(result)
    print(out)
    return 0


HEADS = {"base": "AutoModel", "causal-lm": "AutoModelForCausalLM", "masked-lm": "AutoModelForMaskedLM",
         "sequence-classification": "AutoModelForSequenceClassification",
         "image-classification": "AutoModelForImageClassification"}


def _compress_config(args: argparse.Namespace) -> Any:
    from fxcompress import CompressConfig

    given = {"rule": args.rule, "q": args.q, "alpha": args.alpha, "tau": args.tau, "ratio": args.ratio, "k": args.k,
             "round_to": args.round_to, "transform": args.transform, "fold_batchnorm": args.fold_batchnorm or None,
             "uniform": args.uniform or None, "fold_mean": False if args.no_fold_mean else None,
             "reconstruct": False if args.no_reconstruct else None, "agreement": args.agreement,
             "params": args.params, "targets": tuple(args.targets.split(",")) if args.targets else None,
             "outputs": tuple(args.outputs.split(",")) if args.outputs else None}
    return CompressConfig(**{k: v for k, v in given.items() if v is not None},
                          **({"agreement": None} if args.no_agreement else {}))


def _calibration(path: Path, batch_size: int) -> list[Any]:
    """Batches of ``batch_size`` samples: one tensor each (one array in the file), or a dict."""
    import numpy as np
    import safetensors.torch
    import torch

    if batch_size < 1:
        raise ConfigError(f"--batch-size must be ≥ 1, got {batch_size}")
    if not path.is_file():
        raise ConfigError(f"--calib {path}: no such file")
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as data:
                arrays = {name: torch.from_numpy(data[name]) for name in data.files}
        elif path.suffix == ".safetensors":
            arrays = safetensors.torch.load_file(path)
        else:
            raise ConfigError(f"--calib {path}: give a .safetensors or .npz file (no pickle)")
    except (OSError, ValueError, safetensors.SafetensorError) as exc:
        raise ConfigError(f"--calib {path} is not readable: {_one_line(exc)}") from None
    sizes = {name: int(a.shape[0]) if a.ndim else 0 for name, a in arrays.items()}
    if not arrays or len(set(sizes.values())) != 1 or not next(iter(sizes.values())):
        raise ConfigError(f"--calib {path}: every array needs the same number of samples along its first axis, "
                          f"got {sizes or 'no arrays'}")
    n = next(iter(sizes.values()))
    parts = {name: a.split(batch_size) for name, a in arrays.items()}
    if len(arrays) == 1:
        return list(next(iter(parts.values())))
    return [{name: parts[name][i] for name in arrays} for i in range(-(-n // batch_size))]


def _model(args: argparse.Namespace) -> Any:
    kind, _, name = args.model.partition(":")
    if args.model.endswith(".pt2") and kind not in ("torchvision", "transformers"):
        from fxcompress.saved import load_program

        return load_program(args.model, trust=args.trust_pt2, remedy="pass --trust-pt2 only for a file you made yourself")
    if kind == "torchvision" and name:
        model = _torchvision(name, args.num_classes)
    elif kind == "transformers" and name:
        model = _transformers(name, args.head)
    else:
        raise ConfigError(f"model {args.model!r}: give torchvision:NAME, transformers:TYPE (or transformers:config.json) "
                          "or a .pt2 program")
    if args.weights:
        _load_weights(model, Path(args.weights))
    return model.eval()


def _torchvision(name: str, num_classes: int | None) -> Any:
    import torchvision

    if name not in torchvision.models.list_models():
        raise ConfigError(f"torchvision has no model {name!r}; it has e.g. resnet18, mobilenet_v3_small, vit_b_16")
    return torchvision.models.get_model(name, weights=None, **({"num_classes": num_classes} if num_classes else {}))


def _transformers(name: str, head: str) -> Any:
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(name) if name.endswith(".json") \
            else transformers.AutoConfig.for_model(name)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"transformers:{name}: {_one_line(exc)}") from None
    try:
        return getattr(transformers, HEADS[head]).from_config(config)
    except ValueError as exc:
        raise ConfigError(f"transformers:{name} has no {head} model: {_one_line(exc)}") from None


def _load_weights(model: Any, path: Path) -> None:
    import safetensors.torch

    if not path.is_file():
        raise ConfigError(f"--weights {path}: no such file")
    missing, unexpected = safetensors.torch.load_model(model, path, strict=False)
    if missing or unexpected:
        raise ConfigError(f"--weights {path} does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")


def _check_writable(out: Path) -> None:
    """``--out`` must be a directory, or a path whose nearest existing folder is writable."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file: give a directory for the results")
    existing = next(p for p in (out, *out.absolute().parents) if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {out}: {existing} is not writable")


def _unique_stems(paths: list[str]) -> list[str]:
    """File stems, numbered where two inputs share one (``a/model.pt2``, ``b/model.pt2``)."""
    stems = [Path(p).stem for p in paths]
    return [s if stems.count(s) == 1 else f"{s}-{stems[:i].count(s) + 1}" for i, s in enumerate(stems)]


if __name__ == "__main__":
    sys.exit(main())
