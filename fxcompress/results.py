"""Benchmark results as files: ``results.json``, a flat CSV with dotted keys, a markdown
table, and PNG plots (latency distributions; energy per inference where measured). Every
file is written atomically."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from fxcompress.atomic import atomic_path, write_text


def write_results(results: dict[str, Any], out: str | Path) -> list[Path]:
    """Write every result file into ``out``; return their paths."""
    out = Path(out)
    slim = _without_samples(results)
    paths = [out / "results.json", out / "results.csv", out / "results.md"]
    write_text(paths[0], json.dumps(slim, indent=2))
    write_text(paths[1], to_csv(slim))
    write_text(paths[2], to_markdown(slim))
    paths += plot(results, out)
    return paths


def write_section(path: str | Path, name: str, heading: str, text: str) -> None:
    """Put ``## heading`` and ``text`` between the ``<!-- name:start -->`` and ``<!-- name:end -->``
    markers of the markdown file ``path`` (appended where they are absent), keeping the rest."""
    path = Path(path)
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    block = f"{start}\n## {heading}\n\n{text}\n{end}"
    new = old[:old.index(start)] + block + old[old.index(end) + len(end):] if start in old and end in old \
        else f"{old.rstrip()}\n\n{block}\n"
    write_text(path, new)


def rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One flat row per model and batch size, keys dotted (``latency_ms.p50.median``)."""
    out = []
    for model in results["models"]:
        for batch, summary in model["batches"].items():
            row = {"model": model["name"], "path": model["path"], "batch": int(batch), "parameters": model["parameters"],
                   "size_bytes": model["size_bytes"], "flops_per_sample": model["flops_per_sample"],
                   "accuracy": (model.get("accuracy") or {}).get("value")}
            row.update(_flatten(summary))
            out.append(row)
    return out


def to_csv(results: dict[str, Any]) -> str:
    table = rows(results)
    keys = list(dict.fromkeys(k for row in table for k in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=keys)
    writer.writeheader()
    writer.writerows(table)
    return buffer.getvalue()


def to_markdown(results: dict[str, Any]) -> str:
    env = results["environment"]
    lines = [f"# fxcompress-bench: {len(results['models'])} models on {env['device']} "
             f"({env.get('cpu')}, {env.get('cores')} cores{', ' + env['gpu']['name'] if env.get('gpu') else ''})", "",
             "Medians over repeats, (min–max) across repeats; ratios are to the first model.", "",
             "| model | batch | params | size MB | accuracy | GFLOPs/sample | p50 ms | p99 ms | throughput /s | "
             "latency ratio | FLOP ratio | energy J/inf |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for model in results["models"]:
        for batch, s in model["batches"].items():
            ratio = s["ratio_to_first"]
            lat = ratio["latency_p50"]
            energy = s["energy"]
            joules = energy.get("joules_per_inference")
            flops, flop_ratio = model["flops_per_sample"], ratio["flops"]
            accuracy = (model.get("accuracy") or {}).get("value")
            lines.append(
                f"| {model['name']} | {batch} | {model['parameters']:,} | {model['size_bytes'] / 1e6:.2f} | "
                f"{'—' if accuracy is None else format(accuracy, '.4f')} | "
                f"{'—' if flops is None else format(flops / 1e9, '.3g')} | {_med(s['latency_ms']['p50'])} | "
                f"{_med(s['latency_ms']['p99'])} | {_med(s['throughput_per_s'], '.1f')} | {_med(lat, '.3f')} | "
                f"{'—' if flop_ratio is None else format(flop_ratio, '.3f')} | "
                f"{_med(joules, '.4g') if isinstance(joules, dict) else 'null¹'} |")
    reasons = sorted({s["energy"]["reason"] for m in results["models"] for s in m["batches"].values()
                      if s["energy"].get("reason")})
    if reasons:
        lines += ["", "¹ no energy figure: " + "; ".join(reasons)]
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    batches = list(results["models"][0]["batches"])
    fig, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 4), squeeze=False)
    for ax, batch in zip(axes[0], batches):
        data = [sum(m["batches"][batch]["samples_ms"], []) for m in results["models"]]
        ax.boxplot(data, showfliers=False)
        ax.set_xticks(range(1, len(data) + 1), [m["name"] for m in results["models"]], rotation=20)
        ax.set_title(f"batch {batch}")
        ax.set_ylabel("latency (ms)")
    fig.tight_layout()
    written.append(_save(fig, out / "latency.png"))
    scored = [m for m in results["models"] if m.get("accuracy")]
    if scored:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot([m["parameters"] for m in scored], [m["accuracy"]["value"] for m in scored], "o")
        for m in scored:
            ax.annotate(m["name"], (m["parameters"], m["accuracy"]["value"]), fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel("parameters")
        ax.set_ylabel(f"accuracy ({scored[0]['accuracy']['dataset']})")
        fig.tight_layout()
        written.append(_save(fig, out / "accuracy.png"))
    measured = [m for m in results["models"] if isinstance(m["batches"][batches[0]]["energy"].get("joules_per_inference"), dict)]
    if measured:
        fig, ax = plt.subplots(figsize=(6, 4))
        for batch in batches:
            ax.plot([m["parameters"] for m in measured],
                    [m["batches"][batch]["energy"]["joules_per_inference"]["median"] for m in measured], "o-",
                    label=f"batch {batch}")
        ax.set_xlabel("parameters")
        ax.set_ylabel("energy per inference (J)")
        ax.legend()
        fig.tight_layout()
        written.append(_save(fig, out / "energy.png"))
    plt.close("all")
    return written


def _save(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    return path


def _med(value: Any, fmt: str = ".3f") -> str:
    if not isinstance(value, dict):
        return "—"
    return f"{value['median']:{fmt}} ({value['min']:{fmt}}–{value['max']:{fmt}})"


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}{key}."))
        return out
    if isinstance(value, list):
        return {prefix[:-1]: json.dumps(value)}
    return {prefix[:-1]: value}


def _without_samples(results: dict[str, Any]) -> dict[str, Any]:
    slim = json.loads(json.dumps(results))
    for model in slim["models"]:
        for summary in model["batches"].values():
            summary.pop("samples_ms", None)
    return slim
