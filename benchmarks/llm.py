"""SmolLM2-135M against the peers, one run, side by side: perplexity at equal size.

Every method cuts SmolLM2-135M-Instruct (the ``pretrained`` extra) to a budget of its
parameters outside the embedding, calibrated on QNLI train passages, and is scored by
perplexity on QNLI dev passages (text the calibration never saw), one shot:

- fxcompress, the rule's widths scaled to the budget (``CompressConfig(params=…)``): the
  uniform shape (every group cut alike), ``mp-hist`` (the paper's), ``mp-robust``, the
  residual stream alone, the MLPs alone; and the default (the fidelity level, its own size);
- a SliceGPT-style slicing of the stream (``slicegpt.py``: PCA with folded norms, one width,
  its shortcut matrices counted);
- Torch-Pruning's documented LLM width pruning (``MetaPruner``, L2-magnitude group importance,
  hidden size and heads at one ratio, ``lm_head`` ignored), at the ratio whose size matches,
  given ``--peer-seconds`` to build its groups (1.6.1 never returns on transformers 5's Llama:
  its row says so); and the same importance on fxcompress's groups (``transform="magnitude"``:
  the channels whose producer weights have the largest L2 norm, uniform widths, no read-back).

Then the best two at ``--kd-budget`` are distilled from the original for ``--kd-steps`` steps
on QNLI train text and scored again. Each row records its compress time and the peak memory
above the process's resident set before it (sampled every 20 ms). Output: a JSON file, a table
and a plot, and with ``--markdown`` the table in that file between its ``llm`` markers.

    python benchmarks/llm.py --markdown benchmarks/RESULTS.md          # the full run
    python benchmarks/llm.py --profile mini                            # a minute: a tiny random Llama
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import transformers
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fxcompress  # noqa: E402
import pretrained  # noqa: E402
import slicegpt  # noqa: E402
from fxcompress import CompressConfig, DistillConfig  # noqa: E402
from fxcompress.atomic import write_text  # noqa: E402
from fxcompress.compress import outside_embeddings  # noqa: E402
from fxcompress.results import write_section  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Profile:
    model: str  # "smollm2" or "tiny" (a random 2-layer Llama on bytes: the miniature)
    calibration: int  # sequences
    evaluation: int
    length: int
    budgets: tuple[float, ...]
    kd_budget: float
    kd_steps: int
    kd_lr: float
    peer_seconds: int  # Torch-Pruning's time to build its groups, per pruning


PROFILES = {
    "full": Profile("smollm2", 16, 32, 128, (0.9, 0.75, 0.6), 0.75, 100, 5e-5, 120),
    "mini": Profile("tiny", 8, 4, 32, (0.75,), 0.75, 3, 1e-3, 5),
}


@dataclasses.dataclass
class Row:
    method: str
    budget: float | None
    kept: float  # parameters outside the embedding, over the original's
    perplexity: float
    seconds: float
    peak_mib: float | None
    note: str = ""
    kd_perplexity: float | None = None


# -- the model and its text ---------------------------------------------------------------------
class Bytes:
    """A tokenizer for the miniature: a text's UTF-8 bytes."""

    def __call__(self, text: str) -> dict[str, list[int]]:
        return {"input_ids": list(text.encode("utf-8"))}


def load(profile: Profile) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """``(model, calibration ids, evaluation ids)``: calibration from QNLI train, evaluation
    from QNLI dev (``length + 1`` tokens a sequence: the KD step's inputs and next tokens)."""
    if profile.model == "smollm2":
        tokenizer, model = pretrained.smollm2()
    else:
        torch.manual_seed(0)
        tokenizer = Bytes()
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, tie_word_embeddings=True)).eval()
    n = profile.length
    calibration = pretrained.qnli_tokens(tokenizer, "train", profile.calibration, n + 1)
    evaluation = pretrained.qnli_tokens(tokenizer, "dev", profile.evaluation, n)
    return model, calibration, evaluation


def batches(ids: torch.Tensor, size: int = 4) -> list[torch.Tensor]:
    return list(ids[:, :-1].split(size))


