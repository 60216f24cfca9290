"""Benchmark: ``fxcompress.compress`` stage by stage, two source trees side by side.

Each round runs one fresh process per tree, alternating which goes first; each process warms
up (lazy imports, the first export), then times capture, analysis, calibration, rank
selection and rewrite of one call, ``compress`` end to end on a second (a ratio of 0.5), and
``compress`` with the default ``CompressConfig()`` (whose agreement level rewrites and runs
the model once per trial) on a third. Printed: the medians per tree and the median new/old
ratio with its range. Make the old tree with ``git worktree add /tmp/old <commit>``.

    python benchmarks/compare_commits.py /tmp/old --models timm/resnet18,timm/convnext_atto,bert
    FXCOMPRESS_DATA=../shared/data python benchmarks/compare_commits.py /tmp/old --models cifar-resnet20
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent

CHILD = r'''
import json, sys, time, torch
sys.path.insert(0, sys.argv[1])
import fxcompress
from fxcompress.analysis import analyze_graph
from fxcompress.calibrate import as_call, calibrate
from fxcompress.capture import capture
from fxcompress.compress import _select, _targets
from fxcompress.rewrite import rewrite
torch.set_num_threads(2)
torch.manual_seed(0)
name = sys.argv[2]
if name.startswith("timm/"):
    import timm
    model = timm.create_model(name[5:], pretrained=False, num_classes=10).eval()
    batches = [torch.randn(2, 3, 64, 64) for _ in range(2)]
elif name.endswith(".pt"):  # a trained ResNet-20 and its calibration batches (see _trained)
    sys.path.insert(1, sys.argv[3])  # the oracle study's model, after the tree's fxcompress
    from oracle_width import resnet20
    saved = torch.load(name, weights_only=True)
    model = resnet20()
    model.load_state_dict(saved["state"])
    model.eval()
    batches = saved["calib"]
else:  # bert: BERT-base widths, 4 layers, random weights
    from transformers import BertConfig, BertForSequenceClassification
    model = BertForSequenceClassification(BertConfig(num_hidden_layers=4)).eval()
    batches = [{"input_ids": torch.randint(0, 1000, (4, 32))} for _ in range(2)]
config = fxcompress.CompressConfig(rule="fixed", ratio=0.5)
fxcompress.compress(model, batches, config)
seconds, start = {}, time.perf_counter()
def lap(stage):
    global start
    seconds[stage], start = time.perf_counter() - start, time.perf_counter()
args, kwargs = as_call(batches[0])
gm = capture(model, args, kwargs, share_weights=True); lap("capture")
plan = analyze_graph(gm); lap("analysis")
targets = _targets(plan, config); accs = calibrate(gm, targets, batches); lap("calibration")
decisions = _select(gm, targets, accs, config); lap("selection")
rewrite(gm, plan, {n: p for n, (p, _, _) in decisions.items() if p is not None}); lap("rewrite")
fxcompress.compress(model, batches, config); lap("compress")
fxcompress.compress(model, batches); lap("default")  # CompressConfig(): mp-hist at agreement 0.8, ~10 trials
print(json.dumps(seconds))
'''


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("old", help="the source tree to compare against (a git worktree of an earlier commit)")
    parser.add_argument("--new", default=str(HERE.parent), help="this tree, by default")
    parser.add_argument("--models", default="timm/resnet18,timm/convnext_atto,bert",
                        help="timm/<name> and bert (random weights); cifar-resnet20: trained first (FXCOMPRESS_DATA)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    trees = {"old": str(Path(args.old).resolve()), "new": str(Path(args.new).resolve())}
    folder = tempfile.TemporaryDirectory()
    for name in args.models.split(","):
        model = _trained(Path(folder.name) / "resnet20.pt") if name == "cifar-resnet20" else name
        runs: dict[str, list[dict[str, float]]] = {label: [] for label in trees}
        for round_ in range(args.rounds):
            order = list(trees.items()) if round_ % 2 == 0 else list(reversed(trees.items()))
            for label, tree in order:
                done = subprocess.run([sys.executable, "-P", "-c", CHILD, tree, model, str(HERE)], capture_output=True,
                                      text=True, check=True)
                runs[label].append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(name)
        for stage in runs["new"][0]:
            new, old = ([r[stage] for r in runs[label]] for label in ("new", "old"))
            ratios = [n / o for n, o in zip(new, old)]
            print(f"  {stage:12s} old {statistics.median(old):6.2f} s  new {statistics.median(new):6.2f} s  "
                  f"new/old median {statistics.median(ratios):.2f} ({min(ratios):.2f}–{max(ratios):.2f})", flush=True)


def _trained(path: Path) -> str:
    """A model whose agreement level runs its whole bisection, as on real use (a model with random
    weights predicts one class everywhere and stops at the first trial): ResNet-20 trained one
    epoch on 6,000 CIFAR-10 images as the oracle study trains it, saved with its calibration
    batches (10 % of the training rows, unlabelled)."""
    sys.path.insert(0, str(HERE))
    import oracle_width  # the study's model and data
    import fxcompress
    from fxcompress.rmtkd import calibration_subset

    task = next(t for t in oracle_width.PROFILES["quick"] if t.name == "cifar-resnet20")
    train, _, _ = oracle_width.task_data(task, None, 0)
    torch.manual_seed(0)
    model = oracle_width.resnet20()
    fxcompress.distill(model, None, train, fxcompress.DistillConfig(alpha=1, epochs=1, lr=task.lr, weight_decay=0.01,
                                                                    progress=False, seed=0))
    calib = calibration_subset(train, 0.1, 0)  # the inputs only
    torch.save({"state": model.state_dict(), "calib": calib}, path)
    return str(path)


if __name__ == "__main__":
    main()
