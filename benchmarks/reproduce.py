"""Reproduce the paper's comparison (Table I, Figs. 2–5) at this machine's scale, on real data.

Per task (SST-2 with a BERT-style encoder, CIFAR-10 with a CNN), trained from scratch as the
paper did, then compressed by every method at comparable budgets:

* ``rmt-mp-hist`` — RMT-KD with the paper's rule (q = 0.5); ``rmt-mp-robust`` — with ours;
* ``pca-90/95/99`` — the same loop and KD, width = explained-variance cutoff (the PCA rule);
* ``magnitude`` — the widths RMT-KD (mp-hist) chose, channels kept by weight L2 norm, same KD;
* ``scratch-kd`` — the architecture RMT-KD (mp-hist) ended with, re-initialised and trained
  from scratch with KD from the original (the DistilBERT-style baseline);
* ``rmt-no-ft`` — the mp-hist widths, projected in one shot, no fine-tuning (ablation);
* ``rmt-no-kd`` — RMT-KD (mp-hist) fine-tuned with α = 1: no distillation (ablation);
* the quantile ablation (Fig. 5): one-shot mp-hist projections for q = 0.1 … 0.9.

Every accuracy comes with a 95 % confidence interval (normal approximation to the binomial
on the evaluation set); latency is ONNX Runtime on this machine at batch 1 and 32, as ratios
to the original model measured in the same run. Results go to
``benchmarks/results/<profile>-<machine>.json``, ``benchmarks/RESULTS.md`` and PNG plots.

    python benchmarks/reproduce.py --profile quick      # ≤ 45 min on a 2-core CPU
    python benchmarks/reproduce.py --profile paper      # the full setting, for a GPU
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import socket
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import fxcompress
from fxcompress.atomic import write_text
from fxcompress.bench import BenchConfig, compare
from fxcompress.datasets import cifar10, encode, glue, wordpiece
from fxcompress.distill import inputs_of
from fxcompress.rmtkd import calibration_subset

HERE = Path(__file__).parent


@dataclasses.dataclass(frozen=True)
class Task:
    """One task's scale: data sizes, model size, training and fine-tuning budgets."""

    name: str
    train_rows: int | None  # None: all
    eval_rows: int | None
    epochs: int
    tune_epochs: int
    batch: int
    lr: float
    model: dict[str, Any]


PROFILES = {
    "mini": [Task("sst2", 384, 128, 1, 1, 32, 2e-3, dict(layers=1, hidden=32, heads=2, ffn=64, max_len=32, vocab=600)),
             Task("cifar10", 384, 128, 1, 1, 32, 2e-3, dict(widths=(8, 16)))],
    "quick": [Task("sst2", 10000, None, 3, 1, 64, 1e-3, dict(layers=2, hidden=128, heads=2, ffn=512, max_len=64,
                                                            vocab=8000)),
              Task("cifar10", 8000, None, 6, 1, 64, 2e-3, dict(widths=(32, 64, 128)))],
    "paper": [Task("sst2", None, None, 3, 1, 32, 1e-4, dict(layers=12, hidden=768, heads=12, ffn=3072, max_len=128,
                                                            vocab=30000)),
              Task("cifar10", None, None, 30, 3, 128, 1e-3, dict(resnet50=True))],
}
QUANTILES = (0.1, 0.3, 0.5, 0.7, 0.9)


# -- data and models ---------------------------------------------------------------------------
def sst2_data(task: Task, root: str | None, seed: int):
    train = glue("sst2", "train", root)
    if task.train_rows:
        train = train.subset(np.random.default_rng(seed).permutation(len(train))[: task.train_rows])
    dev = glue("sst2", "dev", root)
    if task.eval_rows:
        dev = dev.subset(range(task.eval_rows))
    tok = wordpiece(train, task.model["vocab"])
    return [_token_batches(encode(tok, split, task.model["max_len"]), task.batch) for split in (train, dev)], \
        tok.get_vocab_size()


def _token_batches(arrays: dict[str, np.ndarray], batch: int) -> list[dict[str, torch.Tensor]]:
    n = len(arrays["labels"])
    return [{k: torch.from_numpy(v[i:i + batch]) for k, v in arrays.items()} for i in range(0, n, batch)]


