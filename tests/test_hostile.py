"""Hostile input: files crafted to run code must not run it, tampered checkpoints are refused
with a ConfigError, and no public call changes the user's model or the global RNG.

Each trap is first shown to be live (the unprotected path does run the payload), so a test
here fails if the protection goes away.
"""

import json
import pickle
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import fxcompress
from fxcompress import CompressConfig, ConfigError, DistillConfig, RMTKDConfig
from fxcompress.cli import main
from fxcompress.export import export_onnx
from fxcompress.rmtkd import CHECKPOINT
from planted import task, trained

FAST = ["--batch-sizes", "1", "--repeats", "1", "--min-runs", "2", "--min-seconds", "0", "--warmup-runs", "0",
        "--warmup-seconds", "0"]


class Payload:
    """Unpickling this creates ``marker``: the stand-in for any code a file could run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def _onnx_pair(folder: Path) -> tuple[Path, Path]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).eval()
    a, b = folder / "a.onnx", folder / "b.onnx"
    export_onnx(model, torch.randn(2, 8), a)
    export_onnx(model, torch.randn(2, 8), b)
    return a, b


def _crafted_pt2(folder: Path, marker: Path, how: str, clean: Path | None = None) -> Path:
    """A real ``torch.export.save`` archive (``clean``, else a linear layer with a dynamic batch)
    with one member changed to run code: a pickle payload, or Python in a shape expression."""
    if clean is None:
        clean = folder / "clean.pt2"
        batch = {0: torch.export.Dim.AUTO}
        torch.export.save(torch.export.export(torch.nn.Linear(8, 4), (torch.randn(2, 8),), dynamic_shapes=(batch,)), clean)
    crafted = folder / f"{how}.pt2"
    with zipfile.ZipFile(clean) as src, zipfile.ZipFile(crafted, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            if how == "sample-inputs" and info.filename.endswith("data/sample_inputs/model.pt"):
                data = pickle.dumps(Payload(marker))
            elif how == "pickled-weight" and info.filename.endswith("model_weights_config.json"):
                config = json.loads(data)
                next(iter(config["config"].values()))["use_pickle"] = True
                data = json.dumps(config).encode()
            elif how == "pickled-weight" and info.filename.endswith("data/weights/weight_0"):
                data = pickle.dumps(Payload(marker))
            elif how == "shape-expression" and "/models/" in info.filename:
                text = data.decode()
                symbol = re.search(r"Symbol\('s\d+', positive=True, integer=True\)", text)
                assert symbol, "the program has no symbolic shape to replace"
                trap = f"(__import__('pathlib').Path({str(marker)!r}).touch(), {symbol[0]})[1]"
                data = text.replace(symbol[0], json.dumps(trap)[1:-1], 1).encode()
            dst.writestr(info, data)
    return crafted


HOW = ["sample-inputs", "pickled-weight", "shape-expression"]


def _live(crafted: Path, marker: Path) -> None:
    """Show the trap runs where the file is read unprotected."""
    live = subprocess.run([sys.executable, "-c", f"import torch; torch.export.load({str(crafted)!r})"],
                          capture_output=True, text=True)
    assert marker.exists(), f"the trap is not live: {live.stderr[-500:]}"  # torch.export.load runs it
    marker.unlink()


@pytest.mark.parametrize("how", HOW)
def test_a_crafted_pt2_runs_nothing(tmp_path, how, capsys):
    marker = tmp_path / "pwned"
    crafted = _crafted_pt2(tmp_path, marker, how)
    _live(crafted, marker)
    a, _ = _onnx_pair(tmp_path)
    out = tmp_path / "bench"
    assert main(["compare", str(crafted), str(a), "--out", str(out), *FAST]) == 2
    err = capsys.readouterr().err
    assert "--trust-pt2" in err and "refused, since loading it could run code" in err
    assert len(err.strip().splitlines()) == 1
    assert not marker.exists() and not out.exists()


@pytest.mark.parametrize("how", HOW)
def test_a_saved_folder_with_a_crafted_program_runs_nothing(tmp_path, how):
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).eval()
    batches = [torch.randn(32, 8) for _ in range(2)]
    folder = fxcompress.compress(model, batches, CompressConfig(rule="fixed", ratio=0.5)).save(tmp_path / "saved")
    marker = tmp_path / "pwned"
    crafted = _crafted_pt2(tmp_path, marker, how, clean=folder / "program.pt2")
    _live(crafted, marker)
    crafted.replace(folder / "program.pt2")
    with pytest.raises(ConfigError, match="refused, since loading it could run code; load the folder with model="):
        fxcompress.load(folder)
    assert not marker.exists()
    torch.testing.assert_close(fxcompress.load(folder, model)(batches[0]),  # the safetensors route still works
                               fxcompress.load(folder, model, own_class=True)(batches[0]))


def test_a_program_that_calls_outside_the_operator_registries_is_refused(tmp_path):
    clean = tmp_path / "clean.pt2"
    torch.export.save(torch.export.export(torch.nn.Linear(8, 4), (torch.randn(2, 8),)), clean)
    crafted = tmp_path / "call.pt2"
    with zipfile.ZipFile(clean) as src, zipfile.ZipFile(crafted, "w") as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            dst.writestr(info, data.replace(b'"torch.ops.aten.linear.default"', b'"torch.hub.load"')
                         if "/models/" in info.filename else data)
    with pytest.raises(ConfigError, match="a call of 'torch.hub.load'"):
        fxcompress.saved.load_program(crafted)


def test_a_fxcompress_folder_in_the_working_directory_is_not_imported(tmp_path, monkeypatch):
    marker = tmp_path / "hijacked"
    fake = tmp_path / "cwd" / "fxcompress"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    (fake / "bench.py").write_text("")
    subprocess.run([sys.executable, "-m", "fxcompress.bench", "{}"], cwd=fake.parent, capture_output=True)
    assert marker.exists(), "the trap is not live"  # a plain `python -m` from that folder imports it
    marker.unlink()
    a, b = _onnx_pair(tmp_path)
    monkeypatch.chdir(fake.parent)
    assert main(["compare", str(a), str(b), "--out", str(tmp_path / "bench"), *FAST]) == 0
    assert not marker.exists()


def test_a_measurement_child_that_prints_nothing_is_a_clear_error(tmp_path, monkeypatch, capsys):
    a, b = _onnx_pair(tmp_path)
    monkeypatch.setattr("fxcompress.bench._WORKER", "pass")
    out = tmp_path / "bench"
    assert main(["compare", str(a), str(b), "--out", str(out), *FAST]) == 2
    assert "printed nothing" in capsys.readouterr().err and not out.exists()


# -- checkpoints ----------------------------------------------------------------------------------
def _config(**kwargs):
    return RMTKDConfig(compress=CompressConfig(rule="mp-robust", round_to=1),
                       distill=DistillConfig(epochs=1, progress=False), max_drop=0.05, max_rounds=1, **kwargs)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A real checkpoint after one round, and the run that wrote it."""
    out = tmp_path_factory.mktemp("run")
    train, val = task()
    fxcompress.rmtkd(trained(), train, val, _config(), out_dir=out)
    return torch.load(out / CHECKPOINT, weights_only=True), (train, val)


