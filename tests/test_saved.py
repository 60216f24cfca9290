"""save / load: safetensors, JSON and a checked torch.export program; never pickle."""

import json
import subprocess
import sys
import zipfile

import pytest
import safetensors.torch
import torch
import torchvision
import transformers

import fxcompress
from fxcompress import CompressConfig, ConfigError

HALF = CompressConfig(rule="fixed", ratio=0.5, round_to=1)

MODELS = {
    "resnet18": (lambda: torchvision.models.resnet18(num_classes=10),
                 lambda g: torch.randn(4, 3, 32, 32, generator=g), "output"),
    "gpt2": (lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=97, n_embd=64, n_layer=2, n_head=4)),
             lambda g: torch.randint(0, 97, (2, 12), generator=g), "logits"),
}

FRESH = """
import sys, safetensors.torch, torch, fxcompress
folder, check = sys.argv[1], safetensors.torch.load_file(sys.argv[2])
out = fxcompress.load(folder)(check["input"])
out = out.logits if hasattr(out, "logits") else out
print(float((out - check["output"]).abs().max()))
"""


def _saved(name, tmp_path):
    build, batch, _ = MODELS[name]
    torch.manual_seed(0)
    model = build().eval()
    g = torch.Generator().manual_seed(0)
    result = fxcompress.compress(model, [batch(g) for _ in range(2)], HALF)
    return model, result, batch(g), result.save(tmp_path / name)


def _logits(out):
    return out.logits if hasattr(out, "logits") else out


@pytest.mark.parametrize("name", sorted(MODELS))
def test_save_then_a_fresh_process_loads_the_same_logits_without_the_class(name, tmp_path):
    model, result, x, folder = _saved(name, tmp_path)
    expected = _logits(result.module(x)).detach()
    safetensors.torch.save_file({"input": x, "output": expected}, tmp_path / "check.safetensors")
    done = subprocess.run([sys.executable, "-c", FRESH, str(folder), str(tmp_path / "check.safetensors")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert float(done.stdout.split()[-1]) <= 1e-5 * float(expected.abs().max())
    rebuilt = fxcompress.load(folder, model)  # from the original model and the saved steps
    torch.testing.assert_close(_logits(rebuilt(x)), expected, rtol=1e-5, atol=1e-5)
    own = fxcompress.load(folder, model, own_class=True)
    assert type(own) is type(model)
    torch.testing.assert_close(_logits(own(x)), expected, rtol=1e-5, atol=1e-5)


def test_nothing_saved_is_a_pickle(tmp_path):
    _, result, _, folder = _saved("resnet18", tmp_path)
    assert sorted(p.name for p in folder.iterdir()) == ["fxcompress.json", "inputs.safetensors", "model.safetensors",
                                                       "program.pt2", "report.txt"]
    meta = json.loads((folder / "fxcompress.json").read_text())
    assert meta["steps"] == [result.step] and torch.__version__.startswith(meta["versions"]["torch"])
    with zipfile.ZipFile(folder / "program.pt2") as archive:
        configs = [json.loads(archive.read(n)) for n in archive.namelist() if n.endswith("config.json")]
    assert configs and not any(e["use_pickle"] for c in configs for e in c["config"].values())
    assert oct((folder / "model.safetensors").stat().st_mode & 0o777) == oct(0o666 & ~fxcompress.atomic.umask())


def test_bad_folders_are_clear_errors(tmp_path):
    model, _, _, folder = _saved("resnet18", tmp_path)
    with pytest.raises(ConfigError, match="not a saved fxcompress model"):
        fxcompress.load(tmp_path)
    with pytest.raises(ConfigError, match="do not fit the model rebuilt"):
        fxcompress.load(folder, torchvision.models.resnet18(num_classes=12))
    with pytest.raises(ConfigError, match="own_class=True needs model="):
        fxcompress.load(folder, own_class=True)
    meta = json.loads((folder / "fxcompress.json").read_text())
    (folder / "fxcompress.json").write_text(json.dumps({**meta, "program": {"error": "TypeError: x"}}))
    with pytest.raises(ConfigError, match=r"holds no program \(TypeError: x\): load it with model="):
        fxcompress.load(folder)
    (folder / "fxcompress.json").write_text(json.dumps({**meta, "format": "other/9"}))
    with pytest.raises(ConfigError, match="format 'other/9'"):
        fxcompress.load(folder)
