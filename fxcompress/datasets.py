"""Loaders for the evaluation data kept on disk (no download ever happens at run time).

The data directory comes from an explicit argument, else ``$FXCOMPRESS_DATA``; its layout
and formats are described in that directory's README (CIFAR-10 as ``cifar10/*.npz.xz``).
"""

from __future__ import annotations

import io
import lzma
import os
from pathlib import Path

import numpy as np

from fxcompress.errors import DatasetError

CIFAR10_MEAN = np.array([0.49139968, 0.48215841, 0.44653091], dtype=np.float32)
CIFAR10_STD = np.array([0.24703223, 0.24348513, 0.26158784], dtype=np.float32)


def data_dir(path: str | os.PathLike | None = None) -> Path:
    """The evaluation-data directory: ``path``, else ``$FXCOMPRESS_DATA``; it must exist."""
    chosen = path or os.environ.get("FXCOMPRESS_DATA")
    if not chosen:
        raise DatasetError("no data directory: pass --data-dir or set FXCOMPRESS_DATA (e.g. ../shared/data)")
    root = Path(chosen).expanduser()
    if not root.is_dir():
        raise DatasetError(f"data directory {root} does not exist or is not a directory")
    return root


def cifar10(root: str | os.PathLike | None, files: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 3, 32, 32) float32, normalised with the training statistics, and labels (N,) int64.

    ``files`` are names under ``cifar10/`` such as ``data_batch_1`` or ``test_batch_first1000``.
    """
    base = data_dir(root) / "cifar10"
    xs, ys = zip(*(_load_npz_xz(base / f"{name}.npz.xz") for name in files))
    x = (np.concatenate(xs).astype(np.float32) / 255.0 - CIFAR10_MEAN) / CIFAR10_STD
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2)), np.concatenate(ys).astype(np.int64)


def _load_npz_xz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise DatasetError(f"missing dataset file {path}: check --data-dir / FXCOMPRESS_DATA")
    try:
        with lzma.open(path) as f:
            arrays = np.load(io.BytesIO(f.read()))
            return arrays["x"], arrays["y"]
    except (lzma.LZMAError, OSError, KeyError, ValueError) as exc:
        raise DatasetError(f"cannot read {path} as an xz-compressed .npz with arrays x and y: {exc}") from exc
