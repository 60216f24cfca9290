"""``python -m fxcompress``: the ``fxcompress`` command."""

import sys

from fxcompress.cli import cli

sys.exit(cli())
