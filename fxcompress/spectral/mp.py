"""The noise model of the spectral stage: the Marchenko–Pastur law and the Tracy–Widom edge.

Conventions used throughout :mod:`fxcompress.spectral`: ``Σ = XᵀX / n`` for ``n`` samples
of ``d`` features carrying i.i.d. noise of variance ``σ²``, and ``γ = d / n``. The
*non-zero* eigenvalues of ``Σ`` fill ``[λ-, λ+]`` with ``λ± = σ²(1 ± √γ)²`` whether
``γ ≤ 1`` or ``γ > 1``. Every function here describes the law of those non-zero
eigenvalues, so that ``n < d`` needs no special case downstream.

Example:
    >>> round(bulk_edges(0.25)[1], 4)          # λ+ for σ² = 1, d/n = 1/4
    2.25
    >>> round(float(quantile(0.5, 1.0)), 3)    # median of MP at d = n
    0.653
"""

from __future__ import annotations

import functools
import math

import numpy as np

_GRID = 4097

#: Quantiles of the Tracy–Widom law for real data (β = 1), by confidence level.
TRACY_WIDOM_QUANTILES: dict[float, float] = {0.90: 0.4501, 0.95: 0.9793, 0.99: 2.0234}


def bulk_edges(gamma: float, sigma2: float = 1.0) -> tuple[float, float]:
    """``(λ-, λ+) = σ²(1 ∓ √γ)²``, the support of the non-zero MP eigenvalues."""
    root = math.sqrt(gamma)
    return sigma2 * (1.0 - root) ** 2, sigma2 * (1.0 + root) ** 2


def density(x: np.ndarray, gamma: float, sigma2: float = 1.0) -> np.ndarray:
    """Density of the non-zero eigenvalues (it integrates to 1 for every γ)."""
    x = np.asarray(x, dtype=np.float64)
    lo, hi = bulk_edges(gamma, sigma2)
    out = np.zeros_like(x)
    inside = (x > lo) & (x < hi)
    xi = x[inside]
    out[inside] = np.sqrt((hi - xi) * (xi - lo)) / (2.0 * math.pi * sigma2 * min(gamma, 1.0) * xi)
    return out


@functools.lru_cache(maxsize=256)
def _cdf_table(gamma: float) -> tuple[np.ndarray, np.ndarray]:
    """CDF of MP(γ, σ²=1) on a grid, integrated in θ where x = a + (b-a)(1-cos θ)/2.

    The substitution removes the square-root endpoints (and the 1/√x pole at γ = 1), so
    the integrand is smooth and the trapezoid rule is accurate to ~1e-8.
    """
    lo, hi = bulk_edges(gamma)
    theta = np.linspace(0.0, math.pi, _GRID)
    half = (hi - lo) / 2.0
    x = lo + half * (1.0 - np.cos(theta))
    with np.errstate(divide="ignore", invalid="ignore"):
        g = half**2 * np.sin(theta) ** 2 / (2.0 * math.pi * min(gamma, 1.0) * x)
    if lo == 0.0:
        g[0] = half**2 * 2.0 / (2.0 * math.pi * half)  # limit of sin²θ / (1 - cos θ) = 2
    steps = np.diff(theta) * (g[1:] + g[:-1]) / 2.0
    cdf = np.concatenate([[0.0], np.cumsum(steps)])
    return x, cdf / cdf[-1]


def cdf(x: np.ndarray, gamma: float, sigma2: float = 1.0) -> np.ndarray:
    """Cumulative distribution of the non-zero MP eigenvalues."""
    grid, values = _cdf_table(float(gamma))
    return np.interp(np.asarray(x, dtype=np.float64) / sigma2, grid, values, left=0.0, right=1.0)


def quantile(p: np.ndarray | float, gamma: float, sigma2: float = 1.0) -> np.ndarray:
    """Inverse of :func:`cdf`: where a fraction ``p`` of the non-zero eigenvalues lies below."""
    grid, values = _cdf_table(float(gamma))
    return sigma2 * np.interp(np.asarray(p, dtype=np.float64), values, grid)


def mean(gamma: float) -> float:
    """Mean of the non-zero MP eigenvalues for σ² = 1: the trace ``d`` spread over ``min(d, n)``."""
    return max(gamma, 1.0)


def tracy_widom_edge(n: float, d: float, sigma2: float, alpha: float = 0.99) -> float:
    """Largest noise eigenvalue of ``Σ = XᵀX / n`` that is not exceeded with probability α.

    Johnstone (2001) centring and scaling with Ma's (2012) half-integer corrections:
    ``λ_TW = (σ²/n)[(√n'+√d')² + s_α (√n'+√d')(1/√n' + 1/√d')^{1/3}]``, ``n' = n - ½``,
    ``d' = d - ½``. Symmetric in ``n`` and ``d``, so it holds for ``n < d`` too.
    """
    s_alpha = TRACY_WIDOM_QUANTILES[alpha]
    rn, rd = math.sqrt(n - 0.5), math.sqrt(d - 0.5)
    centre = (rn + rd) ** 2
    scale = (rn + rd) * (1.0 / rn + 1.0 / rd) ** (1.0 / 3.0)
    return sigma2 / n * (centre + s_alpha * scale)


def gavish_donoho_omega(beta: float) -> float:
    """ω(β) of Gavish & Donoho (2014): keep singular values above ω(β)·median.

    The exact form ``λ*(β) / √μ_β``, with μ_β the median of MP(β) for σ² = 1.
    """
    lam_star = math.sqrt(2.0 * (beta + 1.0) + 8.0 * beta / (beta + 1.0 + math.sqrt(beta**2 + 14.0 * beta + 1.0)))
    return lam_star / math.sqrt(float(quantile(0.5, beta)))
