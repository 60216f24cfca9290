"""A miniature of benchmarks/reproduce.py (a few hundred SST-2, QQP and CIFAR-10 rows), so the
reproduction code cannot rot: every method runs, and the JSON, tables and plots appear."""

import importlib.util
import json
import sys
from pathlib import Path

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "reproduce.py"


def test_the_miniature_reproduction_runs_end_to_end(data_root, tmp_path, monkeypatch):
    monkeypatch.setenv("FXCOMPRESS_CACHE", str(tmp_path / "cache"))
    spec = importlib.util.spec_from_file_location("reproduce", SCRIPT)
    reproduce = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "reproduce", reproduce)  # dataclasses look their module up there
    spec.loader.exec_module(reproduce)
    reproduce.main(["--profile", "mini", "--data-dir", str(data_root), "--out", str(tmp_path), "--markdown",
                    str(tmp_path / "RESULTS.md"), "--work", str(tmp_path / "work"), "--repeats", "1",
                    "--min-runs", "3", "--min-seconds", "0", "--latency", "rmt-mp-hist,magnitude"])
    results = json.loads((tmp_path / "mini-cpu.json").read_text())
    tasks = {t["task"]["name"]: t for t in results["tasks"]}
    assert list(tasks) == ["sst2", "qqp", "cifar10"]
    for name, task in tasks.items():
        methods = task["methods"]
        assert set(methods) == {"original", *task["task"]["methods"]}
        for row in methods.values():
            assert 0 <= row["accuracy"] <= 1 and row["ci95"] > 0 and row["parameters"] > 0
        assert methods["original"]["p50_ms_b1"] > 0 and methods["rmt-mp-hist"]["speedup_b32"] > 0
        assert methods["rmt-mp-hist"]["parameters"] < methods["original"]["parameters"]
        assert len(task["quantiles"]) == len(task["task"]["quantiles"])
        assert task["spectra"] and all(s["k"] <= s["d"] for s in task["spectra"].values())
        assert (tmp_path / f"mini-{name}.png").exists() and (tmp_path / f"mini-{name}-spectra.png").exists()
    assert len(tasks["cifar10"]["quantiles"]) == 5
    # magnitude pruning takes RMT-KD's widths: the same architecture, timed once
    assert tasks["qqp"]["methods"]["magnitude"]["timed_as"] == "rmt-mp-hist"
    table = (tmp_path / "RESULTS.md").read_text()
    assert "## GLUE mean (sst2, qqp)" in table and "## cifar10" in table and "rmt-mp-hist" in table
