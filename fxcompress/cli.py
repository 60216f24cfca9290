"""``fxcompress-bench``: compare ONNX models side by side, as deployed.

    fxcompress-bench compare original.onnx compressed.onnx --batch-sizes 1,32 --out bench/
    fxcompress-bench env

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
from pathlib import Path

from fxcompress import __version__
from fxcompress.errors import ConfigError, FxCompressError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fxcompress-bench", description=__doc__.replace("``", ""),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
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
            if args.command == "env":
                from fxcompress.bench import environment

                print(json.dumps(environment("cpu"), indent=2))
                return 0
            return _compare(args)
        except (FxCompressError, OSError) as exc:  # OSError: an unwritable --out, a full disk, …
            print(f"fxcompress-bench: error: {_one_line(exc)}", file=sys.stderr)
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
