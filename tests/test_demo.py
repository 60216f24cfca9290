"""`make demo` cannot rot: its script runs end to end (shortened) and writes its report."""

import json
import subprocess
import sys
from pathlib import Path

DEMO = Path(__file__).parents[1] / "tools" / "demo.py"


def test_demo_runs_end_to_end(tmp_path):
    proc = subprocess.run([sys.executable, str(DEMO), "--out", str(tmp_path), "--epochs", "3", "--tune-epochs", "1"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "RMT-KD:" in proc.stdout and "test accuracy" in proc.stdout
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["params_final"] <= report["params_original"] and report["rounds"]
    assert (tmp_path / "checkpoint.pt").exists()
