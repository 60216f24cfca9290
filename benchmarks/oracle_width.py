"""The oracle-width study: is the width a rule reads off the spectrum the right width?

Per task and seed, a model is trained from scratch, then compressed in one shot to many widths
and fine-tuned with KD from the original for the same budget each time:

* a **uniform ratio** sweep (every group at r·d): the accuracy-against-parameters curve;
* each **rule**'s own per-group widths (mp-hist at q = 0.3 and 0.5, mp-robust, gavish-donoho,
  energy at τ = 0.9 and 0.95), and, for some, those widths times a **scale** (0.5, 1.5): is
  the rule's shape right, up to its level?

Every model is scored on the same test examples, so comparisons are **paired**: per candidate,
the accuracy difference to the original (and to RMT-KD's rule, mp-hist q = 0.5) with a 95 %
paired-bootstrap interval over test examples (seeds averaged inside each resample), and an exact
McNemar test on the discordant pairs, pooled over seeds. The **oracle** of a task is the
candidate with the fewest parameters whose mean paired difference to the original is at least
−1 point; each rule is then reported as its parameters over the oracle's (1.00: the oracle's
size; below 1: smaller than any candidate that keeps accuracy, so it lost more than a point).

CIFAR-10 tasks test on all 10,000 images of ``data_batch_5`` and validate on 1,000 held out of
the training batches. The GLUE tasks train a small BERT from scratch on 10,000 rows: SST-2
tests on its dev set (872 sentences: the only labelled split left after training), QNLI on its
dev set (5,463 pairs), QQP on the 20 % of GLUE dev (8,086 pairs) that its training rows were not
drawn from. Results go to ``<out>/oracle-<profile>.json``, ``<out>/ORACLE.md`` and a plot per
task; ``--markdown benchmarks/RESULTS.md`` also writes the tables into that file between its
``oracle-width`` markers (the rest of it is kept).

    python benchmarks/oracle_width.py --profile quick              # CIFAR-10 CNN and ResNet-20, 3 seeds
    python benchmarks/oracle_width.py --profile quick --tasks sst2,qqp,qnli  # the BERT-style GLUE tasks
    python benchmarks/oracle_width.py --profile quick --tasks sst2 --ratios 0.03125  # a supplement of ratios
    python benchmarks/oracle_width.py --profile mini               # the miniature make test runs
    python benchmarks/oracle_width.py --render a.json b.json --markdown benchmarks/RESULTS.md  # tables of runs
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
import time
import types
from pathlib import Path
from typing import Any

import numpy as np
import scipy.stats
import torch
from torch import nn

import fxcompress
from fxcompress.atomic import write_text
from fxcompress.calibrate import as_call
from fxcompress.compress import num_parameters
from fxcompress.datasets import cifar10, encode, glue, wordpiece
from fxcompress.distill import logits_of, split_batch
from fxcompress.results import write_section
from fxcompress.rmtkd import calibration_subset

sys.path.insert(0, str(Path(__file__).parent))
from reproduce import _token_batches, bert, cnn, log  # noqa: E402  (the reproduction's models and batching)

#: name → CompressConfig options of each rule under study (its own widths: agreement=None)
RULES = {name: dict(options, agreement=None) for name, options in {
    "mp-hist-q0.3": dict(rule="mp-hist", q=0.3), "mp-hist-q0.5": dict(rule="mp-hist", q=0.5),
    "mp-robust": dict(rule="mp-robust"), "gavish-donoho": dict(rule="gavish-donoho"),
    "energy-0.90": dict(rule="energy", tau=0.9), "energy-0.95": dict(rule="energy", tau=0.95)}.items()}
REFERENCE = "mp-hist-q0.5"  # RMT-KD's rule, the second reference of every paired comparison
TOLERANCE = 0.01  # the oracle keeps accuracy within one point of the original's


@dataclasses.dataclass(frozen=True)
class Task:
    name: str  # cifar-cnn, cifar-resnet20, or a GLUE task (sst2, qnli, qqp)
    train_rows: int
    test_rows: int | None  # None: the whole test split
    epochs: int
    tune_epochs: int
    batch: int
    lr: float
    model: dict[str, Any]
    ratios: tuple[float, ...]
    rules: tuple[str, ...]
    scales: tuple[float, ...]
    scaled_rules: tuple[str, ...]
    tune_steps: int | None = None
    # the agreement level (CompressConfig.agreement): each of these rules' shapes at each target
    level_rules: tuple[str, ...] = ()
    agreements: tuple[float, ...] = ()


_RATIOS = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75)
_TEXT_RATIOS = (0.03125, 0.0625) + _RATIOS  # the small BERTs keep their accuracy down to 0.125
_LEVEL_RULES, _AGREEMENTS = ("mp-hist-q0.5",), (0.8, 0.9)
_SMALL_BERT = dict(layers=2, hidden=128, heads=2, ffn=512, vocab=8000, max_len=64)
PROFILES = {
    "mini": [Task("cifar-cnn", 384, 256, 1, 1, 64, 2e-3, dict(widths=(8, 16)), (0.25, 0.5), ("mp-hist-q0.5", "mp-robust"),
                  (0.5,), ("mp-robust",), None, ("mp-robust",), (0.9,))],
    "quick": [Task("cifar-cnn", 6000, None, 6, 1, 64, 2e-3, dict(widths=(32, 64, 128)), _RATIOS, tuple(RULES),
                   (0.5, 1.5), ("mp-hist-q0.5", "mp-robust"), None, _LEVEL_RULES, _AGREEMENTS),
              Task("cifar-resnet20", 6000, None, 6, 1, 64, 2e-3, {}, _RATIOS, tuple(RULES),
                   (0.5, 1.5), ("mp-hist-q0.5", "mp-robust"), None, _LEVEL_RULES, _AGREEMENTS),
              Task("sst2", 10000, None, 3, 1, 64, 1e-3, _SMALL_BERT, _TEXT_RATIOS, tuple(RULES),
                   (0.5, 1.5), ("mp-hist-q0.5", "mp-robust"), 100, _LEVEL_RULES, _AGREEMENTS),
              Task("qqp", 10000, None, 3, 1, 64, 1e-3, dict(_SMALL_BERT, max_len=96), _TEXT_RATIOS, tuple(RULES),
                   (0.5, 1.5), ("mp-hist-q0.5", "mp-robust"), 100, _LEVEL_RULES, _AGREEMENTS),
              Task("qnli", 10000, None, 3, 1, 64, 1e-3, dict(_SMALL_BERT, max_len=128), _TEXT_RATIOS, tuple(RULES),
                   (0.5, 1.5), ("mp-hist-q0.5", "mp-robust"), 100, _LEVEL_RULES, _AGREEMENTS)],
}


# -- data and models ------------------------------------------------------------------------------
def resnet20(classes: int = 10) -> nn.Module:
    """He et al.'s CIFAR ResNet-20: three stages of three basic blocks, 16/32/64 channels
    (projection shortcuts where the shape changes)."""
    from torchvision.models.resnet import BasicBlock

    layers: list[nn.Module] = [nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True)]
    cin = 16
    for stage, width in enumerate((16, 32, 64)):
        for block in range(3):
            stride = 2 if stage and not block else 1
            down = nn.Sequential(nn.Conv2d(cin, width, 1, stride, bias=False), nn.BatchNorm2d(width)) \
                if stride != 1 or cin != width else None
            layers.append(BasicBlock(cin, width, stride, down))
            cin = width
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes))


#: the labelled split each GLUE task tests on (its training rows come from the other)
GLUE_TEST = {"sst2": "dev", "qnli": "dev", "qqp": "test"}


def task_data(task: Task, root: str | None, seed: int) -> tuple[Any, list, int | None]:
    """(train loader, test batches, vocabulary size): CIFAR-10 trains on ``train_rows`` of the
    first four batches (1,000 more held out, as a validation split would be) and tests on all of
    ``data_batch_5``; a GLUE task tests on :data:`GLUE_TEST`'s split. The test split is the same
    for every seed."""
    if task.name in GLUE_TEST:
        train = glue(task.name, "train", root)
        train = train.subset(np.random.default_rng(seed).permutation(len(train))[: task.train_rows])
        test = glue(task.name, GLUE_TEST[task.name], root)
        test = test.subset(np.arange(min(task.test_rows or len(test), len(test))))
        tok = wordpiece(train, task.model["vocab"])
        return (_token_batches(encode(tok, train, task.model["max_len"]), task.batch),
                _token_batches(encode(tok, test, task.model["max_len"]), 256), tok.get_vocab_size())
    x, y = cifar10(root, ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4"])
    picked = np.random.default_rng(seed).permutation(len(x))[1000:1000 + task.train_rows]
    train = torch.utils.data.TensorDataset(torch.from_numpy(x[picked]), torch.from_numpy(y[picked]))
    loader = torch.utils.data.DataLoader(train, batch_size=task.batch, shuffle=True,
                                         generator=torch.Generator().manual_seed(seed))
    xt, yt = cifar10(root, ["data_batch_5"])
    rows = task.test_rows or len(xt)
    return loader, _batches(xt[:rows], yt[:rows]), None


def _batches(x: np.ndarray, y: np.ndarray, size: int = 500) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(torch.from_numpy(x[i:i + size]), torch.from_numpy(y[i:i + size])) for i in range(0, len(x), size)]


def build(task: Task, vocab: int | None) -> nn.Module:
    if task.name == "cifar-resnet20":
        return resnet20()
    if task.name in GLUE_TEST:
        return bert(types.SimpleNamespace(model=task.model), vocab)
    return cnn(types.SimpleNamespace(model=task.model))


def logits(module: nn.Module, batches: list) -> torch.Tensor:
    """``module``'s logits on every (unlabelled) calibration batch, concatenated."""
    module.eval()
    with torch.no_grad():
        return torch.cat([logits_of(module(*a, **k)) for a, k in map(as_call, batches)]).float()