def _tamper(payload: dict, change: str) -> dict:
    payload = dict(payload, model=dict(payload["model"]))
    if change == "position":
        payload["position"] = -5
    elif change == "missing":
        del payload["baseline"]
    elif change == "json":
        payload["steps"] = "[{"
    elif change == "type":
        payload["pass_index"] = "0"
    elif change == "nan":
        name = next(iter(payload["model"]))
        payload["model"][name] = torch.full_like(payload["model"][name], float("nan"))
    elif change == "stop":
        payload["stop"] = "reboot"
    elif change == "rounds":
        payload["rounds"] = json.dumps([{"index": 0}])
    return payload


@pytest.mark.parametrize("change", ["position", "missing", "json", "type", "nan", "stop", "rounds"])
def test_a_tampered_checkpoint_is_refused(checkpoint, tmp_path, change):
    payload, (train, val) = checkpoint
    torch.save(_tamper(payload, change), tmp_path / CHECKPOINT)
    with pytest.raises(ConfigError, match="damaged or tampered|RMT-KD checkpoint"):
        fxcompress.rmtkd(trained(), train, val, _config(), out_dir=tmp_path, resume=True)


def test_a_pickled_checkpoint_runs_nothing(checkpoint, tmp_path):
    _, (train, val) = checkpoint
    marker = tmp_path / "pwned"
    (tmp_path / CHECKPOINT).write_bytes(pickle.dumps({"format": Payload(marker)}))
    with pytest.raises(ConfigError, match="cannot read"):
        fxcompress.rmtkd(trained(), train, val, _config(), out_dir=tmp_path, resume=True)
    assert not marker.exists()


