"""fxcompress-bench: every field measured and written; bad input is a clear error, exit 2."""

import csv
import json
import re
import subprocess
import sys

import pytest
import torch

import fxcompress
from fxcompress import CompressConfig
from fxcompress.bench import EnergyMeter
from fxcompress.cli import main
from fxcompress.export import export_onnx
from zoo import ORACLES

FAST = ["--batch-sizes", "1,4", "--repeats", "2", "--min-runs", "5", "--min-seconds", "0", "--warmup-runs", "1",
        "--warmup-seconds", "0"]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("onnx")
    cls, inputs = ORACLES["residual_mlp"]
    torch.manual_seed(0)
    model = cls().eval()
    data = [inputs(16) for _ in range(2)]
    small = fxcompress.compress(model, data, CompressConfig(rule="fixed", ratio=0.5, round_to=1)).module
    export_onnx(model, data[0], folder / "original.onnx")
    export_onnx(small, data[0], folder / "compressed.onnx")
    cls, inputs = ORACLES["post_ln_transformer"]
    export_onnx(cls().eval(), inputs(2), folder / "tokens.onnx")
    return folder


def test_compare_writes_every_field(pair, tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["compare", str(pair / "original.onnx"), str(pair / "compressed.onnx"), "--out", str(out), *FAST]) == 0
    progress = [line for line in capsys.readouterr().err.splitlines() if line.startswith("[")]
    assert len(progress) == 8 and progress[0].startswith("[1/8] repeat 1/2, batch 1: original")  # 2 × 2 × 2 runs
    assert progress[0].endswith("original") and all(re.search(r", about (\d+ min )?\d+ s left$", p) for p in progress[1:])
    results = json.loads((out / "results.json").read_text())
    env = results["environment"]
    assert env["cores"] >= 1 and "onnxruntime" in env["packages"] and env["cpu"]
    original, compressed = results["models"]
    assert compressed["parameters"] < original["parameters"] and compressed["size_bytes"] < original["size_bytes"]
    assert compressed["flops_per_sample"] < original["flops_per_sample"]
    for model in results["models"]:
        for batch in ("1", "4"):
            s = model["batches"][batch]
            assert s["repeats"] == 2 and s["provider"] == "CPUExecutionProvider" and s["threads"] == "ort-default"
            assert set(s["latency_ms"]) == {"count", "mean", "std", "p50", "p90", "p95", "p99"}
            assert s["latency_ms"]["p50"]["median"] > 0 and s["latency_ms"]["count"]["min"] >= 5
            assert s["throughput_per_s"]["median"] > 0 and s["peak_rss_bytes"]["median"] > 10**6
            if s["energy"]["source"] is None:  # no NVML or RAPL here: null, with the reason
                assert s["energy"]["joules"] is None and s["energy"]["reason"]
            ratio = s["ratio_to_first"]
            assert ratio["latency_p50"]["median"] > 0 and 0 < ratio["flops"] <= 1
    assert compressed["batches"]["1"]["ratio_to_first"]["flops"] < 1
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == 4 and "latency_ms.p99.median" in rows[0] and "ratio_to_first.flops" in rows[0]
    table = [line for line in (out / "results.md").read_text().splitlines() if line.startswith("|")]
    assert "| compressed | 4 |" in table[-1] and "| — |" in table[-1]  # no accuracy measured: a dash in its column
    assert {line.count("|") for line in table} == {table[0].count("|")}  # every row has every column
    assert (out / "latency.png").stat().st_size > 0


def test_energy_is_null_with_a_reason_without_a_counter(monkeypatch, tmp_path):
    monkeypatch.setattr("fxcompress.bench.RAPL", tmp_path / "no-such-counter")
    meter = EnergyMeter("cpu")
    meter.start()
    reading = meter.stop(10)
    assert reading["source"] is None and reading["joules"] is None and "RAPL" in reading["reason"]


