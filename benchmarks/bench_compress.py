"""Benchmark: fxcompress.compress of a BERT-base-sized model (12 layers × 768, random weights),
or of a timm architecture at 64 px.

Times each stage (capture, analysis, calibration, rank selection + eigenvectors, rewrite)
on two small calibration batches, for a first call (which also pays one-time set-up: lazy
imports, torch.export's first trace) and a second one in the same process, then one
``fxcompress.compress`` end to end, and prints the covariance memory held per group.

    python benchmarks/bench_compress.py [--batch 8 --tokens 64 --rule mp-hist]
    python benchmarks/bench_compress.py --batch 4 --tokens 32
    python benchmarks/bench_compress.py --model timm/convnext_atto --batch 2   # 2 batches of 2 images, 64 px
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import BertConfig, BertForSequenceClassification

import fxcompress
from fxcompress.analysis import analyze_graph
from fxcompress.calibrate import as_call, calibrate
from fxcompress.capture import capture, own_weights
from fxcompress.compress import _select, _targets
from fxcompress.rewrite import rewrite


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rule", default="mp-hist", help="a rank-selection rule (fixed: ratio 0.5)")
    parser.add_argument("--model", default="bert-base", help="bert-base, or timm/<name> (random weights, 64 px)")
    args = parser.parse_args()
    torch.manual_seed(0)
    model, batches, what = _model(args)
    # the stages themselves, at the rule's own widths (an agreement level repeats rewrite and calibration)
    config = fxcompress.CompressConfig(rule=args.rule, **({"ratio": 0.5} if args.rule == "fixed" else {"agreement": None}))
    print(f"{args.model} ({sum(p.numel() for p in model.parameters()):,} parameters), rule {args.rule}, "
          f"2 batches of {what}, {torch.get_num_threads()} threads")
    runs = [_stages(model, batches, config) for _ in range(2)]  # the first call also pays one-time set-up
    print(f"  {'stage':32s} {'first call':>10s} {'second':>8s}")
    for name in runs[0][0]:
        print(f"  {name:32s} {runs[0][0][name]:8.2f} s {runs[1][0][name]:6.2f} s")
    totals = [sum(stages.values()) for stages, _, _ in runs]
    print(f"  {'total':32s} {totals[0]:8.2f} s {totals[1]:6.2f} s   (goal ≤ 5 s)")
    result = fxcompress.compress(model, batches, config)
    print(f"  {'fxcompress.compress, end to end':32s} {result.seconds:8.2f} s (a third call)")
    _, accs, module = runs[-1]
    mib = sum(a.state_bytes() for blocks in accs.values() for a in blocks) / 2**20
    print(f"  covariance state: {len(accs)} groups, {mib:.0f} MiB (O(d²) per group, flat in the sample count)")
    print(f"  parameters after: {sum(p.numel() for p in module.parameters()):,}")


def _model(args) -> tuple[torch.nn.Module, list, str]:
    if args.model.startswith("timm/"):
        import timm

        model = timm.create_model(args.model[len("timm/"):], pretrained=False, num_classes=10).eval()
        return model, [torch.randn(args.batch, 3, 64, 64) for _ in range(2)], f"{args.batch} images of 64 px"
    model = BertForSequenceClassification(BertConfig()).eval()  # 12 × 768, 3072-wide FFN
    batches = [{"input_ids": torch.randint(0, 30522, (args.batch, args.tokens)),
                "attention_mask": torch.ones(args.batch, args.tokens, dtype=torch.long)} for _ in range(2)]
    return model, batches, f"{args.batch}×{args.tokens} tokens"


def _stages(model, batches, config) -> tuple[dict[str, float], dict, torch.nn.Module]:
    """One compress, stage by stage: the seconds of each, the accumulators and the result."""
    clock, stages = time.perf_counter(), {}

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        stages[name], clock = now - clock, now

    gm = capture(model, *as_call(batches[0]), share_weights=True)  # as compress does
    lap("capture (torch.export)")
    plan = analyze_graph(gm)
    lap("analysis")
    targets = _targets(plan, config)
    accs = calibrate(gm, targets, batches, config.correlated_samples)
    lap("calibration (2 batches)")
    decisions = _select(gm, targets, accs, config)
    lap("rank selection + eigenvectors")
    module = rewrite(gm, plan, {n: p for n, (p, _, _) in decisions.items() if p is not None}, inplace=True)
    own_weights(module, model)
    lap("rewrite + copies of kept weights")
    return stages, accs, module


if __name__ == "__main__":
    main()
