import importlib.util
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


def pytest_report_header(config):
    return f"evaluation data: {os.environ.get('FXCOMPRESS_DATA') or 'none (FXCOMPRESS_DATA is unset): its tests skip'}"


@pytest.fixture(scope="session")
def data_root():
    """The evaluation-data directory. ``make test`` sets FXCOMPRESS_DATA to ../shared/data
    where that exists; without it these tests skip, but a set path that does not exist is an
    error (a mistyped path must not pass as a skip)."""
    from fxcompress.datasets import data_dir

    if not os.environ.get("FXCOMPRESS_DATA"):
        pytest.skip("FXCOMPRESS_DATA is not set: no evaluation data here (make test sets it to ../shared/data "
                    "where that exists)")
    return data_dir()


BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


def load_benchmark(monkeypatch, name: str):
    """``benchmarks/<name>.py`` as a module, with benchmarks/ on the path for its own imports
    (registered in sys.modules: dataclasses look their module up there)."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    return module
