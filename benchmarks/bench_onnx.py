"""Benchmark: original against compressed, exported to ONNX and run by ``fxcompress-bench``.

Builds a CIFAR-sized ResNet-18 and a 4 × 256 BERT from configs (random weights: latency does
not depend on the values), compresses each with ``rule="fixed", ratio=0.5`` (random weights
have no spectral structure for the MP rules to keep), exports both with
``fxcompress.export_onnx`` (validated against PyTorch), then runs ``fxcompress-bench compare``
under the full protocol and prints its markdown table.

    python benchmarks/bench_onnx.py --out out/bench-onnx [--models resnet18,bert --batch-sizes 1,32]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import fxcompress
from fxcompress.cli import main as bench_main


def resnet18():
    import torchvision

    return torchvision.models.resnet18(num_classes=10).eval(), [torch.randn(8, 3, 32, 32) for _ in range(2)]


def bert():
    import transformers as tf

    config = tf.BertConfig(vocab_size=8000, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                           intermediate_size=1024, max_position_embeddings=512)
    batches = [{"input_ids": torch.randint(0, 8000, (8, 64)), "attention_mask": torch.ones(8, 64, dtype=torch.long)}
               for _ in range(2)]
    return tf.BertForSequenceClassification(config).eval(), batches


MODELS = {"resnet18": resnet18, "bert": bert}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="out/bench-onnx")
    parser.add_argument("--models", default="resnet18,bert")
    parser.add_argument("--batch-sizes", default="1,32")
    parser.add_argument("--min-seconds", default="10")
    args = parser.parse_args()
    torch.manual_seed(0)
    for name in args.models.split(","):
        model, batches = MODELS[name]()
        folder = Path(args.out) / name
        result = fxcompress.compress(model, batches, fxcompress.CompressConfig(rule="fixed", ratio=0.5))
        for tag, module in (("original", model), ("compressed", result.module)):
            report = fxcompress.export_onnx(module, batches[0], folder / f"{tag}.onnx")
            print(f"{name} {tag}: {report.parameters:,} parameters, {report.size_bytes / 1e6:.1f} MB, "
                  f"validated at {len(report.checked_shapes)} shapes (max error {report.max_error:.2g})", flush=True)
        code = bench_main(["compare", str(folder / "original.onnx"), str(folder / "compressed.onnx"),
                           "--batch-sizes", args.batch_sizes, "--min-seconds", args.min_seconds,
                           "--seq-len", "64", "--out", str(folder)])
        if code:
            sys.exit(code)
        print((folder / "results.md").read_text(), flush=True)


if __name__ == "__main__":
    main()
