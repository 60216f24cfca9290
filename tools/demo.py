"""fxcompress demo: RMT-KD end to end, on data that ships with a dependency (no download).

1. trains a small CNN from scratch on scikit-learn's 8×8 handwritten digits (1,797 real
   images, 10 classes): 60 % train, 20 % validation, 20 % test, split from a seed;
2. runs RMT-KD (``fxcompress.rmtkd``): for each width group in graph order, the spectrum
   of its activations on a calibration subset (10 % of the training set) picks how many
   directions to keep, the layer is projected and the model narrowed, then fine-tuned with
   self-distillation (the model before the step is the teacher); it stops at the accuracy
   floor, when no noise is left, or at the target reduction;
3. prints the table of rounds, and writes to ``--out`` the report (``report.json``), the
   fine-tuning metrics (``metrics.jsonl``), a checkpoint per round and a spectrum plot per
   narrowed group (the paper's Fig. 2).

    python tools/demo.py --out out/demo [--rule mp-hist --epochs 40]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

import fxcompress
from fxcompress.atomic import write_text
from fxcompress.errors import FxCompressError


def digits(seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """scikit-learn's digits as (N, 1, 8, 8) float images in [0, 1] and int64 labels, split 60/20/20."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        sys.exit("the demo needs scikit-learn (its digits dataset): pip install 'fxcompress[demo]'")
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    cut1, cut2 = int(0.6 * len(x)), int(0.8 * len(x))
    parts = {"train": order[:cut1], "val": order[cut1:cut2], "test": order[cut2:]}
    return {name: (x[idx], y[idx]) for name, idx in parts.items()}


def cnn() -> nn.Sequential:
    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(*block(1, 64), *block(64, 128), nn.MaxPool2d(2), *block(128, 256), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(256 * 4, 256), nn.ReLU(), nn.Linear(256, 10))


def loader(split: tuple[torch.Tensor, torch.Tensor], batch: int, shuffle: bool) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*split), batch_size=batch, shuffle=shuffle)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="out/demo", help="where the report, checkpoints and plots go")
    parser.add_argument("--rule", default="mp-hist", help="rank-selection rule (default: the paper's mp-hist)")
    parser.add_argument("--q", type=float, default=0.5, help="mp-hist's noise quantile (the paper's knob)")
    parser.add_argument("--epochs", type=int, default=30, help="epochs of training from scratch")
    parser.add_argument("--tune-epochs", type=int, default=3, help="epochs of distillation per round")
    parser.add_argument("--target", type=float, default=0.8, help="stop at this parameter reduction")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    out = Path(args.out)
    start = time.perf_counter()

    data = digits(args.seed)
    train, val, test = loader(data["train"], 64, True), loader(data["val"], 256, False), loader(data["test"], 256, False)
    model = cnn()
    print(f"training a {sum(p.numel() for p in model.parameters()):,}-parameter CNN on {len(data['train'][0])} "
          f"digit images for {args.epochs} epochs …", flush=True)
    fxcompress.distill(model, None, train, fxcompress.DistillConfig(alpha=1, epochs=args.epochs, lr=2e-3,
                                                                    weight_decay=1e-4, progress=False))
    trained_at = time.perf_counter()
    before = fxcompress.accuracy(model, test)
    print(f"  trained in {trained_at - start:.0f} s: validation {fxcompress.accuracy(model, val):.4f}, "
          f"test {before:.4f}", flush=True)

    config = fxcompress.RMTKDConfig(
        compress=fxcompress.CompressConfig(rule=args.rule, q=args.q),
        distill=fxcompress.DistillConfig(alpha=0.5, temperature=2.0, epochs=args.tune_epochs, lr=1e-3, progress=False),
        max_drop=0.02, target_reduction=args.target, max_passes=1, seed=args.seed)
    print(f"RMT-KD ({args.rule}) …", flush=True)
    try:
        result = fxcompress.rmtkd(model, train, val, config, out_dir=out, overwrite=True, plots=True)
    except FxCompressError as exc:
        sys.exit(f"RMT-KD failed: {exc}")
    after = fxcompress.accuracy(result.module, test)
    print(result)
    print(f"test accuracy {before:.4f} → {after:.4f}; RMT-KD took {result.seconds:.0f} s, "
          f"the whole demo {time.perf_counter() - start:.0f} s")
    report = {**result.to_dict(), "test_accuracy_before": before, "test_accuracy_after": after,
              "train_seconds": trained_at - start}
    write_text(out / "report.json", json.dumps(report, indent=2))
    print(f"report, checkpoint, metrics and spectra in {out}/")


if __name__ == "__main__":
    main()
