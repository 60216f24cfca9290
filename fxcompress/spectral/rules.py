"""Rank-selection rules: each turns a spectrum into a count of signal directions.

A rule is a function ``rule(spectrum, *, option=default, ...) -> RuleOutcome`` registered
by name with :func:`register_rule`. Its keyword-only parameters *are* its options: the
dispatcher in :mod:`fxcompress.spectral.selection` rejects unknown ones by reading the
signature, and records the effective values. Adding a rule is one function here.

Rules:
    ``mp-robust``      robust MP bulk fit + Tracy–Widom margin, iterated (the default)
    ``mp-hist``        the RMT-KD paper's rule: quantile init, histogram least squares
    ``gavish-donoho``  optimal hard threshold for unknown noise (Gavish & Donoho 2014)
    ``energy``         smallest k explaining a fraction τ of the variance (PCA heuristic)
    ``fixed``          k = round(ratio·d), or an explicit k
    ``keep-all``       k = d
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np
import scipy.optimize

from fxcompress.errors import ConfigError
from fxcompress.spectral import mp

#: Fewest eigenvalues a bulk fit will run on; below that the bulk is called exhausted.
MIN_BULK = 8


@dataclasses.dataclass(frozen=True, eq=False)
class Spectrum:
    """A validated spectrum: eigenvalues of a ``dim × dim`` covariance from ``n_samples``.

    ``values`` is descending and padded with zeros to ``dim``; ``nonzero`` are the
    eigenvalues that enter noise estimates: the ``n < d`` sampling zeros and the exactly
    dead directions (constant features) are left out, and ``dim_eff`` shrinks by the dead ones.
    """

    values: np.ndarray
    n_samples: int
    dim: int
    nonzero: np.ndarray
    dim_eff: int

    @staticmethod
    def nonzero_floor(top: float, dim: int, n_samples: int) -> float:
        """Eigenvalues at or below this are numerically zero (sampling zeros, dead features)."""
        return 16 * max(dim, n_samples) * float(np.finfo(float).eps) * top

    @property
    def gamma(self) -> float:
        return self.dim_eff / self.n_samples

    def bulk(self, k: int) -> tuple[np.ndarray, float, float]:
        """The non-zero eigenvalues left after removing the top ``k``, their MP ratio and scale.

        Removing ``k`` spike directions uses up ``k`` feature *and* ``k`` sample directions:
        as spikes grow, the other eigenvalues tend to those of ``Xₙᵀ(I - Pₛ)Xₙ / n`` (the Schur
        complement of the spike block), white noise in ``d - k`` dimensions over ``n - k``
        samples, still divided by ``n``; hence the ratio ``(d-k)/(n-k)`` and scale ``(n-k)/n``.
        """
        d_bulk, n_bulk = self.bulk_dims(k)
        return self.nonzero[k:], d_bulk / n_bulk, n_bulk / self.n_samples

    def bulk_dims(self, k: int) -> tuple[int, int]:
        """``(d - k, n - k)``: the noise dimensions and samples left beside ``k`` spikes (≥ 1)."""
        return max(self.dim_eff - k, 1), max(self.n_samples - k, 1)


@dataclasses.dataclass(frozen=True)
class RuleOutcome:
    """What a rule decides: ``n_signal`` eigenvalues above ``threshold``, with its noise fit."""

    n_signal: int
    threshold: float | None
    sigma2: float | None
    extra: dict = dataclasses.field(default_factory=dict)


RuleFn = Callable[..., RuleOutcome]
RULES: dict[str, RuleFn] = {}
#: Rules that model the noise as an MP bulk (they report σ² and λ+).
MP_RULES: set[str] = set()


def register_rule(name: str, *, mp_based: bool = False) -> Callable[[RuleFn], RuleFn]:
    """Register ``fn`` as the rank-selection rule ``name``."""

    def wrap(fn: RuleFn) -> RuleFn:
        RULES[name] = fn
        if mp_based:
            MP_RULES.add(name)
        return fn

    return wrap


# -- building blocks ---------------------------------------------------------------------
def fit_sigma2(bulk: np.ndarray, gamma: float, lo: float = 0.2, hi: float = 0.8) -> float:
    """σ² by least squares of the middle order statistics on MP quantiles (BEMA, Ke–Ma–Lin).

    Only the ``lo..hi`` quantile range enters, so a few spikes above and the fragile lower
    edge below do not move the estimate.
    """
    asc = np.sort(bulk)
    u = (np.arange(1, asc.size + 1) - 0.5) / asc.size
    middle = (u >= lo) & (u <= hi)
    q = mp.quantile(u[middle], gamma)
    return float(q @ asc[middle] / (q @ q))


def count_above(spectrum: Spectrum, threshold: float) -> int:
    return int(np.count_nonzero(spectrum.nonzero > threshold))


def robust_fixed_point(spectrum: Spectrum, alpha: float = 0.99, max_iter: int = 20) -> tuple[int, float, float, int]:
    """Iterate: fit σ² on the bulk, count eigenvalues above the TW edge, drop them, refit.

    Returns ``(k, σ², threshold, iterations)``. ``k`` never leaves fewer than
    :data:`MIN_BULK` eigenvalues (or a tenth of them) in the bulk, nor fewer than
    :data:`MIN_BULK` samples (with correlated samples the effective ``n`` can be small).
    """
    m = spectrum.nonzero.size
    cap = max(0, min(m - max(MIN_BULK, m // 10), spectrum.n_samples - MIN_BULK))
    k, seen = 0, set()
    for iteration in range(1, max_iter + 1):
        bulk, gamma, scale = spectrum.bulk(k)
        sigma2 = fit_sigma2(bulk, gamma) / scale
        d_bulk, n_bulk = spectrum.bulk_dims(k)
        threshold = mp.tracy_widom_edge(n_bulk, d_bulk, sigma2, alpha) * scale
        k_new = min(count_above(spectrum, threshold), cap)
        if k_new == k or k_new in seen:
            return k_new, sigma2, threshold, iteration
        seen.add(k)
        k = k_new
    return k, sigma2, threshold, max_iter


# -- the rules ---------------------------------------------------------------------------
@register_rule("mp-robust", mp_based=True)
def mp_robust(spectrum: Spectrum, *, alpha: float = 0.99, max_iter: int = 20) -> RuleOutcome:
    """Robust MP fit with a Tracy–Widom margin, iterated to a fixed point.

    σ² comes from regressing the middle 20–80 % of the bulk eigenvalues on MP quantiles;
    directions above the Tracy–Widom edge at confidence ``alpha`` are signal; they are
    removed from the bulk and σ² refitted until the count stops changing (2–5 rounds).
    Pure noise gives k = 0 with probability ≈ ``alpha``.
    """
    if alpha not in mp.TRACY_WIDOM_QUANTILES:
        raise ConfigError(f"mp-robust: alpha must be one of {sorted(mp.TRACY_WIDOM_QUANTILES)}, got {alpha!r}")
    if not isinstance(max_iter, int) or isinstance(max_iter, bool) or max_iter < 1:
        raise ConfigError(f"mp-robust: max_iter must be an integer ≥ 1, got {max_iter!r}")
    k, sigma2, threshold, iterations = robust_fixed_point(spectrum, alpha, max_iter)
    return RuleOutcome(k, threshold, sigma2, {"iterations": iterations})


@register_rule("mp-hist", mp_based=True)
def mp_hist(spectrum: Spectrum, *, q: float = 0.5, bins: int = 100) -> RuleOutcome:
    """The RMT-KD paper's rule, as the paper states it.

    σ² starts at the ``q``-quantile of the (non-zero) eigenvalues and is refined by a local
    search (Nelder–Mead from that start) minimising the ℓ2 distance between the eigenvalue
    histogram (``bins`` bins, density-normalised) and the MP density; k = #{λ > λ+} with
    ``λ+ = σ²(1 + √(d/n))²``. The start matters (the paper's ablation varies ``q``); the
    histogram includes the spikes, which biases σ² upward when they are large.
    """
    if not 0.0 < q < 1.0:
        raise ConfigError(f"mp-hist: the quantile q must lie in (0, 1), got {q!r}")
    if not isinstance(bins, int) or bins < 2:
        raise ConfigError(f"mp-hist: bins must be an integer ≥ 2, got {bins!r}")
    values, gamma = spectrum.nonzero, spectrum.gamma
    start = float(np.quantile(values, q))
    hist, edges = np.histogram(values, bins=bins, density=True)
    centres = (edges[:-1] + edges[1:]) / 2.0

    def loss(x: np.ndarray) -> float:
        s2 = float(x[0])
        return math.inf if s2 <= 0 else float(np.sum((hist - mp.density(centres, gamma, s2)) ** 2))

    result = scipy.optimize.minimize(loss, x0=[start], method="Nelder-Mead")
    sigma2 = float(result.x[0])
    threshold = mp.bulk_edges(gamma, sigma2)[1]
    return RuleOutcome(count_above(spectrum, threshold), threshold, sigma2, {"sigma2_init": start})


@register_rule("gavish-donoho", mp_based=True)
def gavish_donoho(spectrum: Spectrum) -> RuleOutcome:
    """Optimal hard threshold for unknown noise: keep √λ above ω(β)·median(√λ).

    It minimises the denoising error rather than detecting spikes, so it sits above the
    bulk edge and keeps fewer directions than the MP rules.
    """
    gamma = spectrum.gamma
    beta = min(gamma, 1.0 / gamma)
    median = float(np.median(spectrum.nonzero))
    threshold = mp.gavish_donoho_omega(beta) ** 2 * median
    sigma2 = median / float(mp.quantile(0.5, gamma))
    return RuleOutcome(count_above(spectrum, threshold), threshold, sigma2, {"beta": beta})


@register_rule("energy")
def energy(spectrum: Spectrum, *, tau: float = 0.9) -> RuleOutcome:
    """Smallest k whose top eigenvalues explain a fraction ``tau`` of the variance (the PCA heuristic)."""
    if not 0.0 < tau <= 1.0:
        raise ConfigError(f"energy: tau must lie in (0, 1], got {tau!r}")
    values = spectrum.values
    explained = np.cumsum(values) / values.sum()
    k = min(int(np.searchsorted(explained, tau * (1 - 1e-12))) + 1, spectrum.dim)
    threshold = float(values[k]) if k < spectrum.dim else 0.0
    return RuleOutcome(k, threshold, None, {"explained": float(explained[k - 1])})


@register_rule("fixed")
def fixed(spectrum: Spectrum, *, ratio: float | None = None, k: int | None = None) -> RuleOutcome:
    """``k = round(ratio · d)``, or the explicit ``k``; exactly one of the two."""
    if (ratio is None) == (k is None):
        raise ConfigError("fixed: give exactly one of ratio= (a fraction of d) or k= (a width)")
    if ratio is not None:
        if not 0.0 <= ratio <= 1.0:
            raise ConfigError(f"fixed: ratio must lie in [0, 1], got {ratio!r}")
        k = round(ratio * spectrum.dim)
    if not isinstance(k, (int, np.integer)) or not 0 <= k <= spectrum.dim:
        raise ConfigError(f"fixed: k must be an integer in [0, {spectrum.dim}], got {k!r}")
    return RuleOutcome(int(k), None, None)


@register_rule("keep-all")
def keep_all(spectrum: Spectrum) -> RuleOutcome:
    """``k = d``: nothing is removed (a no-op baseline)."""
    return RuleOutcome(spectrum.dim, None, None)