def fidelity(student: torch.Tensor, teacher: torch.Tensor) -> dict[str, float]:
    """How closely a one-shot narrowed model, before fine-tuning, still computes the original
    on the calibration inputs (no labels): top-1 agreement, and the logit error relative to the
    logits' spread (‖z − z₀‖ / ‖z₀ − mean z₀‖ over the batch)."""
    spread = (teacher - teacher.mean(0)).norm().clamp_min(1e-12)
    return {"agreement": float((student.argmax(-1) == teacher.argmax(-1)).float().mean()),
            "logit_error": float((student - teacher).norm() / spread)}


def correct(module: nn.Module, batches: list) -> np.ndarray:
    """Per test example: whether ``module``'s top-1 prediction is its label."""
    module.eval()
    hits = []
    with torch.no_grad():
        for batch in batches:
            args, kwargs, target = split_batch(batch)
            hits.append((logits_of(module(*args, **kwargs)).argmax(-1) == target).numpy())
    return np.concatenate(hits)


# -- one task ---------------------------------------------------------------------------------------
def run_seed(task: Task, seed: int, root: str | None, tune: bool = True) -> dict[str, Any]:
    """Every candidate's parameters, its fidelity to the original on the calibration inputs
    before fine-tuning, and (``tune``) its per-example test correctness after it, for one seed."""
    torch.manual_seed(seed)
    train, test, vocab = task_data(task, root, seed)
    model = build(task, vocab)
    start = time.perf_counter()
    fxcompress.distill(model, None, train, fxcompress.DistillConfig(alpha=1, epochs=task.epochs, lr=task.lr,
                                                                    weight_decay=0.01, progress=False, seed=seed))
    model.eval()
    calib = calibration_subset(train, 0.1, seed)
    reference = logits(model, calib)
    rows = {"original": {"parameters": num_parameters(model), "agreement": 1.0, "logit_error": 0.0,
                         "correct": correct(model, test)}}
    log(f"[{task.name} seed {seed}] original: {rows['original']['parameters']:,} parameters, accuracy "
        f"{rows['original']['correct'].mean():.4f} ({time.perf_counter() - start:.0f} s)")
    tuning = fxcompress.DistillConfig(alpha=0.5, temperature=2.0, epochs=task.tune_epochs, max_steps=task.tune_steps,
                                    lr=task.lr / 2, progress=False, seed=seed)

    def candidate(name: str, config: fxcompress.CompressConfig) -> fxcompress.CompressResult:
        t0 = time.perf_counter()
        result = fxcompress.compress(model, calib, config)
        student = result.module
        rows[name] = {"parameters": result.params_after, **fidelity(logits(student, calib), reference),
                      "widths": {r.name: [r.d, r.k] for r in result.report if r.rule is not None}}
        if tune:
            fxcompress.distill(student, model, train, tuning)
            rows[name]["correct"] = correct(student, test)
        log(f"[{task.name} seed {seed}] {name}: {result.params_after:,} parameters, agreement "
            f"{rows[name]['agreement']:.3f} before tuning" + (f", accuracy {rows[name]['correct'].mean():.4f}"
                                                               if tune else "") + f" ({time.perf_counter() - t0:.0f} s)")
        return result

    for rule in task.level_rules:
        for target in task.agreements:
            candidate(f"{rule}@{target:g}", fxcompress.CompressConfig(**{**RULES[rule], "agreement": target}, round_to=1))
    for ratio in task.ratios:
        candidate(f"uniform-{ratio:g}", fxcompress.CompressConfig(rule="fixed", ratio=ratio, round_to=1))
    for rule in task.rules:
        result = candidate(rule, fxcompress.CompressConfig(**RULES[rule], round_to=1))
        if rule not in task.scaled_rules:
            continue
        chosen = {r.name: (r.d, r.k) for r in result.report if r.rule is not None}
        for scale in task.scales:
            widths = {g: min(d, max(1, round(scale * k))) for g, (d, k) in chosen.items()}
            if any(k < chosen[g][0] for g, k in widths.items()):
                candidate(f"{rule}×{scale:g}", fxcompress.CompressConfig(rule="fixed", widths=widths, round_to=1))
    return rows


