"""fxcompress demo: the spectral stage of RMT-KD on a network trained from scratch on CIFAR-10.

1. trains a small CNN on CIFAR-10 (data_batch_1-2) for a minute on the CPU;
2. streams calibration activations (10 % of the training images) of every hidden layer
   into float64 covariances: conv layers by channel (every pixel a sample), with the
   circular-shift null over pixel positions, since neighbouring pixels are correlated;
3. picks the width of each layer with every rule and prints them side by side;
4. writes a spectrum plot per layer (the paper's Fig. 2) and a JSON report to --out;
5. compresses the CNN with fxcompress.compress (capture → width analysis → calibration →
   rank selection → rewrite) under the paper's rule and the robust one, and reports
   parameters and test accuracy before fine-tuning (distillation is the next stage).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

import fxcompress
from fxcompress.atomic import write_text
from fxcompress.datasets import cifar10
from fxcompress.errors import FxCompressError
from fxcompress.spectral import CovarianceAccumulator, plot_spectrum

RULES = {"mp-robust": {}, "mp-hist": {"q": 0.5}, "gavish-donoho": {}, "energy": {"tau": 0.9}}


def small_cnn() -> nn.Sequential:
    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2)]

    return nn.Sequential(*block(3, 64), *block(64, 128), *block(128, 256),
                         nn.Flatten(), nn.Linear(256 * 16, 256), nn.ReLU(), nn.Linear(256, 10))


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, seconds: float, seed: int) -> int:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True)
    model.train()
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for idx in torch.randperm(len(x), generator=gen).split(128):
            xb = x[idx]
            flip = torch.rand(len(idx), generator=gen) < 0.5
            xb = torch.where(flip.view(-1, 1, 1, 1), xb.flip(3), xb)
            loss = nn.functional.cross_entropy(model(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps += 1
            if time.perf_counter() - start >= seconds:
                break
    return steps


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return float(sum((model(xb).argmax(1) == yb).sum() for xb, yb in zip(x.split(500), y.split(500))) / len(y))


@torch.no_grad()
def calibrate(model: nn.Sequential, x: torch.Tensor) -> dict[str, CovarianceAccumulator]:
    """One pass over x feeds the covariance of every ReLU output (the layers' hidden widths)."""
    accs: dict[str, CovarianceAccumulator] = {}

    def hook(name: str):
        def feed(_module, _inputs, out: torch.Tensor) -> None:
            if out.ndim == 4:  # (N, C, H, W) → N sequences of H·W correlated pixel samples
                out = out.flatten(2).transpose(1, 2)
            acc = accs.setdefault(name, CovarianceAccumulator(out.shape[-1], shift_null=out.ndim == 3))
            acc.update(out)

        return feed

    handles = [m.register_forward_hook(hook(f"{i}:{type(model[i - 1]).__name__}→relu"))
               for i, m in enumerate(model) if isinstance(m, nn.ReLU)]
    model.eval()
    for xb in x.split(250):
        model(xb)
    for h in handles:
        h.remove()
    return accs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=None, help="evaluation data (default: $FXCOMPRESS_DATA)")
    parser.add_argument("--out", default="out/demo", help="where plots and the report go")
    parser.add_argument("--train-seconds", type=float, default=60.0, help="CPU time budget for training")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    out = Path(args.out)

    x_np, y_np = cifar10(args.data_dir, ["data_batch_1", "data_batch_2"])
    xv_np, yv_np = cifar10(args.data_dir, ["test_batch_first1000"])
    x, y, xv, yv = map(torch.from_numpy, (x_np, y_np, xv_np, yv_np))
    model = small_cnn()
    print(f"[1/5] training a {sum(p.numel() for p in model.parameters()):,}-parameter CNN on "
          f"{len(x):,} CIFAR-10 images for {args.train_seconds:.0f} s ...", flush=True)
    steps = train(model, x, y, args.train_seconds, args.seed)
    acc = accuracy(model, xv, yv)
    print(f"      {steps} steps; accuracy on the 1,000 CIFAR-10 test images: {acc:.1%}")

    calib = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(args.seed))[: len(x) // 10]]
    print(f"[2/5] calibrating on {len(calib):,} training images (10 %) ...", flush=True)
    accs = calibrate(model, calib)

    print("[3/5] rank selection per layer (k = width kept, of d; conv layers use the circular-shift null)")
    header = f"  {'layer':18s} {'d':>5s} {'samples':>9s} {'n_eff':>7s} " + " ".join(f"{r:>13s}" for r in RULES)
    print(header + "   σ² (robust)  MP fit")
    report = {"accuracy": acc, "train_steps": steps, "calibration_images": len(calib), "layers": {}}
    for name, acc_ in accs.items():
        picks = {rule: acc_.select_rank(rule, **opts) for rule, opts in RULES.items()}
        robust = picks["mp-robust"]
        n_eff = robust.diagnostics.effective_samples or robust.n_samples
        fit = "heavy-tailed?" if robust.diagnostics.heavy_tailed else "ok"
        print(f"  {name:18s} {acc_.dim:5d} {acc_.count:9,d} {n_eff:7,d} "
              + " ".join(f"{p.k:13d}" for p in picks.values()) + f"   {robust.sigma2:11.4g}  {fit}")
        slug = name.replace(":", "_").replace("→", "_")
        plot_spectrum(robust, out / f"spectrum_{slug}.png", title=f"{name} (CIFAR-10 CNN, calibration set)")
        report["layers"][name] = {rule: p.to_dict() for rule, p in picks.items()}
    print(f"[4/5] wrote {len(accs)} spectrum plots to {out}/")

    print("[5/5] fxcompress.compress on the trained CNN (no fine-tuning yet):")
    batches = list(calib.split(250))
    report["compress"] = {}
    for rule in ("mp-hist", "mp-robust"):
        result = fxcompress.compress(model, batches, fxcompress.CompressConfig(rule=rule))
        compressed_acc = accuracy(result.module, xv, yv)
        widths = ", ".join(f"{r.d}→{r.k}" for r in result.report if r.rule is not None)
        print(f"      {rule:10s} {result.params_before:,} → {result.params_after:,} parameters "
              f"({1 - result.params_after / result.params_before:.1%} fewer; widths {widths}); "
              f"accuracy {acc:.1%} → {compressed_acc:.1%}")
        report["compress"][rule] = {**result.to_dict(), "accuracy": compressed_acc}
    write_text(out / "report.json", json.dumps(report, indent=1))
    print(f"      wrote {out}/report.json")


if __name__ == "__main__":
    try:
        main()
    except FxCompressError as exc:
        raise SystemExit(f"fxcompress demo: error: {exc}") from None
