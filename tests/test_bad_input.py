"""Bad input ends in a clear error naming what was wrong, and leaves nothing half-written:
configs, the command line, dataset files, temporary files, output folders, numerical edges."""

import errno
import fcntl
import gzip
import io
import lzma
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import fxcompress
from fxcompress import CompressConfig, ConfigError, DataError, DatasetError, DistillConfig, RMTKDConfig
from fxcompress.atomic import atomic_path, scratch_dir, staged_dir
from fxcompress.bench import BenchConfig
from fxcompress.cli import main
from fxcompress.datasets import cifar10, glue
from fxcompress.export import export_onnx
from fxcompress.rmtkd import CHECKPOINT
from planted import task, trained

FAST = ["--batch-sizes", "1", "--repeats", "1", "--min-runs", "2", "--min-seconds", "0", "--warmup-runs", "0",
        "--warmup-seconds", "0"]


# -- configs ------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls, field, value", [
    (CompressConfig, "ratio", 0.0), (CompressConfig, "ratio", 1.5), (CompressConfig, "q", 1.0),
    (CompressConfig, "q", "0.5"), (CompressConfig, "round_to", 0), (CompressConfig, "tau", 0.0),
    (CompressConfig, "alpha", 0.5), (CompressConfig, "k", 0), (CompressConfig, "k", 2.5), (CompressConfig, "k", True),
    (CompressConfig, "targets", None), (CompressConfig, "fold_mean", "yes"), (CompressConfig, "min_rank", 0),
    (DistillConfig, "clip_grad_norm", 0.0), (DistillConfig, "log_every", 0), (DistillConfig, "momentum", -0.1),
    (DistillConfig, "weight_decay", -1e-4), (DistillConfig, "epochs", 1.5), (DistillConfig, "lr", float("nan")),
    (DistillConfig, "warmup_steps", -1), (RMTKDConfig, "max_drop", float("nan")), (RMTKDConfig, "max_drop", -0.1),
    (RMTKDConfig, "compress", {"rule": "fixed"}), (RMTKDConfig, "distill", "adamw"),
    (RMTKDConfig, "calib_fraction", 0.0), (BenchConfig, "repeats", "3"),
])
def test_a_config_field_out_of_range_or_of_the_wrong_type_is_named(cls, field, value):
    fixed = {"rule": "fixed"} if cls is CompressConfig and field in ("ratio", "k") else {}
    with pytest.raises(ConfigError, match=rf"{cls.__name__}\.{field}"):
        cls(**{field: value}, **fixed)


def test_a_list_of_targets_is_taken_as_a_tuple():
    assert CompressConfig(targets=["a", "b*"]).targets == ("a", "b*")


def test_select_rank_refuses_max_iter_zero():
    with pytest.raises(ConfigError, match="max_iter must be an integer ≥ 1"):
        fxcompress.select_rank(np.linspace(1, 2, 50), 100, "mp-robust", max_iter=0)


def test_activations_too_large_to_square_keep_the_group_whole_and_say_why():
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)).double().eval()
    result = fxcompress.compress(model, [torch.randn(64, 8, dtype=torch.float64) * 1e200 for _ in range(2)])
    hidden = next(r for r in result.report if r.d == 32)
    assert hidden.k == 32 and "overflows float64" in hidden.frozen_by[0]


@pytest.mark.parametrize("opset", [0, 6, 10_000, "18"])
def test_export_refuses_an_opset_outside_the_range(tmp_path, opset):
    with pytest.raises(ConfigError, match="opset must be an integer"):
        export_onnx(torch.nn.Linear(4, 2), torch.randn(2, 4), tmp_path / "m.onnx", opset=opset)
    assert not list(tmp_path.iterdir())


def test_export_reports_the_opset_it_wrote(tmp_path):
    report = export_onnx(torch.nn.Linear(4, 2), torch.randn(2, 4), tmp_path / "m.onnx", opset=17,
                         exporter="torchscript", fallback=False)
    assert report.opset == 17


# -- the command line ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def onnx_pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pair")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).eval()
    export_onnx(model, torch.randn(2, 8), folder / "a.onnx")
    export_onnx(model, torch.randn(2, 8), folder / "b.onnx")
    wide = torch.nn.Sequential(torch.nn.Linear(16, 4)).eval()
    export_onnx(wide, torch.randn(2, 16), folder / "wide.onnx")
    return folder


def _fails_cleanly(argv, capsys, out, words):
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()  # progress lines, then one line for the error
    errors = [line for line in lines if "error" in line.lower() or "Traceback" in line]
    assert errors == lines[-1:] and lines[-1].startswith("fxcompress-bench: error:") and words in lines[-1], lines
    assert not out.exists() or not [p for p in out.iterdir() if not p.name.startswith(".")]