def cifar_data(task: Task, root: str | None, seed: int):
    x, y = cifar10(root, ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4"])
    pick = np.random.default_rng(seed).permutation(len(x))[: task.train_rows] if task.train_rows else slice(None)
    xt, yt = cifar10(root, ["test_batch_first1000"])
    xt, yt = (xt[: task.eval_rows], yt[: task.eval_rows]) if task.eval_rows else (xt, yt)
    train = torch.utils.data.TensorDataset(torch.from_numpy(x[pick]), torch.from_numpy(y[pick]))
    loader = torch.utils.data.DataLoader(train, batch_size=task.batch, shuffle=True)
    test = [(torch.from_numpy(xt[i:i + 256]), torch.from_numpy(yt[i:i + 256])) for i in range(0, len(xt), 256)]
    return loader, test


def bert(task: Task, vocab: int) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    m = task.model
    config = BertConfig(vocab_size=vocab, hidden_size=m["hidden"], num_hidden_layers=m["layers"],
                        num_attention_heads=m["heads"], intermediate_size=m["ffn"], max_position_embeddings=512,
                        num_labels=2)
    return BertForSequenceClassification(config)


def cnn(task: Task) -> nn.Module:
    if task.model.get("resnet50"):
        import torchvision

        return torchvision.models.resnet50(num_classes=10)
    layers, cin = [], 3
    for width in task.model["widths"]:
        layers += [nn.Conv2d(cin, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                   nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2)]
        cin = width
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 128), nn.ReLU(),
                         nn.Linear(128, 10))


# -- methods -------------------------------------------------------------------------------------
def run_task(task: Task, args) -> dict[str, Any]:
    torch.manual_seed(args.seed)
    if task.name == "sst2":
        (train, evaluation), vocab = sst2_data(task, args.data_dir, args.seed)
        model = bert(task, vocab)
    else:
        train, evaluation = cifar_data(task, args.data_dir, args.seed)
        model = cnn(task)
    out = Path(args.work) / task.name
    start = time.perf_counter()
    log(f"[{task.name}] training {sum(p.numel() for p in model.parameters()):,} parameters from scratch")
    fxcompress.distill(model, None, train, fxcompress.DistillConfig(alpha=1, epochs=task.epochs, lr=task.lr,
                                                                    weight_decay=0.01, progress=False))
    model.eval()
    n_eval = sum(len(_labels(b)) for b in evaluation)
    rows = {"original": _row(model, fxcompress.accuracy(model, evaluation), n_eval, time.perf_counter() - start)}
    log(f"[{task.name}] original: accuracy {rows['original']['accuracy']:.4f}")
    tune = fxcompress.DistillConfig(alpha=0.5, temperature=2.0, epochs=task.tune_epochs, lr=task.lr / 2,
                                    progress=False)

    def loop(name: str, compress: fxcompress.CompressConfig, distill=tune, plots=False):
        t0 = time.perf_counter()
        config = fxcompress.RMTKDConfig(compress=compress, distill=distill, max_drop=args.max_drop,
                                        target_reduction=0.95, max_passes=1, seed=args.seed)
        result = fxcompress.rmtkd(model, train, evaluation, config, out_dir=out / name, plots=plots)
        rows[name] = _row(result.module, result.accuracy, n_eval, time.perf_counter() - t0, result.stop)
        log(f"[{task.name}] {name}: {rows[name]['parameters']:,} parameters, accuracy {result.accuracy:.4f} "
            f"({result.stop})")
        return result

    rmt = loop("rmt-mp-hist", fxcompress.CompressConfig(rule="mp-hist", q=0.5), plots=True)
    loop("rmt-mp-robust", fxcompress.CompressConfig(rule="mp-robust"))
    for tau in (0.9, 0.95, 0.99):
        loop(f"pca-{round(tau * 100)}", fxcompress.CompressConfig(rule="energy", tau=tau))
    widths = {g: k for step in rmt.steps for g, k in step["widths"].items()}
    if widths:
        loop("magnitude", fxcompress.CompressConfig(rule="fixed", widths=widths, transform="magnitude"))
        loop("rmt-no-kd", fxcompress.CompressConfig(rule="mp-hist", q=0.5), dataclasses.replace(tune, alpha=1.0))
        rows["rmt-no-ft"] = _one_shot(model, train, evaluation, n_eval, fxcompress.CompressConfig(rule="fixed",
                                                                                                  widths=widths))
        rows["scratch-kd"] = _scratch(model, rmt, train, evaluation, n_eval, task)
        log(f"[{task.name}] scratch-kd: accuracy {rows['scratch-kd']['accuracy']:.4f}")
    quantiles = {str(q): _one_shot(model, train, evaluation, n_eval, fxcompress.CompressConfig(rule="mp-hist", q=q))
                 for q in QUANTILES}
    latency = _latency(rows, train, out, args)
    for name, figures in latency.items():
        rows[name].update(figures)
    return {"task": dataclasses.asdict(task), "eval_samples": n_eval, "methods": _strip(rows), "quantiles": _strip(quantiles),
            "rounds": [dataclasses.asdict(r) for r in rmt.rounds]}


