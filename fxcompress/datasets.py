"""Loaders for the evaluation data kept on disk (no download ever happens at run time).

The data directory comes from an explicit argument, else ``$FXCOMPRESS_DATA``; its layout
and formats are described in that directory's README (CIFAR-10 as ``cifar10/*.npz.xz``,
GLUE tasks as gzipped TSV). A WordPiece tokenizer is trained on a task's training split
(the paper trained from scratch, so no pretrained vocabulary is needed) and cached.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import lzma
import os
import zipfile
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
    """Images ``x`` (N, 32, 32, 3) uint8 and labels ``y`` (N,) in 0–9 from an xz-compressed ``.npz``."""
    if not path.is_file():
        raise DatasetError(f"missing dataset file {path}: check --data-dir / FXCOMPRESS_DATA")
    try:
        with lzma.open(path) as f:
            arrays = np.load(io.BytesIO(f.read()))  # allow_pickle stays False: arrays only
            x, y = arrays["x"], arrays["y"]
    except (lzma.LZMAError, EOFError, OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
        raise DatasetError(f"cannot read {path} as an xz-compressed .npz with arrays x and y "
                           f"({type(exc).__name__}: {exc}): the file is damaged or truncated; fetch it again") from None
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != (32, 32, 3):
        raise DatasetError(f"{path}: x must be uint8 images shaped (N, 32, 32, 3), got {x.dtype} {x.shape}")
    if y.ndim != 1 or y.dtype.kind not in "iu" or len(y) != len(x):
        raise DatasetError(f"{path}: y must be {len(x)} integer labels (one per image), got {y.dtype} {y.shape}")
    if len(y) and (y.min() < 0 or y.max() > 9):
        raise DatasetError(f"{path}: CIFAR-10 labels lie in 0–9, got {int(y.min())}–{int(y.max())}")
    return x, y


# -- GLUE -------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TextPairs:
    """A GLUE split: first texts, second texts (None for single-sentence tasks), int labels."""

    task: str
    split: str
    first: tuple[str, ...]
    second: tuple[str, ...] | None
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.first)

    def subset(self, indices) -> "TextPairs":
        idx = [int(i) for i in indices]
        pick = lambda texts: tuple(texts[i] for i in idx)  # noqa: E731
        return TextPairs(self.task, self.split, pick(self.first), None if self.second is None else pick(self.second),
                         self.labels[idx])


#: file, text columns, label encoding. QQP has no train file here: its dev set is split
#: reproducibly into "train" (80 %) and "test" (20 %) — results on it are not GLUE-dev numbers.
GLUE_TASKS = {
    "sst2": {"files": {"train": "sst2/train.tsv.gz", "dev": "sst2/dev.tsv.gz"},
             "columns": ("sentence", None), "labels": {"0": 0, "1": 1}},
    "qnli": {"files": {"train": "qnli/train_subset_10pct.tsv.gz", "dev": "qnli/dev.tsv.gz"},
             "columns": ("question", "sentence"), "labels": {"entailment": 0, "not_entailment": 1}},
    "qqp": {"files": {"train": "qqp/dev.tsv.gz", "test": "qqp/dev.tsv.gz"},
            "columns": ("question1", "question2"), "labels": {"0": 0, "1": 1}},
}
QQP_TRAIN_FRACTION, QQP_SEED = 0.8, 0


def glue(task: str, split: str, root: str | os.PathLike | None = None) -> TextPairs:
    """A GLUE split from the data directory (``sst2``: train/dev; ``qnli``: train (a 10 %
    subset)/dev; ``qqp``: train/test, both carved from its dev set with a fixed seed)."""
    spec = GLUE_TASKS.get(task)
    if spec is None:
        raise DatasetError(f"unknown GLUE task {task!r}: choose one of {sorted(GLUE_TASKS)}")
    if split not in spec["files"]:
        raise DatasetError(f"GLUE {task} has splits {sorted(spec['files'])} here, not {split!r}")
    path = data_dir(root) / spec["files"][split]
    header, rows = _read_tsv(path)
    first_col, second_col = spec["columns"]
    try:
        first = tuple(r[header.index(first_col)].strip() for r in rows)
        second = None if second_col is None else tuple(r[header.index(second_col)].strip() for r in rows)
        labels = np.array([spec["labels"][r[header.index("label")]] for r in rows], dtype=np.int64)
    except (ValueError, KeyError, IndexError) as exc:
        raise DatasetError(f"{path} does not have the expected GLUE {task} columns {spec['columns']} + label "
                           f"(header {header}): {exc}") from None
    pairs = TextPairs(task, split, first, second, labels)
    if task == "qqp":
        order = np.random.default_rng(QQP_SEED).permutation(len(pairs))
        cut = int(QQP_TRAIN_FRACTION * len(pairs))
        pairs = dataclasses.replace(pairs.subset(np.sort(order[:cut] if split == "train" else order[cut:])), split=split)
    return pairs


def _read_tsv(path: Path) -> tuple[list[str], list[list[str]]]:
    if not path.is_file():
        raise DatasetError(f"missing dataset file {path}: check --data-dir / FXCOMPRESS_DATA")
    try:
        with gzip.open(path, "rt", encoding="utf-8", newline="\n") as f:
            header = f.readline().rstrip("\n").split("\t")
            rows = [line.rstrip("\n").split("\t") for line in f]
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise DatasetError(f"cannot read {path} as a gzipped UTF-8 TSV ({type(exc).__name__}: {exc}): "
                           "the file is damaged or truncated; fetch it again") from None
    if header == [""] or not rows:
        raise DatasetError(f"{path} holds no {'header' if header == [''] else 'rows'}: the file is empty or truncated")
    return header, rows


# -- tokenizer ---------------------------------------------------------------------------------
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def wordpiece(pairs: TextPairs, vocab_size: int = 8000, cache_dir: str | os.PathLike | None = None):
    """A lower-casing WordPiece tokenizer trained on ``pairs`` (a training split), cached.

    The cache key is the task, the vocabulary size and a digest of the texts, so a changed
    split never reuses a stale vocabulary. Pairs encode as ``[CLS] a [SEP] b [SEP]``.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

    texts = list(pairs.first) + list(pairs.second or ())
    digest = hashlib.sha256("\n".join(texts).encode()).hexdigest()[:16]
    folder = Path(cache_dir or os.environ.get("FXCOMPRESS_CACHE") or Path.home() / ".cache" / "fxcompress")
    path = folder / f"{pairs.task}-wordpiece-{vocab_size}-{digest}.json"
    if path.is_file():
        return Tokenizer.from_file(str(path))
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                                             show_progress=False))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                       special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    from fxcompress.atomic import write_text

    write_text(path, tok.to_str())
    return tok


def encode(tokenizer, pairs: TextPairs, max_length: int = 128) -> dict[str, np.ndarray]:
    """``input_ids``, ``attention_mask``, ``token_type_ids`` (int64) padded to the longest
    encoding (at most ``max_length``), and ``labels``."""
    tokenizer.enable_truncation(max_length)
    inputs = list(zip(pairs.first, pairs.second)) if pairs.second is not None else list(pairs.first)
    encodings = tokenizer.encode_batch(inputs)
    length = max(len(e.ids) for e in encodings)
    out = {name: np.zeros((len(encodings), length), dtype=np.int64) for name in ("input_ids", "attention_mask",
                                                                                "token_type_ids")}
    for i, e in enumerate(encodings):
        n = len(e.ids)
        out["input_ids"][i, :n] = e.ids
        out["attention_mask"][i, :n] = 1
        out["token_type_ids"][i, :n] = e.type_ids
    out["labels"] = pairs.labels
    return out
