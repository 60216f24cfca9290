"""Loaders for the on-disk evaluation data, and the WordPiece tokenizer trained on it."""

import gzip

import numpy as np
import pytest

from fxcompress.datasets import cifar10, encode, glue, wordpiece
from fxcompress.errors import DatasetError


def test_glue_splits_have_their_documented_sizes_and_labels(data_root):
    dev = glue("sst2", "dev", data_root)
    assert len(dev) == 872 and np.bincount(dev.labels).tolist() == [428, 444] and dev.second is None
    assert not dev.first[0].endswith(" ")  # the trailing space of every GLUE SST-2 sentence is stripped
    qnli = glue("qnli", "dev", data_root)
    assert len(qnli) == 5463 and np.bincount(qnli.labels).tolist() == [2702, 2761] and len(qnli.second) == 5463
    assert len(glue("qnli", "train", data_root)) == 10475


def test_qqp_dev_is_split_reproducibly_into_train_and_test(data_root):
    train, test = glue("qqp", "train", data_root), glue("qqp", "test", data_root)
    assert len(train) + len(test) == 40430 and len(train) == 32344
    assert not set(zip(train.first, train.second)) & set(zip(test.first, test.second))
    assert glue("qqp", "test", data_root).first == test.first


def test_cifar10_test_images(data_root):
    x, y = cifar10(data_root, ["test_batch_first1000"])
    assert x.shape == (1000, 3, 32, 32) and x.dtype == np.float32 and y[:10].tolist() == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]


def test_missing_or_broken_files_name_the_path(tmp_path):
    with pytest.raises(DatasetError, match="sst2/dev.tsv.gz"):
        glue("sst2", "dev", tmp_path)
    with pytest.raises(DatasetError, match="unknown GLUE task"):
        glue("mnli", "dev", tmp_path)
    with pytest.raises(DatasetError, match="splits"):
        glue("qqp", "dev", tmp_path)
    (tmp_path / "sst2").mkdir()
    with gzip.open(tmp_path / "sst2" / "dev.tsv.gz", "wt") as f:
        f.write("text\tgold\nhello\t1\n")
    with pytest.raises(DatasetError, match="expected GLUE sst2 columns"):
        glue("sst2", "dev", tmp_path)


def test_wordpiece_is_trained_cached_and_encodes_pairs(data_root, tmp_path):
    train = glue("qnli", "train", data_root).subset(range(500))
    tok = wordpiece(train, vocab_size=2000, cache_dir=tmp_path)
    cached = list(tmp_path.glob("qnli-wordpiece-2000-*.json"))
    assert len(cached) == 1 and wordpiece(train, 2000, cache_dir=tmp_path).get_vocab() == tok.get_vocab()
    batch = encode(tok, train.subset(range(8)), max_length=64)
    ids, mask, types = batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]
    assert ids.shape == mask.shape == types.shape and ids.shape[0] == 8 and ids.shape[1] <= 64
    assert (ids[:, 0] == tok.token_to_id("[CLS]")).all() and types.max() == 1  # the second text is segment 1
    assert ((ids == 0) == (mask == 0)).all() and batch["labels"].shape == (8,)