def _row(module, accuracy: float, n: int, seconds: float, stop: str | None = None) -> dict[str, Any]:
    half = 1.96 * math.sqrt(max(accuracy * (1 - accuracy), 0.0) / n)
    return {"module": module, "parameters": sum(p.numel() for p in module.parameters()), "accuracy": accuracy,
            "ci95": half, "seconds": seconds, "stop": stop}


def _one_shot(model, train, evaluation, n_eval: int, config: fxcompress.CompressConfig) -> dict[str, Any]:
    t0 = time.perf_counter()
    calib = calibration_subset(train, 0.1, 0)
    result = fxcompress.compress(model, calib, config)
    return _row(result.module, fxcompress.accuracy(result.module, evaluation), n_eval, time.perf_counter() - t0)


def _scratch(model, rmt, train, evaluation, n_eval: int, task: Task) -> dict[str, Any]:
    """The RMT-KD architecture, re-initialised, trained from scratch with KD from the original."""
    t0 = time.perf_counter()
    example = inputs_of(next(iter(train)))
    student = fxcompress.rebuild(model, example, list(rmt.steps))
    reinitialize(student)
    fxcompress.distill(student, model, train, fxcompress.DistillConfig(alpha=0.5, temperature=2.0, epochs=task.epochs,
                                                                       lr=task.lr, progress=False))
    return _row(student, fxcompress.accuracy(student, evaluation), n_eval, time.perf_counter() - t0)


