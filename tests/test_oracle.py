"""The oracle-width study (benchmarks/oracle_width.py): its paired statistics, and a miniature
run end to end so the study cannot rot."""

import json

import numpy as np
import pytest
import scipy.stats
from conftest import load_benchmark


@pytest.fixture
def oracle(monkeypatch):
    return load_benchmark(monkeypatch, "oracle_width")


def test_paired_statistics(oracle):
    rng = np.random.default_rng(0)
    reference = rng.random((3, 400)) < 0.8
    same = oracle.paired(reference, reference)
    assert same["diff"] == same["low"] == same["high"] == 0 and same["p"] == 1
    better = reference.copy()
    better[:, :40] = True  # examples the reference got wrong become right: gains only
    stats = oracle.paired(better, reference)
    gained = int((better & ~reference).sum())
    assert stats["gained"] == gained and stats["lost"] == 0
    assert stats["diff"] == pytest.approx(gained / better.size) and stats["low"] > 0
    assert stats["p"] == pytest.approx(scipy.stats.binomtest(gained, gained).pvalue)


def test_the_oracle_is_the_smallest_candidate_within_one_point(oracle):
    def seed(rows):
        return {name: {"parameters": p, "correct": c} for name, (p, c) in rows.items()}

    truth = np.ones(1000, bool)
    drop = lambda n: np.r_[np.zeros(n, bool), np.ones(1000 - n, bool)]  # noqa: E731
    rows = {"original": (100, truth), "uniform-0.5": (50, drop(5)), "uniform-0.25": (25, drop(30)),
            "mp-hist-q0.5": (40, drop(8))}
    summary = oracle.summarize([seed(rows), seed(rows)])
    assert summary["oracle"] == "mp-hist-q0.5"  # 0.8 points lost; uniform-0.25 lost 3
    assert summary["candidates"]["uniform-0.5"]["to_oracle"] == pytest.approx(50 / 40)


def test_the_markdown_section_keeps_the_rest_of_the_file(oracle, tmp_path):
    path = tmp_path / "RESULTS.md"
    path.write_text("# Results\n\nearlier tables\n")
    oracle.write_markdown_section(path, "first")
    oracle.write_markdown_section(path, "second")
    text = path.read_text()
    assert text.startswith("# Results\n\nearlier tables\n") and "second" in text and "first" not in text
    assert text.count("oracle-width:start") == 1


def test_the_miniature_study_runs_end_to_end(oracle, data_root, tmp_path):
    oracle.main(["--profile", "mini", "--seeds", "2", "--data-dir", str(data_root), "--out", str(tmp_path)])
    results = json.loads((tmp_path / "oracle-mini.json").read_text())
    summary = results["tasks"]["cifar-cnn"]["summary"]
    rows = summary["candidates"]
    assert summary["seeds"] == 2 and summary["examples"] == 256
    assert {"original", "uniform-0.25", "uniform-0.5", "mp-hist-q0.5", "mp-robust"} <= set(rows)
    within = [n for n, r in rows.items() if n != "original" and r["vs_original"]["diff"] >= -0.01]
    assert summary["oracle"] == min(within or ["original"], key=lambda n: rows[n]["parameters"])
    assert all(r["vs_rmt"]["low"] <= r["vs_rmt"]["diff"] <= r["vs_rmt"]["high"] for r in rows.values())
    assert (tmp_path / "oracle-cifar-cnn.png").exists() and "★" in (tmp_path / "ORACLE.md").read_text()
    oracle.main(["--render", str(tmp_path / "oracle-mini.json"), "--out", str(tmp_path / "again"), "--markdown",
                 str(tmp_path / "RESULTS.md")])
    assert (tmp_path / "again" / "ORACLE.md").read_text() == (tmp_path / "ORACLE.md").read_text()
    assert "oracle-width:start" in (tmp_path / "RESULTS.md").read_text()
    assert rows["original"]["agreement"] == 1 and all(0 <= r["agreement"] <= 1 for r in rows.values())
    # a fidelity-only run of the same seeds trains the same originals: its figures merge into the full run's
    oracle.main(["--profile", "mini", "--seeds", "2", "--data-dir", str(data_root), "--out", str(tmp_path / "fid"),
                 "--fidelity-only"])
    assert not (tmp_path / "fid" / "ORACLE.md").exists()
    merged = tmp_path / "merged"
    oracle.main(["--render", str(tmp_path / "oracle-mini.json"), str(tmp_path / "fid" / "fidelity-mini.json"),
                 "--out", str(merged)])
    assert (merged / "ORACLE.md").read_text().count("agreement before KD") == 1
    assert "mp-robust@0.9" in rows  # the agreement level, at the mini profile's one target
    # a supplement of the level candidates alone merges into the full run
    oracle.main(["--profile", "mini", "--seeds", "2", "--data-dir", str(data_root), "--out", str(tmp_path / "sup"),
                 "--levels-only"])
    supplement = json.loads((tmp_path / "sup" / "oracle-mini.json").read_text())["tasks"]["cifar-cnn"]
    assert supplement["supplement"] and set(supplement["summary"]["candidates"]) == {"original", "mp-robust@0.9"}
    oracle.main(["--render", str(tmp_path / "oracle-mini.json"), str(tmp_path / "sup" / "oracle-mini.json"),
                 "--out", str(tmp_path / "both")])
    assert (tmp_path / "both" / "ORACLE.md").read_text().count("| mp-robust@0.9 |") == 2  # rule table, task table
    # so does one of uniform ratios alone
    oracle.main(["--profile", "mini", "--seeds", "2", "--data-dir", str(data_root), "--out", str(tmp_path / "low"),
                 "--ratios", "0.125"])
    low = json.loads((tmp_path / "low" / "oracle-mini.json").read_text())["tasks"]["cifar-cnn"]["summary"]
    assert set(low["candidates"]) == {"original", "uniform-0.125"}