# -- statistics ---------------------------------------------------------------------------------------
def paired(candidate: np.ndarray, reference: np.ndarray, draws: int = 2000, seed: int = 0) -> dict[str, float]:
    """Seeds × examples of correctness, paired: the mean accuracy difference, its 95 % bootstrap
    interval over examples (the same resample in every seed), and McNemar's exact p-value on the
    discordant pairs pooled over seeds."""
    diff = candidate.astype(np.float64) - reference.astype(np.float64)  # (seeds, examples)
    rng = np.random.default_rng(seed)
    n = diff.shape[1]
    resampled = np.array([diff[:, rng.integers(0, n, n)].mean() for _ in range(draws)])
    gained, lost = int((diff > 0).sum()), int((diff < 0).sum())
    p = scipy.stats.binomtest(gained, gained + lost).pvalue if gained + lost else 1.0
    return {"diff": float(diff.mean()), "low": float(np.percentile(resampled, 2.5)),
            "high": float(np.percentile(resampled, 97.5)), "gained": gained, "lost": lost, "p": float(p)}


def summarize(seeds: list[dict[str, Any]]) -> dict[str, Any]:
    """Per candidate over seeds: mean parameters and accuracy, paired comparisons; the oracle."""
    names = [n for n in seeds[0] if all(n in s for s in seeds)]
    stack = {n: np.stack([s[n]["correct"] for s in seeds]) for n in names}
    rows = {}
    for name in names:
        rows[name] = {"parameters": float(np.mean([s[name]["parameters"] for s in seeds])),
                      "accuracy": float(stack[name].mean()),
                      "vs_original": paired(stack[name], stack["original"]),
                      "vs_rmt": paired(stack[name], stack[REFERENCE]) if REFERENCE in stack else None}
        rows[name].update(fidelity_means(seeds, name))
    return {"candidates": rows, "oracle": _oracle(rows), "seeds": len(seeds), "examples": int(stack["original"].shape[1])}