def reinitialize(module: nn.Module, std: float = 0.02) -> None:
    """Fresh weights by shape: biases 0, 1-D scales 1, matrices and kernels N(0, std²)
    scaled for fan-in on convolutions (Kaiming)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("bias") or name.endswith("beta"):
                p.zero_()
            elif p.ndim == 1:
                p.fill_(1.0)
            elif p.ndim > 2:
                nn.init.kaiming_normal_(p, nonlinearity="relu")
            else:
                p.normal_(0.0, std)
        for name, b in module.named_buffers():
            if name.endswith("running_mean"):
                b.zero_()
            elif name.endswith("running_var"):
                b.fill_(1.0)


def _latency(rows: dict, train, out: Path, args) -> dict[str, dict[str, Any]]:
    """ONNX Runtime latency of the methods' models, as ratios to the original's, in one
    alternating run (original, method 1, method 2, … in fresh processes, each repeat)."""
    example = inputs_of(next(iter(train)))
    names = ["original"] + [n for n in rows if n != "original" and (args.latency is None or n in args.latency.split(","))]
    paths = [out / "onnx" / f"{name}.onnx" for name in names]
    for name, path in zip(names, paths):
        fxcompress.export_onnx(rows[name]["module"], example, path)
    config = BenchConfig(batch_sizes=(1, 32), repeats=args.repeats, warmup_seconds=0.5, warmup_runs=5,
                         min_runs=args.min_runs, min_seconds=args.min_seconds, max_seconds=max(args.min_seconds, 20),
                         sequence_length=64)
    log(f"latency of {len(names)} models, batch 1 and 32, {args.repeats} alternating repeats")
    results = compare([str(p) for p in paths], config, progress=lambda line: None)
    figures = {}
    for name, entry in zip(names, results["models"]):
        figures[name] = {"size_bytes": entry["size_bytes"], "flops_per_sample": entry["flops_per_sample"],
                         "flop_ratio": entry["batches"]["1"]["ratio_to_first"]["flops"]}
        for batch, summary in entry["batches"].items():
            figures[name][f"p50_ms_b{batch}"] = summary["latency_ms"]["p50"]["median"]
            figures[name][f"speedup_b{batch}"] = 1 / summary["ratio_to_first"]["latency_p50"]["median"]
    return figures


def _labels(batch):
    return batch["labels"] if isinstance(batch, dict) else batch[-1]


def _strip(rows: dict) -> dict:
    return {name: {k: v for k, v in row.items() if k != "module"} for name, row in rows.items()}


# -- output --------------------------------------------------------------------------------------
def markdown(results: dict[str, Any]) -> str:
    lines = [f"# RMT-KD against the alternatives — profile `{results['profile']}` on {results['machine']}", "",
             f"Command: `{results['command']}` ({results['seconds'] / 60:.0f} min). Accuracy ± 95 % CI on the "
             "evaluation set; speed-up = original p50 / method p50 in ONNX Runtime (same run, alternating "
             "processes); FLOP ratio = method / original.", ""]
    for task in results["tasks"]:
        name = task["task"]["name"]
        evaluation = "SST-2 dev" if name == "sst2" else "CIFAR-10 test (first 1,000)"
        lines += [f"## {name} ({evaluation}, n = {task['eval_samples']})", "",
                  "| method | parameters | reduction | accuracy | p50 b1 ms | speed-up b1 | p50 b32 ms | speed-up b32 | "
                  "FLOP ratio | size MB | stop |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        base = task["methods"]["original"]["parameters"]
        for method, r in task["methods"].items():
            fmt = lambda key, spec: "—" if r.get(key) is None else format(r[key], spec)  # noqa: E731
            lines.append(f"| {method} | {r['parameters']:,} | {1 - r['parameters'] / base:.1%} | "
                         f"{r['accuracy']:.4f} ± {r['ci95']:.4f} | {fmt('p50_ms_b1', '.3f')} | {fmt('speedup_b1', '.2f')} | "
                         f"{fmt('p50_ms_b32', '.2f')} | {fmt('speedup_b32', '.2f')} | {fmt('flop_ratio', '.3f')} | "
                         f"{'—' if r.get('size_bytes') is None else format(r['size_bytes'] / 1e6, '.2f')} | "
                         f"{r.get('stop') or '—'} |")
        lines += ["", "Quantile ablation (one-shot mp-hist projection, no fine-tuning):", "",
                  "| q | parameters | accuracy |", "| --- | --- | --- |"]
        lines += [f"| {q} | {r['parameters']:,} | {r['accuracy']:.4f} ± {r['ci95']:.4f} |"
                  for q, r in task["quantiles"].items()]
        lines.append("")
    return "\n".join(lines)


def plots(results: dict[str, Any], folder: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for task in results["tasks"]:
        name = task["task"]["name"]
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for method, r in task["methods"].items():
            axes[0].errorbar(r["parameters"], r["accuracy"], yerr=r["ci95"], fmt="o", capsize=3)
            axes[0].annotate(method, (r["parameters"], r["accuracy"]), fontsize=7)
        axes[0].set_xscale("log")
        axes[0].set_xlabel("parameters")
        axes[0].set_ylabel("accuracy")
        axes[0].set_title(f"{name}: accuracy against parameters")
        qs = task["quantiles"]
        axes[1].plot([float(q) for q in qs], [1 - r["parameters"] / task["methods"]["original"]["parameters"]
                                              for r in qs.values()], "o-", label="reduction")
        axes[1].plot([float(q) for q in qs], [r["accuracy"] for r in qs.values()], "s-", label="accuracy")
        axes[1].set_xlabel("mp-hist quantile q")
        axes[1].legend()
        axes[1].set_title("quantile ablation (Fig. 5)")
        fig.tight_layout()
        fig.savefig(folder / f"{results['profile']}-{name}.png", dpi=110)
    plt.close("all")


def log(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {message}", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=sorted(PROFILES), default="quick")
    parser.add_argument("--tasks", default=None, help="comma-separated subset of the profile's tasks")
    parser.add_argument("--data-dir", default=None, help="evaluation data (default: $FXCOMPRESS_DATA)")
    parser.add_argument("--out", default=str(HERE / "results"), help="where the JSON and plots go")
    parser.add_argument("--markdown", default=str(HERE / "RESULTS.md"), help="the results table")
    parser.add_argument("--work", default="out/reproduce", help="checkpoints, spectra and ONNX files")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-drop", type=float, default=0.02, help="the accuracy floor is the baseline minus this")
    parser.add_argument("--repeats", type=int, default=2, help="latency repeats (alternating processes)")
    parser.add_argument("--min-runs", type=int, default=50)
    parser.add_argument("--min-seconds", type=float, default=1.0)
    parser.add_argument("--latency", default=None, help="comma-separated methods to time (default: all)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    tasks = [t for t in PROFILES[args.profile] if args.tasks is None or t.name in args.tasks.split(",")]
    results = {"profile": args.profile, "machine": f"{socket.gethostname()} ({platform.machine()}, "
                                                   f"{torch.get_num_threads()} threads)",
               "command": "python benchmarks/reproduce.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               "tasks": []}
    for task in tasks:  # the files are rewritten after every task, so a long run keeps what it finished
        results["tasks"].append(run_task(task, args))
        results["seconds"] = time.perf_counter() - start
        write(results, args)
    log(f"done in {results['seconds'] / 60:.1f} min")


def write(results: dict[str, Any], args) -> None:
    out = Path(args.out)
    machine = "cuda" if torch.cuda.is_available() else "cpu"
    write_text(out / f"{args.profile}-{machine}.json", json.dumps(results, indent=2))
    write_text(Path(args.markdown), markdown(results))
    plots(results, out)
    log(f"wrote {out}/{args.profile}-{machine}.json and {args.markdown}")


if __name__ == "__main__":
    main()