@pytest.mark.parametrize("make_args, match", [
    (lambda d: [str(d / "missing.onnx"), str(d / "original.onnx")], "no such model file"),
    (lambda d: [str(d / "junk.onnx"), str(d / "original.onnx")], "is not an ONNX model"),
    (lambda d: [str(d / "original.onnx"), str(d / "tokens.onnx")], "same input signature"),
    (lambda d: [str(d / "original.onnx"), str(d / "compressed.onnx"), "--device", "tpu"], "unknown device"),
    (lambda d: [str(d / "original.onnx"), str(d / "compressed.onnx"), "--batch-sizes", "0"], "batch sizes"),
    (lambda d: [str(d / "original.onnx")], "two or more models"),
])
def test_bad_input_exits_2_and_writes_nothing(pair, tmp_path, capsys, make_args, match):
    (pair / "junk.onnx").write_text("not a model")
    out = tmp_path / "bench"
    assert main(["compare", *make_args(pair), "--out", str(out), *FAST[2:]]) == 2
    assert match in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("command", [[], ["compare"], ["env"]])
def test_every_subcommand_has_help(command):
    proc = subprocess.run([sys.executable, "-m", "fxcompress.cli", *command, "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "usage: fxcompress-bench" in proc.stdout
    assert "``" not in proc.stdout  # plain text, not reStructuredText


def test_version():
    proc = subprocess.run([sys.executable, "-m", "fxcompress.cli", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == f"fxcompress-bench {fxcompress.__version__}"


@pytest.mark.gpu
def test_compare_on_cuda_uses_the_cuda_provider(pair, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("no CUDA provider in this onnxruntime build")
    out = tmp_path / "bench"
    assert main(["compare", str(pair / "original.onnx"), str(pair / "compressed.onnx"), "--device", "cuda",
                 "--out", str(out), *FAST]) == 0
    results = json.loads((out / "results.json").read_text())
    assert all(s["provider"] == "CUDAExecutionProvider" for m in results["models"] for s in m["batches"].values())


def test_accuracy_on_cifar10_is_measured_and_plotted(data_root, tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(16, 10)).eval()
    data = [torch.randn(8, 3, 32, 32) for _ in range(2)]
    small = fxcompress.compress(model, data, CompressConfig(rule="fixed", ratio=0.5, round_to=1)).module
    export_onnx(model, data[0], tmp_path / "a.onnx")
    export_onnx(small, data[0], tmp_path / "b.onnx")
    out = tmp_path / "bench"
    assert main(["compare", str(tmp_path / "a.onnx"), str(tmp_path / "b.onnx"), "--data", "cifar10", "--out", str(out),
                 "--batch-sizes", "4", *FAST[2:]]) == 0
    results = json.loads((out / "results.json").read_text())
    for model in results["models"]:
        assert model["accuracy"]["samples"] == 1000 and 0 <= model["accuracy"]["value"] <= 1
        assert f"| {model['accuracy']['value']:.4f} |" in (out / "results.md").read_text()
    assert (out / "accuracy.png").stat().st_size > 0


def test_an_unreadable_data_directory_exits_2(pair, tmp_path, capsys):
    out = tmp_path / "bench"
    code = main(["compare", str(pair / "original.onnx"), str(pair / "compressed.onnx"), "--data", "cifar10",
                 "--data-dir", str(tmp_path / "nowhere"), "--out", str(out), *FAST[2:]])
    assert code == 2 and "data directory" in capsys.readouterr().err and not out.exists()


def test_a_saved_pytorch_program_is_exported_first(pair, tmp_path):
    cls, inputs = ORACLES["residual_mlp"]
    torch.manual_seed(0)
    program = torch.export.export(cls().eval(), inputs(4))
    torch.export.save(program, tmp_path / "program.pt2")
    out = tmp_path / "bench"
    assert main(["compare", str(tmp_path / "program.pt2"), str(pair / "compressed.onnx"), "--out", str(out),
                 "--trust-pt2", *FAST]) == 0
    results = json.loads((out / "results.json").read_text())
    first = results["models"][0]
    assert first["source"].endswith("program.pt2") and (out / "program.onnx").exists()
    assert first["path"] == str(out / "program.onnx") and first["flops_per_sample"] > 0