def _oracle(rows: dict[str, dict[str, Any]]) -> str:
    """The candidate with the fewest parameters whose mean paired difference to the original is
    at least −1 point (the original, if none); every row's ``to_oracle`` is set against it."""
    keeps = [n for n, r in rows.items() if n != "original" and r["vs_original"]["diff"] >= -TOLERANCE]
    oracle = min(keeps, key=lambda n: rows[n]["parameters"]) if keeps else "original"
    for row in rows.values():
        row["to_oracle"] = row["parameters"] / rows[oracle]["parameters"]
    return oracle


def fidelity_means(seeds: list[dict[str, Any]], name: str) -> dict[str, float]:
    """A candidate's fidelity before tuning, averaged over seeds (where it was measured)."""
    return {key: float(np.mean([s[name][key] for s in seeds])) for key in FIDELITY if key in seeds[0][name]}


FIDELITY = ("agreement", "logit_error")


# -- output -----------------------------------------------------------------------------------------
def markdown(results: dict[str, Any]) -> str:
    runs = "; ".join(f"`{run['command']}` ({run['minutes']:.0f} min, {run['machine']})" for run in results["runs"])
    lines = [f"{runs}. Paired over the same test examples; Δ = accuracy − original's, in points, with its 95 % paired-bootstrap "
             "interval; p: McNemar's exact test (discordant pairs pooled over seeds); ×oracle: parameters over the "
             "oracle's (the fewest parameters within 1 point of the original).", ""]
    lines += rule_table(results) + [""]
    for name, task in results["tasks"].items():
        s = task["summary"]
        agreed = all("agreement" in row for row in s["candidates"].values())
        lines += [f"**{name}** ({s['seeds']} seeds, {s['examples']:,} test examples; oracle: `{s['oracle']}`)", "",
                  "| candidate | parameters | ×oracle | accuracy | Δ vs original | p | Δ vs mp-hist q0.5 | p |"
                  + (" agreement before KD |" if agreed else ""),
                  "| --- | ---: | ---: | ---: | --- | ---: | --- | ---: |" + (" ---: |" if agreed else "")]
        for cand, row in sorted(s["candidates"].items(), key=lambda kv: -kv[1]["parameters"]):
            vo, vr = row["vs_original"], row["vs_rmt"]
            mark = " ★" if cand == s["oracle"] else ""
            lines.append(f"| {cand}{mark} | {row['parameters']:,.0f} | {row['to_oracle']:.2f} | {row['accuracy']:.4f} | "
                         f"{_points(vo)} | {vo['p']:.3g} | {_points(vr) if vr else '—'} | {format(vr['p'], '.3g') if vr else '—'} |"
                         + (f" {row['agreement']:.3f} |" if agreed else ""))
        lines += ["", f"Accuracy against parameters, each rule's point and the oracle marked: `{plot_name(name)}`.", ""]
    return "\n".join(lines)