# -- measuring ---------------------------------------------------------------------------------
@contextlib.contextmanager
def peak_memory() -> Iterator[list[float | None]]:
    """The peak resident set above the one at entry, in MiB, as ``[value]`` after the block
    (sampled every 20 ms from /proc; None where that cannot be read)."""
    status = Path("/proc/self/status")

    def rss() -> float | None:
        try:
            line = next(l for l in status.read_text().splitlines() if l.startswith("VmRSS:"))
            return int(line.split()[1]) / 1024
        except (OSError, StopIteration):
            return None

    start, peak, done, out = rss(), [rss()], threading.Event(), [None]

    def sample():
        while not done.wait(0.02):
            peak[0] = max(filter(None, (peak[0], rss())), default=None)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield out
    finally:
        done.set()
        thread.join()
        out[0] = None if start is None or peak[0] is None else peak[0] - start


def non_embedding(model: nn.Module) -> int:
    """Parameters of a transformers causal LM outside its embedding (a tied head is the embedding)."""
    embed = model.get_input_embeddings().weight
    return sum(p.numel() for p in model.parameters() if p is not embed)


# -- the methods: each returns (module input_ids → logits, parameters outside the embedding) ----
def fxcompress_method(config: CompressConfig) -> Callable:
    def run(model, calibration, budget, profile):
        lm = pretrained.Logits(model).eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            result = fxcompress.compress(lm, batches(calibration), dataclasses.replace(config, params=budget)
                                         if budget is not None else config)
        note = "" if result.level is None else f"level ×{result.level[0]:.3f} ({result.level_by} {result.level[1]:.3f})"
        return result.module, outside_embeddings(result.module), note
    return run


def slicegpt_method(model, calibration, budget, profile):
    k = slicegpt.width_for(model, int(budget * non_embedding(model)))
    sliced = slicegpt.SlicedLlama(model, calibration[:, :-1], k).eval()
    return sliced, slicegpt.non_embedding_parameters(sliced), f"stream width {k}"


def torch_pruning_method(model, calibration, budget, profile):
    """Torch-Pruning's LLM example, at the one ratio ``r`` for hidden size and heads whose
    parameters match ``budget``: each linear loses about ``r`` of each side, so ``(1 − r)² ≈
    budget`` to start; a second pruning corrects by the size the first one reached."""
    import torch_pruning as tp

    total = non_embedding(model)
    ratio, pruned = 1 - math.sqrt(budget), None
    for _ in range(2):
        pruned = _tp_prune(tp, model, calibration, ratio, profile.peer_seconds)
        kept = non_embedding(pruned) / total
        ratio = 1 - (1 - ratio) * math.sqrt(budget / kept)
    return pretrained.Logits(pruned).eval(), non_embedding(pruned), f"ratio {ratio:.3f}"


class TimeLimit(RuntimeError):
    pass


@contextlib.contextmanager
def time_limit(seconds: int) -> Iterator[None]:
    """Raise :class:`TimeLimit` in the main thread after ``seconds`` (a peer that never returns)."""
    def stop(*_):
        raise TimeLimit(f"no result in {seconds} s")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _tp_prune(tp, model, calibration, ratio, seconds):
    model = copy.deepcopy(model)
    config = model.config
    heads = {}
    for module in model.modules():
        if hasattr(module, "q_proj"):
            heads.update({module.q_proj: config.num_attention_heads, module.k_proj: config.num_key_value_heads,
                          module.v_proj: config.num_key_value_heads})
    with time_limit(seconds), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        pruner = _tp_pruner(tp, model, calibration, ratio, heads)
        for group in pruner.step(interactive=True):
            group.prune()
    # the attributes the example updates by hand: the modules keep widths of their own
    config.hidden_size = model.lm_head.in_features
    for module in model.modules():
        if hasattr(module, "q_proj"):
            module.num_key_value_groups = module.q_proj.out_features // module.k_proj.out_features
        if hasattr(module, "gate_proj"):
            config.intermediate_size = module.gate_proj.out_features
    return model.eval()


def _tp_pruner(tp, model, calibration, ratio, heads):
    return tp.pruner.MetaPruner(
        model, example_inputs=calibration[:1, :-1], importance=tp.importance.GroupMagnitudeImportance(p=2),
        global_pruning=False, pruning_ratio=ratio, ignored_layers=[model.lm_head], num_heads=heads,
        prune_num_heads=True, prune_head_dims=False, head_pruning_ratio=ratio, round_to=4,
        output_transform=lambda out: out.logits)


