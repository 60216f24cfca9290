"""A miniature of benchmarks/reproduce.py (a few hundred SST-2 rows and CIFAR-10 images), so
the reproduction code cannot rot: every method runs, and the JSON, table and plots appear."""

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
                    "--min-runs", "3", "--min-seconds", "0", "--latency", "rmt-mp-hist"])
    results = json.loads((tmp_path / "mini-cpu.json").read_text())
    assert [t["task"]["name"] for t in results["tasks"]] == ["sst2", "cifar10"]
    for task in results["tasks"]:
        methods = task["methods"]
        assert {"original", "rmt-mp-hist", "rmt-mp-robust", "pca-90", "pca-95", "pca-99"} <= set(methods)
        for row in methods.values():
            assert 0 <= row["accuracy"] <= 1 and row["ci95"] > 0 and row["parameters"] > 0
        assert methods["original"]["p50_ms_b1"] > 0 and methods["rmt-mp-hist"]["speedup_b32"] > 0
        assert len(task["quantiles"]) == 5
    table = (tmp_path / "RESULTS.md").read_text()
    assert "## sst2" in table and "## cifar10" in table and "rmt-mp-hist" in table
    assert (tmp_path / "mini-sst2.png").exists() and (tmp_path / "mini-cifar10.png").exists()
