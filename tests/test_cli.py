"""The fxcompress command: compress a model named on the command line, save it, report."""

import json
import subprocess
import sys

import numpy as np
import pytest
import safetensors.torch
import torch
import transformers

import fxcompress
from fxcompress.cli import cli


def _run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "fxcompress", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600)


def test_compress_a_torchvision_model_by_name(tmp_path):
    safetensors.torch.save_file({"x": torch.randn(24, 3, 32, 32)}, tmp_path / "calib.safetensors")
    done = _run("compress", "torchvision:resnet18", "--num-classes", "10", "--calib", str(tmp_path / "calib.safetensors"),
                "--batch-size", "12", "--out", str(tmp_path / "out"), "--rule", "fixed", "--ratio", "0.5", "--onnx")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("fxcompress: 11,181,642 → ") and done.stdout.strip().endswith(str(tmp_path / "out"))
    assert "calibrated" in done.stderr and "rewritten" in done.stderr  # progress, stage by stage
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert files == ["fxcompress.json", "inputs.safetensors", "model.onnx", "model.safetensors", "program.pt2",
                     "report.txt"]
    meta = json.loads((tmp_path / "out" / "fxcompress.json").read_text())
    assert meta["model_class"] == "torchvision.models.resnet.ResNet" and meta["steps"][0]["widths"]
    module = fxcompress.load(tmp_path / "out")
    assert module(torch.randn(3, 3, 32, 32)).shape == (3, 10)


def test_compress_a_transformers_model_from_a_config_file_with_keyword_inputs(tmp_path, capsys):
    transformers.GPT2Config(vocab_size=97, n_embd=64, n_layer=2, n_head=4).to_json_file(tmp_path / "tiny.json")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "calib.npz", input_ids=rng.integers(0, 97, (16, 12)), attention_mask=np.ones((16, 12), np.int64))
    code = cli(["compress", f"transformers:{tmp_path / 'tiny.json'}", "--head", "causal-lm", "--calib",
                str(tmp_path / "calib.npz"), "--batch-size", "8", "--out", str(tmp_path / "out"), "--rule", "fixed",
                "--ratio", "0.5", "--round-to", "1", "--quiet"])
    assert code == 0
    assert "GPT2LMHeadModel" in json.loads((tmp_path / "out" / "fxcompress.json").read_text())["model_class"]
    ids = torch.randint(0, 97, (2, 12))
    out = fxcompress.load(tmp_path / "out")(input_ids=ids, attention_mask=torch.ones_like(ids))
    assert out.logits.shape == (2, 12, 97)


@pytest.mark.parametrize("args, message", [
    (["torchvision:nosuch"], "torchvision has no model 'nosuch'"),
    (["resnet18"], "give torchvision:NAME, transformers:TYPE"),
    (["torchvision:resnet18", "--rule", "nosuch"], "unknown rule 'nosuch'"),
    (["torchvision:resnet18", "--calib", "missing.npz"], "--calib missing.npz: no such file"),
    (["torchvision:resnet18", "--calib", "ragged.npz"], "the same number of samples"),
    (["torchvision:resnet18", "--batch-size", "0"], "--batch-size must be ≥ 1"),
    (["transformers:nosuch"], "transformers:nosuch"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, args, message, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    np.savez(tmp_path / "calib.npz", x=np.zeros((4, 3, 32, 32), np.float32))
    np.savez(tmp_path / "ragged.npz", a=np.zeros((4, 3)), b=np.zeros((5, 3)))
    argv = ["compress", *args]
    if "--calib" not in args:
        argv += ["--calib", "calib.npz"]
    assert cli([*argv, "--out", "out"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fxcompress: error: ") and message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", [[], ["compress"]])
def test_help_and_version_of_the_fxcompress_command(command):
    done = _run(*command, "--help")
    assert done.returncode == 0 and "usage: fxcompress" in done.stdout and "``" not in done.stdout
    assert _run("--version").stdout.strip() == f"fxcompress {fxcompress.__version__}"


@pytest.mark.parametrize("flags, expected", [
    ((), dict(reconstruct=True, fold_mean=True, uniform=False, target_agreement=0.8)),
    (("--no-reconstruct", "--no-fold-mean", "--uniform", "--agreement", "0.9"),
     dict(reconstruct=False, fold_mean=False, uniform=True, agreement=0.9)),
    (("--no-agreement",), dict(rule="mp-hist", agreement=None, target_agreement=None)),
    (("--rule", "fixed", "--ratio", "0.5"), dict(target_agreement=None)),
    (("--params", "0.75"), dict(rule="mp-hist", params=0.75, target_agreement=None)),
])
def test_compress_options_reach_the_config(tmp_path, monkeypatch, flags, expected):
    seen = {}

    def stop(model, batches, config):
        seen["config"] = config
        raise KeyboardInterrupt  # nothing past the config is under test

    monkeypatch.setattr(fxcompress, "compress", stop)
    safetensors.torch.save_file({"x": torch.randn(4, 3, 8, 8)}, tmp_path / "calib.safetensors")
    with pytest.raises(KeyboardInterrupt):
        cli(["compress", "torchvision:resnet18", "--num-classes", "10", "--calib", str(tmp_path / "calib.safetensors"),
             "--out", str(tmp_path / "out"), "--quiet", *flags])
    assert {k: getattr(seen["config"], k) for k in expected} == expected and not (tmp_path / "out").exists()
