"""fxcompress: spectral (RMT-KD) compression of neural networks as a torch.fx model-surgery pass.

The pipeline, one module per stage:

* :mod:`fxcompress.spectral` — covariance of hidden activations, Marchenko–Pastur noise
  bulk, and the rules that choose how many directions a layer keeps.

Every error raised on purpose derives from :class:`FxCompressError`.
"""

from fxcompress.errors import ConfigError, DataError, DatasetError, FxCompressError
from fxcompress.spectral import CovarianceAccumulator, RankSelection, select_rank

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "CovarianceAccumulator",
    "DataError",
    "DatasetError",
    "FxCompressError",
    "RankSelection",
    "select_rank",
]