def test_out_that_is_a_file_exits_2(onnx_pair, tmp_path, capsys):
    out = tmp_path / "taken"
    out.write_text("mine")
    _fails_cleanly(["compare", str(onnx_pair / "a.onnx"), str(onnx_pair / "b.onnx"), "--out", str(out), *FAST],
                   capsys, tmp_path / "nothing", "is a file")
    assert out.read_text() == "mine"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_out_exits_2(onnx_pair, tmp_path, capsys):
    out = tmp_path / "ro"
    out.mkdir(mode=0o500)
    _fails_cleanly(["compare", str(onnx_pair / "a.onnx"), str(onnx_pair / "b.onnx"), "--out", str(out), *FAST],
                   capsys, out, "not writable")


def test_a_full_disk_leaves_nothing_in_out(onnx_pair, tmp_path, capsys, monkeypatch):
    def full(results, out):
        (out / "results.json").write_text("{")  # half-way through, the disk fills up
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr("fxcompress.results.write_results", full)
    out = tmp_path / "bench"
    _fails_cleanly(["compare", str(onnx_pair / "a.onnx"), str(onnx_pair / "b.onnx"), "--out", str(out), *FAST],
                   capsys, out, "No space left")
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".bench")]


def test_inputs_whose_fixed_dims_differ_exit_2(onnx_pair, tmp_path, capsys):
    out = tmp_path / "bench"
    _fails_cleanly(["compare", str(onnx_pair / "a.onnx"), str(onnx_pair / "wide.onnx"), "--out", str(out), *FAST],
                   capsys, out, "same input signature")


def test_missing_external_data_exits_2(tmp_path, capsys):
    import onnx

    model = torch.nn.Sequential(torch.nn.Linear(64, 64)).eval()
    export_onnx(model, torch.randn(2, 64), tmp_path / "a.onnx")
    proto = onnx.load(str(tmp_path / "a.onnx"))
    onnx.save(proto, str(tmp_path / "ext.onnx"), save_as_external_data=True, location="ext.data", size_threshold=0)
    (tmp_path / "ext.data").unlink()
    out = tmp_path / "bench"
    _fails_cleanly(["compare", str(tmp_path / "a.onnx"), str(tmp_path / "ext.onnx"), "--out", str(out), *FAST],
                   capsys, out, "which is missing")


def test_two_programs_of_one_file_name_keep_both(tmp_path):
    for folder in ("x", "y"):
        (tmp_path / folder).mkdir()
        program = torch.export.export(torch.nn.Linear(8, 4), (torch.randn(2, 8),))
        torch.export.save(program, tmp_path / folder / "model.pt2")
    out = tmp_path / "bench"
    assert main(["compare", str(tmp_path / "x" / "model.pt2"), str(tmp_path / "y" / "model.pt2"), "--trust-pt2",
                 "--out", str(out), *FAST]) == 0
    assert (out / "model-1.onnx").is_file() and (out / "model-2.onnx").is_file()


def test_a_truncated_dataset_exits_2(onnx_pair, tmp_path, capsys):
    root = tmp_path / "data"
    (root / "cifar10").mkdir(parents=True)
    (root / "cifar10" / "test_batch_first1000.npz.xz").write_bytes(_npz_xz(np.zeros((4, 32, 32, 3), np.uint8),
                                                                          np.zeros(4, np.int64))[:100])
    out = tmp_path / "bench"
    _fails_cleanly(["compare", str(onnx_pair / "a.onnx"), str(onnx_pair / "b.onnx"), "--data", "cifar10",
                    "--data-dir", str(root), "--out", str(out), *FAST], capsys, out, "damaged or truncated")


# -- dataset files -------------------------------------------------------------------------------
def _npz_xz(x, y) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, x=x, y=y)
    return lzma.compress(buffer.getvalue())


@pytest.mark.parametrize("content, words", [
    (lambda: _npz_xz(np.zeros((4, 32, 32, 3), np.uint8), np.zeros(4, np.int64))[:-20], "damaged or truncated"),
    (lambda: lzma.compress(b"not a zip"), "damaged or truncated"),
    (lambda: _npz_xz(np.zeros((4, 32, 32), np.uint8), np.zeros(4, np.int64)), "shaped"),
    (lambda: _npz_xz(np.zeros((4, 32, 32, 3), np.uint8), np.zeros(3, np.int64)), "one per image"),
    (lambda: _npz_xz(np.zeros((4, 32, 32, 3), np.uint8), np.full(4, np.nan)), "integer labels"),
    (lambda: _npz_xz(np.zeros((4, 32, 32, 3), np.uint8), np.full(4, 11)), "0–9"),
])
def test_a_bad_cifar_file_is_a_dataset_error_naming_it(tmp_path, content, words):
    (tmp_path / "cifar10").mkdir()
    path = tmp_path / "cifar10" / "data_batch_1.npz.xz"
    path.write_bytes(content())
    with pytest.raises(DatasetError, match=words) as info:
        cifar10(tmp_path, ["data_batch_1"])
    assert str(path) in str(info.value)


