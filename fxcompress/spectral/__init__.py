"""The spectral stage: activations → covariance → noise bulk → how many directions to keep.

* :class:`CovarianceAccumulator` streams float64 covariances of hidden activations;
* :func:`select_rank` turns eigenvalues into a width ``k`` with a named rule
  (``mp-robust``, ``mp-hist`` — the RMT-KD paper's — ``gavish-donoho``, ``energy``,
  ``fixed``, ``keep-all``);
* :mod:`fxcompress.spectral.mp` holds the Marchenko–Pastur law and the Tracy–Widom edge;
* :func:`plot_spectrum` draws the paper's Fig. 2 for one spectrum, :func:`plot_spectra` a panel per group.

Example:
    >>> import numpy as np
    >>> acc = CovarianceAccumulator(64)
    >>> acc.update(np.random.default_rng(0).standard_normal((5000, 64)))
    >>> acc.select_rank("mp-robust").k
    0
"""

from fxcompress.spectral.covariance import CovarianceAccumulator, channel_samples
from fxcompress.spectral.plot import plot_spectra, plot_spectrum
from fxcompress.spectral.rules import RULES, RuleOutcome, Spectrum, register_rule
from fxcompress.spectral.selection import (Diagnostics, RankSelection, eigenvalues, pooled_effective_samples,
                                           select_rank)

__all__ = [
    "RULES",
    "CovarianceAccumulator",
    "Diagnostics",
    "RankSelection",
    "RuleOutcome",
    "Spectrum",
    "channel_samples",
    "eigenvalues",
    "plot_spectra",
    "plot_spectrum",
    "pooled_effective_samples",
    "register_rule",
    "select_rank",
]