def test_a_supplement_that_keeps_accuracy_with_fewer_parameters_is_the_new_oracle(oracle):
    row = lambda p, d: {"parameters": p, "accuracy": 0.8, "vs_original": {"diff": d}}  # noqa: E731
    full = {"candidates": {"original": row(100, 0), "uniform-0.5": row(50, -0.005), "mp-robust": row(80, 0)}}
    full["oracle"] = oracle._oracle(full["candidates"])
    assert full["oracle"] == "uniform-0.5" and full["candidates"]["mp-robust"]["to_oracle"] == pytest.approx(1.6)
    lower = {"candidates": {"original": row(100, 0), "uniform-0.25": row(25, -0.008), "uniform-0.125": row(12, -0.03)}}
    oracle._merge_supplement(full, lower, "t")
    assert full["oracle"] == "uniform-0.25" and full["candidates"]["mp-robust"]["to_oracle"] == pytest.approx(3.2)
    with pytest.raises(SystemExit, match="originals differ"):
        oracle._merge_supplement(full, {"candidates": {"original": row(99, 0)}}, "t")


@pytest.mark.parametrize("task, test_split, rows", [("qqp", "test", 8086), ("qnli", "dev", 5463), ("sst2", "dev", 872)])
def test_each_glue_task_tests_on_the_split_it_did_not_train_on(oracle, data_root, tmp_path, monkeypatch,
                                                              task, test_split, rows):
    monkeypatch.setenv("FXCOMPRESS_CACHE", str(tmp_path))
    spec = next(t for t in oracle.PROFILES["quick"] if t.name == task)
    small = oracle.dataclasses.replace(spec, train_rows=64, model=dict(spec.model, vocab=300))
    train, test, vocab = oracle.task_data(small, str(data_root), seed=0)
    assert oracle.GLUE_TEST[task] == test_split and sum(len(b["labels"]) for b in train) == 64
    assert sum(len(b["labels"]) for b in test) == rows and vocab <= 300
    assert isinstance(oracle.build(small, vocab), oracle.nn.Module)


def test_the_agreement_pick_is_the_smallest_candidate_that_agrees_enough(oracle):
    row = lambda p, a, d: {"parameters": p, "agreement": a, "to_oracle": p / 50,  # noqa: E731
                           "vs_original": {"diff": d}}
    summary = {"candidates": {"original": row(100, 1.0, 0), "uniform-0.5": row(50, 0.92, -0.005),
                              "uniform-0.25": row(25, 0.85, -0.03), "mp-robust": row(60, 0.95, 0)}}
    assert oracle.agreement_pick(summary, 0.9) == "uniform-0.5"
    assert oracle.agreement_pick(summary, 0.8) == "uniform-0.25"
    assert oracle.agreement_pick(summary, 0.99) is None
    table = "\n".join(oracle.rule_table({"tasks": {"t": {"summary": summary}}}))
    assert "| mp-robust | 1.20, +0.00 |" in table and "| agreement ≥ 0.9 before KD (pick) | 1.00, -0.50 `uniform-0.5` |" in table
    assert "| mp-hist-q0.5 | — |" in table  # a rule the run did not try