@pytest.mark.parametrize("content, words", [
    (lambda: gzip.compress(b"sentence\tlabel\nfine\t1\n" * 50)[:-30], "damaged or truncated"),
    (lambda: b"not gzip at all", "damaged or truncated"),
    (lambda: gzip.compress(b""), "no header"),
    (lambda: gzip.compress(b"sentence\tlabel\n"), "no rows"),
    (lambda: gzip.compress(b"sentence\tlabel\nfine\tmaybe\n"), "expected GLUE"),
])
def test_a_bad_glue_file_is_a_dataset_error_naming_it(tmp_path, content, words):
    (tmp_path / "sst2").mkdir()
    path = tmp_path / "sst2" / "train.tsv.gz"
    path.write_bytes(content())
    with pytest.raises(DatasetError, match=words) as info:
        glue("sst2", "train", tmp_path)
    assert str(path) in str(info.value)


# -- temporary files -----------------------------------------------------------------------------
def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_the_next_write_removes_what_a_killed_writer_left(tmp_path):
    target = tmp_path / "checkpoint.pt"
    orphan = tmp_path / f".checkpoint.pt.{_dead_pid()}.abcd.pt"
    orphan.write_bytes(b"x" * 1000)
    alive = tmp_path / f".checkpoint.pt.{os.getpid()}.efgh.pt"  # a write in progress: not ours to remove
    alive.write_bytes(b"y")
    with atomic_path(target) as tmp:
        tmp.write_text("done")
    assert target.read_text() == "done" and not orphan.exists() and alive.exists()


def test_scratch_and_staging_folders_of_dead_processes_are_removed(tmp_path):
    import tempfile

    stale = tempfile.mkdtemp(prefix=f"fxcompress-{_dead_pid()}.")
    with scratch_dir() as folder:
        assert folder.is_dir()
    assert not os.path.exists(stale) and not folder.exists()
    stage = tmp_path / f".bench.{_dead_pid()}.xyz"
    stage.mkdir()
    with staged_dir(tmp_path / "bench") as work:
        (work / "results.json").write_text("{}")
    assert not stage.exists() and (tmp_path / "bench" / "results.json").read_text() == "{}"


# -- the RMT-KD output folder --------------------------------------------------------------------
def _config(**kwargs):
    return RMTKDConfig(compress=CompressConfig(rule="mp-robust", round_to=1),
                       distill=DistillConfig(epochs=1, progress=False), max_drop=0.05, max_rounds=1, **kwargs)


def test_an_earlier_run_is_refused_without_resume_or_overwrite(tmp_path):
    train, val = task()
    fxcompress.rmtkd(trained(), train[:5], val, _config(), out_dir=tmp_path)
    with pytest.raises(ConfigError, match="holds an earlier run.*resume=True.*overwrite=True"):
        fxcompress.rmtkd(trained(), train[:5], val, _config(), out_dir=tmp_path)
    before = (tmp_path / "metrics.jsonl").read_text()
    fxcompress.rmtkd(trained(), train[:5], val, _config(), out_dir=tmp_path, overwrite=True)
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == before.count("\n")  # a fresh log, not appended


def test_two_runs_never_share_an_out_dir(tmp_path):
    train, val = task()
    with open(tmp_path / ".lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with pytest.raises(ConfigError, match="another RMT-KD run is writing"):
            fxcompress.rmtkd(trained(), train[:5], val, _config(), out_dir=tmp_path)


def test_resume_with_a_seeded_dataloader_equals_the_uninterrupted_run(tmp_path):
    x = torch.cat([b[0] for b in task()[0]])
    y = torch.cat([b[1] for b in task()[0]])
    _, val = task()

    def loader():
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=100, shuffle=True,
                                           generator=torch.Generator().manual_seed(7))
    config = RMTKDConfig(compress=CompressConfig(rule="mp-robust", round_to=1),
                         distill=DistillConfig(epochs=1, progress=False), max_drop=0.05, target_reduction=0.99,
                         max_passes=1)
    whole = fxcompress.rmtkd(trained(depth=2), loader(), val, config, out_dir=tmp_path / "whole")

    class Killed(Exception):
        pass

    def kill(record):
        raise Killed
    with pytest.raises(Killed):
        fxcompress.rmtkd(trained(depth=2), loader(), val, config, out_dir=tmp_path / "killed", on_round=kill)
    resumed = fxcompress.rmtkd(trained(depth=2), loader(), val, config, out_dir=tmp_path / "killed", resume=True)
    assert sum(r.narrowed for r in whole.rounds) == 2
    a, b = whole.module.state_dict(), resumed.module.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_killed_compare_leaves_no_temporary_files(onnx_pair, tmp_path):
    import tempfile
    import time

    out = tmp_path / "bench"
    proc = subprocess.Popen([sys.executable, "-m", "fxcompress.cli", "compare", str(onnx_pair / "a.onnx"),
                             str(onnx_pair / "b.onnx"), "--out", str(out), "--min-seconds", "30",
                             "--max-seconds", "30", "--repeats", "1", "--batch-sizes", "1"],
                            stderr=subprocess.PIPE, text=True)
    assert "repeat 1/1" in proc.stderr.readline()  # measuring: the scratch and staging folders exist
    time.sleep(0.5)
    proc.terminate()
    assert proc.wait(timeout=60) == 128 + 15
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".bench")]
    assert not list(Path(tempfile.gettempdir()).glob(f"fxcompress-{proc.pid}.*"))
