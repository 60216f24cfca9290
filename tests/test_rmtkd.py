"""The RMT-KD loop: planted width, stopping criteria, checkpoints, resume, torchrun."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fxcompress
from fxcompress import CompressConfig, ConfigError, DistillConfig, RMTKDConfig
from fxcompress.rmtkd import CHECKPOINT, STOPS, RMTKDResult, Round, calibration_subset
from planted import RANK, task, trained

TESTS = Path(__file__).parent


def _config(**kwargs):
    return RMTKDConfig(compress=CompressConfig(rule="mp-robust", round_to=1),
                       distill=DistillConfig(epochs=1, progress=False), max_drop=0.05, **kwargs)


def test_finds_the_planted_width_and_stops_when_no_noise_is_left():
    net = trained()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    train, val = task()
    result = fxcompress.rmtkd(net, train, val, _config(target_reduction=0.99))
    narrowed = [r for r in result.rounds if r.narrowed]
    assert [r.widths for r in narrowed] == [{"hidden.0": [48, RANK]}]
    assert result.stop == "no-noise-left"  # the second pass finds the 4 kept directions all signal
    assert result.accuracy >= result.floor and result.params_final < 0.2 * result.params_original
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # the user's model is untouched
    x = val[0][0]
    assert result.module(x).shape == (500, 4)


def test_stops_at_the_target_reduction(caplog):
    train, val = task()
    with caplog.at_level(logging.INFO, logger="fxcompress"):
        result = fxcompress.rmtkd(trained(depth=2), train, val, _config(target_reduction=0.3))
    assert result.stop == "target-reached" and result.reduction >= 0.3
    assert sum(r.narrowed for r in result.rounds) == 1  # the first round already passed the target
    rounds = [r.getMessage() for r in caplog.records if r.name == "fxcompress.rmtkd"]
    assert len(rounds) == len(result.rounds) and rounds[0].startswith("round 0: ")  # a line per round, as it ends
    stages = [r.getMessage() for r in caplog.records if r.name == "fxcompress.compress"]
    expected = ("captured ", "width groups", "calibrated ", "widths chosen", "rewritten: ")  # each stage as it ends
    assert len(stages) >= 5 and all(word in line for word, line in zip(expected, stages)), stages


def test_accuracy_floor_rolls_the_round_back():
    train, val = task()
    net = trained()
    scores = iter([0.9, 0.8, 0.5])  # baseline, right after the projection, after fine-tuning
    with pytest.warns(UserWarning, match="rolled back: accuracy 0.5000 < floor 0.8500"):
        result = fxcompress.rmtkd(net, train, val, _config(), evaluate=lambda m: next(scores))
    assert result.stop == "accuracy-floor" and result.floor == pytest.approx(0.85)
    assert not result.rounds[-1].accepted and result.params_final == result.params_original
    assert result.accuracy == 0.9


def test_a_diverged_fine_tune_is_rolled_back(tmp_path):
    train, val = task()
    nan_loss = lambda logits, target: logits.sum() * float("nan")  # noqa: E731
    with pytest.warns(UserWarning, match="rolled back"):
        config = RMTKDConfig(compress=CompressConfig(rule="mp-robust", round_to=1),
                             distill=DistillConfig(alpha=1, progress=False))
        result = fxcompress.rmtkd(trained(), train, val, config, task_loss=nan_loss, out_dir=tmp_path)
    assert result.stop == "diverged" and "loss became nan" in result.rounds[-1].note
    assert result.params_final == result.params_original


def test_kill_and_resume_equals_an_uninterrupted_run(tmp_path):
    train, val = task()
    config = _config(target_reduction=0.99, max_passes=1)
    whole = fxcompress.rmtkd(trained(depth=2), train, val, config, out_dir=tmp_path / "whole")
    assert sum(r.narrowed for r in whole.rounds) == 2

    class Killed(Exception):
        pass

    def kill(record):
        raise Killed

    with pytest.raises(Killed):
        fxcompress.rmtkd(trained(depth=2), train, val, config, out_dir=tmp_path / "killed", on_round=kill)
    payload = torch.load(tmp_path / "killed" / CHECKPOINT, weights_only=True)  # no arbitrary pickle
    assert len(json.loads(payload["rounds"])) == 1
    resumed = fxcompress.rmtkd(trained(depth=2), train, val, config, out_dir=tmp_path / "killed", resume=True)
    assert [r.widths for r in resumed.rounds] == [r.widths for r in whole.rounds]
    a, b = whole.module.state_dict(), resumed.module.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    report = json.loads((tmp_path / "killed" / "report.json").read_text())
    assert report["stop"] == resumed.stop and len(report["rounds"]) == 2


def test_resume_refuses_a_checkpoint_of_another_model(tmp_path):
    train, val = task()
    fxcompress.rmtkd(trained(), train, val, _config(max_rounds=1), out_dir=tmp_path)
    with pytest.raises(ConfigError, match="different model"):
        fxcompress.rmtkd(trained(depth=2), train, val, _config(max_rounds=1), out_dir=tmp_path, resume=True)
    with pytest.raises(ConfigError, match="another RMTKDConfig: max_rounds was 1, is now 2"):
        fxcompress.rmtkd(trained(), train, val, _config(max_rounds=2), out_dir=tmp_path, resume=True)
    (tmp_path / CHECKPOINT).write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="cannot read"):
        fxcompress.rmtkd(trained(), train, val, _config(max_rounds=1), out_dir=tmp_path, resume=True)


def test_calibration_subset_is_ten_percent_and_reproducible():
    x, y = torch.randn(200, 3), torch.arange(200)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8, shuffle=True)
    a, b = calibration_subset(loader, 0.1, seed=3), calibration_subset(loader, 0.1, seed=3)
    assert sum(len(t) for t in a) == 20 and all(torch.equal(s, t) for s, t in zip(a, b))
    assert not torch.equal(torch.cat(a), torch.cat(calibration_subset(loader, 0.1, seed=4)))
    batches = [(x[i:i + 10], y[i:i + 10]) for i in range(0, 200, 10)]
    assert len(calibration_subset(batches, 0.1, seed=0)) == 2


def test_bad_loop_input_is_a_clear_error():
    train, val = task()
    with pytest.raises(ConfigError, match="below the floor"):
        fxcompress.rmtkd(trained(), train, val, _config(accuracy_floor=0.999))
    with pytest.raises(ConfigError, match="val_data"):
        fxcompress.rmtkd(trained(), train, None, _config())
    with pytest.raises(fxcompress.DataError, match="empty"):
        fxcompress.rmtkd(trained(), [], val, _config())
    with pytest.raises(ConfigError, match="calib_fraction"):
        RMTKDConfig(calib_fraction=0)


def test_torchrun_two_processes_pick_the_same_widths(tmp_path):
    """gloo on CPU: covariances merged across ranks give every rank the 1-process widths."""
    script = TESTS / "torchrun_rmtkd.py"
    env = {**os.environ, "PYTHONPATH": str(TESTS), "OMP_NUM_THREADS": "1"}
    runs = {}
    for n in (1, 2):
        out = tmp_path / f"n{n}.json"
        run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
                              str(script), str(out)], env=env, timeout=300, capture_output=True, text=True)
        assert run.returncode == 0, f"torchrun with {n} processes exited {run.returncode}:\n{run.stderr[-3000:]}"
        runs[n] = json.loads(out.read_text())
    assert runs[2]["widths"] == runs[1]["widths"] and runs[2]["widths"]
    assert runs[2]["ranks_agree"] and runs[2]["stop"] == runs[1]["stop"]


def test_the_printed_rounds_keep_whole_group_names():
    name = "model.layers.11.self_attention.query_key_value"  # longer than the old 32-character column
    round_ = Round(0, 0, (name,), {name: [64, 32]}, {name: None}, {name: None}, 100, 80, 0.9, 0.91, True, 1.0)
    result = RMTKDResult(None, (), (round_,), 0.92, 0.90, next(iter(STOPS)), 100, 80, 0.91, 1.0)
    assert name in str(result)