METHODS: dict[str, tuple[Callable, bool]] = {  # name: (method, takes a budget)
    "fxcompress uniform": (fxcompress_method(CompressConfig(rule="fixed", ratio=1.0)), True),
    "fxcompress mp-hist": (fxcompress_method(CompressConfig(rule="mp-hist")), True),
    "fxcompress mp-robust": (fxcompress_method(CompressConfig(rule="mp-robust")), True),
    "fxcompress stream only": (fxcompress_method(CompressConfig(rule="fixed", ratio=1.0, targets="*lm_head")), True),
    "fxcompress MLPs only": (fxcompress_method(CompressConfig(rule="fixed", ratio=1.0, targets="*mlp*")), True),
    "SliceGPT-style": (slicegpt_method, True),
    "Torch-Pruning (magnitude)": (torch_pruning_method, True),
    "magnitude pruning (fxcompress groups)": (fxcompress_method(CompressConfig(rule="fixed", ratio=1.0, transform="magnitude",
                                                                              reconstruct=False, fold_mean=False)), True),
    "fxcompress default": (fxcompress_method(CompressConfig()), False),
}


def measure(name: str, model: nn.Module, calibration: torch.Tensor, evaluation: torch.Tensor,
            budget: float | None, profile: Profile) -> tuple[Row, nn.Module | None]:
    method, _ = METHODS[name]
    total = non_embedding(model)
    start = time.perf_counter()
    try:
        with peak_memory() as peak:
            module, params, note = method(model, calibration, budget, profile)
    except Exception as exc:  # a peer that fails on this model is a row that says how
        return Row(name, budget, float("nan"), float("nan"), time.perf_counter() - start, None,
                   f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"), None
    seconds = time.perf_counter() - start
    row = Row(name, budget, params / total, pretrained.perplexity(module, evaluation), seconds, peak[0], note)
    print(f"  {name:28s} budget {budget}: kept {row.kept:.3f}, perplexity {row.perplexity:.2f} "
          f"({seconds:.0f} s) {note}", flush=True)
    return row, module


# -- distillation --------------------------------------------------------------------------------
def distil(student: nn.Module, teacher: nn.Module, calibration: torch.Tensor, profile: Profile) -> None:
    """``kd_steps`` steps of the RMT-KD loss (α = 0.5, T = 1) against the original, on QNLI
    train text: next-token targets, the teacher's distribution at every position."""
    ids = calibration.repeat(math.ceil(profile.kd_steps * 4 / len(calibration)), 1)
    data = [(x[:, :-1], x[:, 1:]) for x in ids.split(4)][:profile.kd_steps]
    config = DistillConfig(alpha=0.5, lr=profile.kd_lr, epochs=1, max_steps=profile.kd_steps, progress=False,
                           log_every=max(profile.kd_steps // 5, 1))
    fxcompress.distill(student, teacher, data, config, evaluate=lambda _: float("nan"))


# -- the run ----------------------------------------------------------------------------------------
def run(profile: Profile, methods: list[str]) -> dict:
    model, calibration, evaluation = load(profile)
    original = pretrained.perplexity(pretrained.Logits(model).eval(), evaluation)
    print(f"original: perplexity {original:.2f}, {non_embedding(model):,} parameters outside the embedding", flush=True)
    rows, modules = [], {}
    for budget in profile.budgets:
        for name in methods:
            if METHODS[name][1]:
                if any(r.method == name and r.note.startswith("failed: TimeLimit") for r in rows):
                    continue  # a peer that never returned once is not waited for again
                row, module = measure(name, model, calibration, evaluation, budget, profile)
                rows.append(row)
                if budget == profile.kd_budget and module is not None:
                    modules[name] = (row, module)
    for name in methods:
        if not METHODS[name][1]:
            rows.append(measure(name, model, calibration, evaluation, None, profile)[0])
    ranked = sorted((r.perplexity, name) for name, (r, _) in modules.items() if math.isfinite(r.perplexity))
    teacher = pretrained.Logits(model).eval()
    for _, name in ranked[:2]:
        row, module = modules[name]
        distil(module, teacher, calibration, profile)
        row.kd_perplexity = pretrained.perplexity(module.eval(), evaluation)
        print(f"  {name} after {profile.kd_steps} KD steps: perplexity {row.kd_perplexity:.2f}", flush=True)
    return {"profile": dataclasses.asdict(profile), "original_perplexity": original,
            "non_embedding_parameters": non_embedding(model), "threads": torch.get_num_threads(),
            "rows": [dataclasses.asdict(r) for r in rows]}


def table(result: dict) -> str:
    p, original = result["profile"], result["original_perplexity"]
    model = "SmolLM2-135M-Instruct" if p["model"] == "smollm2" else "A random 2-layer Llama on UTF-8 bytes"
    lines = [f"{model} (float32), {result['non_embedding_parameters']:,} parameters outside the "
             f"embedding; calibration: {p['calibration']} × {p['length']} tokens of QNLI train passages; "
             f"perplexity on {p['evaluation']} × {p['length']} tokens of QNLI dev passages; original "
             f"**{original:.2f}**; {result['threads']} threads. ×orig: perplexity over the original's. "
             f"KD: {p['kd_steps']} steps (batch 4, α = 0.5, lr {p['kd_lr']:g}) from the original, at budget "
             f"{p['kd_budget']:g}, for the two best one-shot rows there.", "",
             "| budget | method | kept | perplexity | ×orig | after KD | compress s | peak MiB | note |",
             "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in result["rows"]:
        kd = "" if r["kd_perplexity"] is None else f"{r['kd_perplexity']:.2f}"
        peak = "" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
        budget = "—" if r["budget"] is None else f"{r['budget']:.2f}"
        lines.append(f"| {budget} | {r['method']} | {r['kept']:.3f} | {r['perplexity']:.2f} | "
                     f"{r['perplexity'] / original:.2f} | {kd} | {r['seconds']:.0f} | {peak} | {r['note']} |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    methods = dict.fromkeys(r["method"] for r in result["rows"])
    for method in methods:
        points = sorted((r["kept"], r["perplexity"]) for r in result["rows"] if r["method"] == method
                        and math.isfinite(r["perplexity"]))
        if points:
            ax.plot(*zip(*points), marker="o", label=method)
    ax.axhline(result["original_perplexity"], color="black", linestyle=":", label="original")
    ax.set_yscale("log")
    ax.set_xlabel("parameters outside the embedding kept (fraction)")
    ax.set_ylabel("QNLI dev perplexity (log)")
    ax.set_title("SmolLM2-135M, one shot")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_markdown_section(path: Path, text: str) -> None:
    """Put ``text`` between the llm markers of ``path``, keeping everything else."""
    write_section(path, "llm", "A real LLM: SmolLM2-135M against the peers", text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="full", choices=sorted(PROFILES))
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated, of: " + ", ".join(METHODS))
    parser.add_argument("--budgets", default=None, help="comma-separated fractions (default the profile's)")
    parser.add_argument("--kd-steps", type=int, default=None)
    parser.add_argument("--peer-seconds", type=int, default=None, help="Torch-Pruning's time per pruning")
    parser.add_argument("--out", default="benchmarks/results/llm")
    parser.add_argument("--markdown", default=None, help="write the table into this file between its llm markers")
    args = parser.parse_args(argv)
    profile = PROFILES[args.profile]
    if args.budgets:
        budgets = tuple(float(b) for b in args.budgets.split(","))
        profile = dataclasses.replace(profile, budgets=budgets, kd_budget=budgets[0] if profile.kd_budget not in
                                      budgets else profile.kd_budget)
    if args.kd_steps is not None:
        profile = dataclasses.replace(profile, kd_steps=args.kd_steps)
    if args.peer_seconds is not None:
        profile = dataclasses.replace(profile, peer_seconds=args.peer_seconds)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {list(METHODS)}")
    result = run(profile, methods)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / f"llm-{args.profile}.json", json.dumps(result, indent=1))
    plot(result, out / f"llm-{args.profile}.png")
    image = out / f"llm-{args.profile}.png"
    text = table(result) + f"\n\n![perplexity against size]" \
        f"({os.path.relpath(image, Path(args.markdown).parent) if args.markdown else image})\n"
    print(text)
    if args.markdown:
        write_markdown_section(Path(args.markdown), text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