def agreement_pick(summary: dict[str, Any], target: float) -> str | None:
    """What a rule that sets the level by fidelity would take from the sweep: the candidate
    (other than the agreement levels themselves) with the fewest parameters whose agreement with
    the original before KD, on the calibration inputs, is at least ``target`` (no labels, no
    test data)."""
    rows = summary["candidates"]
    ok = [n for n, r in rows.items() if n != "original" and "@" not in n and r.get("agreement", -1) >= target]
    return min(ok, key=lambda n: rows[n]["parameters"]) if ok else None


AGREEMENT_TARGETS = (0.8, 0.9, 0.95)


def rule_table(results: dict[str, Any]) -> list[str]:
    """Each rule's parameters over the oracle's, and its Δ to the original, task by task."""
    tasks = results["tasks"]
    summaries = {name: task["summary"] for name, task in tasks.items()}
    lines = ["| rule | " + " | ".join(f"{n}: ×oracle, Δ" for n in summaries) + " |",
             "| --- |" + " --- |" * len(summaries)]
    measured = {n for n, s in summaries.items() if all("agreement" in r for r in s["candidates"].values())}
    picks = {f"agreement ≥ {t:g} before KD (pick)": {n: agreement_pick(s, t) if n in measured else None
                                                     for n, s in summaries.items()} for t in AGREEMENT_TARGETS}
    levels = sorted({c for s in summaries.values() for c in s["candidates"] if "@" in c})
    rows = {rule: {n: rule for n in summaries} for rule in (*RULES, *levels)} | (picks if measured else {})
    for rule, chosen in rows.items():
        cells = []
        for name, s in summaries.items():
            row = s["candidates"].get(chosen[name]) if chosen[name] else None
            pick = f" `{chosen[name]}`" if rule in picks and chosen[name] else ""
            cells.append("—" if row is None else f"{row['to_oracle']:.2f}, {100 * row['vs_original']['diff']:+.2f}{pick}")
        lines.append(f"| {rule} | " + " | ".join(cells) + " |")
    return lines


