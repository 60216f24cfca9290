"""Spectra with known ground truth, for the spectral tests."""

from __future__ import annotations

import numpy as np
import scipy.linalg

from fxcompress.spectral import eigenvalues


def wishart_eigenvalues(rng: np.random.Generator, d: int, n: int, sigma2: float = 1.0) -> np.ndarray:
    """Non-zero eigenvalues of ``XᵀX/n`` for ``X`` an ``n × d`` matrix of N(0, σ²) entries.

    Drawn exactly in O(d²) from the Dumitriu–Edelman bidiagonal model of the real Wishart
    (β = 1) ensemble: ``B`` with diagonal ``χ_{M-i}`` and subdiagonal ``χ_{m-1-i}``,
    ``m = min(d, n)``, ``M = max(d, n)``; ``BBᵀ`` has the law of ``XᵀX``'s non-zero spectrum.
    """
    m, big = min(d, n), max(d, n)
    a = np.sqrt(rng.chisquare(big - np.arange(m)))
    b = np.sqrt(rng.chisquare(m - 1 - np.arange(m - 1)))
    diag = a**2 + np.concatenate([[0.0], b**2])
    off = a[:-1] * b
    return sigma2 * scipy.linalg.eigvalsh_tridiagonal(diag, off)[::-1] / n


def spiked_eigenvalues(rng: np.random.Generator, d: int, n: int, ells, scale: float = 1.0) -> np.ndarray:
    """Eigenvalues of the sample covariance of ``n`` draws from N(0, σ²(I + Σ(ℓᵢ - 1)vᵢvᵢᵀ)).

    The spike directions are random (a random rotation does not change the spectrum, so
    coordinate axes stand in for them). Computed from the smaller of the two Gram matrices.
    """
    ells = np.asarray(ells, dtype=np.float64)
    x = rng.standard_normal((n, d)) * scale
    x[:, : ells.size] *= np.sqrt(ells)
    return eigenvalues(x.T @ x / n) if n >= d else eigenvalues(x @ x.T / n)


def ar1_tokens(rng: np.random.Generator, batch: int, tokens: int, d: int, rho: float) -> np.ndarray:
    """``(batch, tokens, d)`` white-across-features noise, AR(1) along the tokens (unit variance)."""
    e = rng.standard_normal((batch, tokens, d))
    x = np.empty_like(e)
    x[:, 0] = e[:, 0]
    for t in range(1, tokens):
        x[:, t] = rho * x[:, t - 1] + np.sqrt(1 - rho**2) * e[:, t]
    return x
