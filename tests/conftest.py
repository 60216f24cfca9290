import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def data_root():
    """The evaluation-data directory. ``make test`` sets FXCOMPRESS_DATA; a bare pytest
    without it skips these tests, but a set path that does not exist is an error."""
    import os

    from fxcompress.datasets import data_dir

    if not os.environ.get("FXCOMPRESS_DATA"):
        pytest.skip("FXCOMPRESS_DATA is not set (make test sets it)")
    return data_dir()