def _points(c: dict[str, float]) -> str:
    return f"{100 * c['diff']:+.2f} [{100 * c['low']:+.2f}, {100 * c['high']:+.2f}]"


def plot(name: str, summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["candidates"]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    sweep = sorted((r["parameters"], r["accuracy"]) for n, r in rows.items() if n.startswith("uniform-") or n == "original")
    ax.plot(*zip(*sweep), "o-", color="#999999", label="uniform ratio")
    for cand, row in rows.items():
        if cand.startswith("uniform-") or cand == "original":
            continue
        ax.plot(row["parameters"], row["accuracy"], "s" if "×" not in cand else "x", ms=6)
        ax.annotate(cand, (row["parameters"], row["accuracy"]), fontsize=6, xytext=(3, 3), textcoords="offset points")
    oracle = rows[summary["oracle"]]
    ax.plot(oracle["parameters"], oracle["accuracy"], "*", ms=14, color="#d62728", label=f"oracle ({summary['oracle']})")
    ax.axhline(rows["original"]["accuracy"] - TOLERANCE, color="#d62728", ls=":", lw=1, label="original − 1 point")
    ax.set_xscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel("test accuracy (mean over seeds)")
    ax.set_title(name)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_markdown_section(path: Path, text: str) -> None:
    """Put ``text`` between the oracle-width markers of ``path``, keeping everything else."""
    write_section(path, "oracle-width", "Oracle width: is the spectrum's width the right width?", text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="quick", choices=sorted(PROFILES))
    parser.add_argument("--tasks", default=None, help="comma-separated task names of the profile (default all)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--levels-only", action="store_true",
                        help="only the agreement-level candidates: a supplement that --render merges into a full run "
                             "of the same seeds")
    parser.add_argument("--ratios", default=None, type=lambda text: tuple(float(r) for r in text.split(",")),
                        help="only these uniform ratios (comma-separated): a supplement, as --levels-only")
    parser.add_argument("--out", default="out/oracle")
    parser.add_argument("--markdown", default=None, help="also write the tables into this file's oracle-width section")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--tag", default=None, help="a label for this run's tasks in the tables (what differs from "
                                                    "other runs of the same tasks)")
    parser.add_argument("--fidelity-only", action="store_true",
                        help="no fine-tuning or test: each candidate's fidelity before tuning, for --render to merge "
                             "into a full run of the same seeds")
    parser.add_argument("--render", nargs="+", default=None, metavar="JSON",
                        help="no runs: tables and plots from these runs' oracle-*.json, their tasks side by side")
    args = parser.parse_args(argv)
    tasks = [t for t in PROFILES[args.profile] if args.tasks is None or t.name in args.tasks.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    command = "python benchmarks/oracle_width.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    if args.render:
        return render([json.loads(Path(p).read_text()) for p in args.render], out, args.markdown)
    results = {"runs": [{"command": command, "machine": f"{torch.get_num_threads()} threads", "minutes": 0.0}],
               "tasks": {}, "tag": args.tag}
    supplement = bool(args.levels_only or args.ratios)
    for task in tasks:
        # a supplement runs the candidates asked for alone (the full task stays in the JSON)
        part = task if not supplement else dataclasses.replace(
            task, ratios=args.ratios or (), rules=(), level_rules=task.level_rules if args.levels_only else ())
        seeds = [run_seed(part, seed, args.data_dir, tune=not args.fidelity_only) for seed in range(args.seeds)]
        entry = {"task": dataclasses.asdict(task), "widths": {n: s[n].get("widths") for s in seeds[:1] for n in s}}
        if args.fidelity_only:
            entry["fidelity"] = {n: {"parameters": float(np.mean([s[n]["parameters"] for s in seeds])),
                                     **fidelity_means(seeds, n)} for n in seeds[0]}
        else:
            entry["summary"] = summarize(seeds)
            entry["supplement"] = supplement
        results["tasks"][task.name] = entry
    results["runs"][0]["minutes"] = (time.perf_counter() - start) / 60
    kind = "fidelity" if args.fidelity_only else "oracle"
    write_text(out / f"{kind}-{args.profile}.json", json.dumps(results, indent=1, default=_jsonable))
    return 0 if args.fidelity_only or supplement else render([results], out, args.markdown)


def render(runs: list[dict[str, Any]], out: Path, markdown_path: str | None) -> int:
    """Tables (and plots) of one or more runs' JSON, their tasks side by side."""
    merged = {"runs": [r for run in runs for r in run.get("runs") or [
        {"command": run["command"], "machine": run["machine"], "minutes": run["minutes"]}]],
              "tasks": {_tagged(name, run): task for run in runs for name, task in run["tasks"].items()
                        if "summary" in task and not task.get("supplement")}}
    for name, task in ((_tagged(n, run), t) for run in runs for n, t in run["tasks"].items() if t.get("supplement")):
        _merge_supplement(merged["tasks"][name]["summary"], task["summary"], name)
    for name, task in ((_tagged(n, run), t) for run in runs for n, t in run["tasks"].items() if "fidelity" in t):
        _merge_fidelity(merged["tasks"][name]["summary"], task["fidelity"], name)
    for name, task in merged["tasks"].items():
        plot(name, task["summary"], out / plot_name(name))
    text = markdown(merged)
    write_text(out / "ORACLE.md", text)
    if markdown_path:
        write_markdown_section(Path(markdown_path), text)
    print(text)
    return 0


def plot_name(task: str) -> str:
    """The file name of a task's accuracy-against-parameters plot."""
    return "oracle-" + task.replace(" ", "-").replace("(", "").replace(")", "") + ".png"


def _tagged(name: str, run: dict[str, Any]) -> str:
    return f"{name} ({run['tag']})" if run.get("tag") else name


def _merge_supplement(summary: dict[str, Any], extra: dict[str, Any], task: str) -> None:
    """Add a supplement's candidates to a full run's: the same seeds train the same originals
    (checked by their accuracy), so the paired comparisons with the original stand. The oracle
    is found again among all of them; the comparison with mp-hist is missing where the
    supplement lacks it."""
    mine, theirs = summary["candidates"]["original"], extra["candidates"]["original"]
    if (mine["parameters"], mine["accuracy"]) != (theirs["parameters"], theirs["accuracy"]):
        raise SystemExit(f"{task}: the supplement's originals differ from the full run's (same profile and seeds?)")
    summary["candidates"].update({name: row for name, row in extra["candidates"].items() if name != "original"})
    summary["oracle"] = _oracle(summary["candidates"])


def _merge_fidelity(summary: dict[str, Any], fidelity: dict[str, Any], task: str) -> None:
    """Put a fidelity-only run's measurements into a full run's candidates: the same seeds train
    the same originals, so every candidate must have the same parameters in both."""
    for name, row in summary["candidates"].items():
        if name not in fidelity or fidelity[name]["parameters"] != row["parameters"]:
            raise SystemExit(f"{task}: the fidelity run does not match the full run at {name!r} "
                             "(run both with the same profile and seeds)")
        row.update({k: fidelity[name][k] for k in FIDELITY})


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(type(value).__name__)


if __name__ == "__main__":
    sys.exit(main())