# -- the user's model and RNG ---------------------------------------------------------------------
class Counting(torch.nn.Module):
    """A model whose forward writes a buffer, with a hook and in training mode."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(48, 48), torch.nn.ReLU(), torch.nn.Linear(48, 4))
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls += 1
        return self.body(x)


def _snapshot(model: torch.nn.Module) -> dict:
    return {"state": {k: v.clone() for k, v in model.state_dict().items()}, "training": model.training,
            "hooks": len(model._forward_hooks), "rng": torch.get_rng_state()}


def _same(a: dict, b: dict) -> bool:
    return a["state"].keys() == b["state"].keys() and all(torch.equal(a["state"][k], b["state"][k]) for k in a["state"]) \
        and a["training"] == b["training"] and a["hooks"] == b["hooks"] and torch.equal(a["rng"], b["rng"])


def _user_model() -> Counting:
    torch.manual_seed(0)
    model = Counting().train()
    model.register_forward_hook(lambda module, args, out: None)
    return model


CALLS = {
    "capture": lambda m, train, val, tmp: fxcompress.capture(m, (train[0][0],)),
    "analyze": lambda m, train, val, tmp: fxcompress.analyze(m, (train[0][0],)),
    # in training mode: the rule's own widths (the default agreement level refuses dropout)
    "compress": lambda m, train, val, tmp: fxcompress.compress(m, [b[0] for b in train[:3]],
                                                               CompressConfig(agreement=None)),
    "distill (teacher)": lambda m, train, val, tmp: fxcompress.distill(
        fxcompress.capture(m, (train[0][0],)), m, train[:3], DistillConfig(progress=False)),
    "rmtkd": lambda m, train, val, tmp: fxcompress.rmtkd(m, train[:5], val, _config(), out_dir=tmp),
    "export_onnx": lambda m, train, val, tmp: export_onnx(m, train[0][0], tmp / "m.onnx"),
    "rebuild": lambda m, train, val, tmp: fxcompress.rebuild(m, train[0][0], [fxcompress.compress(
        m, [b[0] for b in train[:3]], CompressConfig(rule="fixed", ratio=0.5)).step]),
}


@pytest.mark.parametrize("call", sorted(CALLS))
def test_no_public_call_touches_the_users_model_or_the_rng(call, tmp_path):
    train, val = task()
    model = _user_model()
    before = _snapshot(model)
    CALLS[call](model, train, val, tmp_path)
    assert _same(before, _snapshot(model))


def test_the_agreement_level_touches_neither_the_users_model_nor_the_rng():
    train, _ = task()
    model = _user_model().eval()
    before = _snapshot(model)
    result = fxcompress.compress(model, [b[0] for b in train[:3]])  # the default: mp-hist at agreement 0.8
    assert result.level is not None and result.level[1] >= 0.8
    assert _same(before, _snapshot(model))
    with pytest.raises(ConfigError, match="training mode; call model.eval"):
        fxcompress.compress(model.train(), [b[0] for b in train[:3]])


def test_the_compressed_model_keeps_a_written_buffer_of_its_own():
    train, _ = task()
    model = _user_model()
    result = fxcompress.compress(model, [b[0] for b in train[:3]], CompressConfig(rule="fixed", ratio=0.5))
    assert float(result.module.get_buffer("calls")) == 0  # calibration left it as the user had it
    result.module(train[0][0])
    assert float(result.module.get_buffer("calls")) == 1 and float(model.calls) == 0


# -- values baked into the graph ------------------------------------------------------------------
class Scaled(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(8, 16), torch.nn.Linear(16, 4)

    def forward(self, x, scale=1.0):
        return self.b(torch.relu(self.a(x))) * scale


def test_a_non_tensor_input_other_than_the_captured_one_is_refused():
    model = Scaled()
    data = [(torch.randn(16, 8), 2.0) for _ in range(2)]
    result = fxcompress.compress(model, data, CompressConfig(rule="fixed", ratio=0.5, round_to=1))
    x = torch.randn(3, 8)
    assert result.module(x, 2.0).shape == (3, 4)
    with pytest.raises(fxcompress.DataError, match="'scale' was 2.0 when the model was captured.*passes 1000.0"):
        result.module(x, 1000.0)
    with pytest.raises(fxcompress.DataError, match="calibration batch 1"):
        fxcompress.compress(model, [data[0], (torch.randn(16, 8), 3.0)])


# -- data read once -------------------------------------------------------------------------------
def test_one_shot_iterators_are_refused_clearly():
    train, val = task()
    net = trained()
    with pytest.raises(ConfigError, match="one-shot iterator"):
        fxcompress.distill(net, None, (b for b in train), DistillConfig(alpha=1, progress=False))
    with pytest.raises(ConfigError, match="train_data is a one-shot iterator"):
        fxcompress.rmtkd(net, iter(train), val, _config())
    with pytest.raises(ConfigError, match="calib_data must be an iterable"):
        fxcompress.compress(net, None)
    with pytest.raises(ConfigError, match="config must be a CompressConfig"):
        fxcompress.compress(net, [train[0][0]], "fixed")
    with pytest.raises(ConfigError, match="config must be a RMTKDConfig"):
        fxcompress.rmtkd(net, train, val, {"max_drop": 0.1})
