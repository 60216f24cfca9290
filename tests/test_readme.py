"""The README's Python snippets run as written: in order, in one interpreter, as a reader
pastes them into one session (each defines the data it uses, or an earlier one did)."""

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).parents[1] / "README.md"


def snippets() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", README.read_text(encoding="utf-8"), flags=re.S | re.M)


def test_the_readme_has_snippets_for_each_stage():
    text = "\n".join(snippets())
    for call in ("fxcompress.compress(", "result.to_module()", "result.save(", "fxcompress.load(", "fxcompress.rmtkd(",
                 "fxcompress.export_onnx(", "CovarianceAccumulator("):
        assert call in text, call


def test_every_readme_snippet_runs_as_written(tmp_path):
    program = "\n".join(f"print('--- snippet {i}', flush=True)\n{code}" for i, code in enumerate(snippets(), 1))
    done = subprocess.run([sys.executable, "-c", program], cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-1500:] + done.stderr[-3000:]
    assert done.stdout.count("--- snippet") == len(snippets())
