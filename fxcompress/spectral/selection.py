"""``select_rank``: from a covariance spectrum to the width ``k`` a layer keeps.

The spectrum is validated once (:class:`~fxcompress.spectral.rules.Spectrum`), handed to
the named rule, and the rule's count of signal directions is turned into a width by the
options every rule honours (``min_rank``, ``round_to``). Diagnostics say how far the
spectrum is from "MP noise plus spikes", the model every RMT rule relies on, so a user
can tell a trustworthy k from one that depends on the estimator.

Example:
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> x = rng.standard_normal((4000, 200))
    >>> x[:, :3] *= 4.0                          # three strong directions
    >>> eig = eigenvalues(np.cov(x, rowvar=False))
    >>> sel = select_rank(eig, n_samples=3999, round_to=1)
    >>> sel.k, sel.diagnostics.heavy_tailed
    (3, False)
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import scipy.optimize

from fxcompress.errors import ConfigError, DataError
from fxcompress.spectral import mp
from fxcompress.spectral.rules import MP_RULES, RULES, RuleOutcome, Spectrum, fit_sigma2, robust_fixed_point

#: A bulk of m eigenvalues whose KS distance to the fitted MP law exceeds
#: max(KS_FLOOR, 1/√m) is flagged as not MP (MP eigenvalues are rigid: on noise it is ≪ 1/√m).
KS_FLOOR = 0.05
#: More than this fraction of directions above the edge is not "a few spikes".
SPIKE_FRACTION_LIMIT = 0.25
#: σ² estimators (quantile fit, median, mean) disagreeing by more than this are flagged.
SPREAD_LIMIT = 0.1
#: With fewer non-zero eigenvalues there is no noise bulk to fit: the rules that fit one
#: (the MP rules and Gavish–Donoho) then keep every direction that has variance.
MIN_EIGENVALUES = 16


@dataclasses.dataclass(frozen=True)
class Diagnostics:
    """How well the spectrum fits "MP bulk plus spikes" (computed for every rule)."""

    ks_distance: float
    sigma2_estimates: dict[str, float]
    sigma2_spread: float
    heavy_tailed: bool
    bulk_exhausted: bool
    dead_directions: int
    effective_samples: int | None
    warnings: tuple[str, ...]
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True, eq=False)
class RankSelection:
    """The outcome of :func:`select_rank`.

    Attributes:
        k: the width to keep (after ``min_rank`` and ``round_to``; never above ``dim``).
        n_signal: eigenvalues the rule counted as signal, before flooring and rounding.
        sigma2, lambda_plus: the noise variance and MP bulk edge ``σ²(1+√(d/n))²`` (MP rules).
        threshold: eigenvalues strictly above it were counted as signal.
        gamma: the ratio d/n of the noise model (dead features and correlated samples
            accounted for).
        eigenvalues: the spectrum, descending, padded with zeros to ``dim``.
    """

    k: int
    n_signal: int
    rule: str
    options: dict[str, Any]
    sigma2: float | None
    lambda_plus: float | None
    threshold: float | None
    dim: int
    n_samples: int
    gamma: float
    eigenvalues: np.ndarray = dataclasses.field(repr=False)
    diagnostics: Diagnostics = dataclasses.field(repr=False)

    def to_dict(self, eigenvalues: bool = False) -> dict[str, Any]:
        """A JSON-ready dict (the eigenvalues only on request)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "eigenvalues"}
        out["diagnostics"] = dataclasses.asdict(self.diagnostics)
        if eigenvalues:
            out["eigenvalues"] = self.eigenvalues.tolist()
        return _jsonable(out)

    def __str__(self) -> str:
        noise = "" if self.sigma2 is None else f", σ²={self.sigma2:.4g}, λ+={self.lambda_plus:.4g}"
        flag = " [not MP: see diagnostics]" if self.diagnostics.heavy_tailed else ""
        return f"{self.rule}: keep {self.k} of {self.dim} ({self.n_signal} above threshold{noise}){flag}"


def eigenvalues(matrix: Any) -> np.ndarray:
    """Eigenvalues (descending) of a symmetric covariance, refusing matrices that are not."""
    a = np.asarray(matrix, dtype=np.float64) if not np.iscomplexobj(matrix) else None
    if a is None or a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise DataError(f"eigenvalues needs a real square covariance matrix, got {np.shape(matrix)}")
    if not np.all(np.isfinite(a)):
        raise DataError("the covariance holds NaN/Inf: check the activations it was computed from")
    asym = float(np.max(np.abs(a - a.T), initial=0.0))
    if asym > 1e-8 * max(float(np.max(np.abs(a), initial=0.0)), np.finfo(float).tiny):
        raise DataError(f"the matrix is not symmetric (max |A - Aᵀ| = {asym:.3g}): pass a covariance matrix")
    return np.linalg.eigvalsh(a)[::-1]


def select_rank(
    eigenvalues: Any,
    n_samples: int,
    rule: str = "mp-robust",
    *,
    dim: int | None = None,
    min_rank: int = 0,
    round_to: int = 8,
    null_eigenvalues: Any = None,
    n_effective: int | None = None,
    **options: Any,
) -> RankSelection:
    """Choose how many directions of a covariance spectrum to keep.

    Args:
        eigenvalues: eigenvalues of the ``d × d`` covariance ``XᵀX / n`` (any order), or
            only its non-zero ones (e.g. from the ``n × n`` Gram matrix) together with ``dim``.
        n_samples: the ``n`` of the covariance (its degrees of freedom: ``n - 1`` if centred).
        rule: a name in :data:`fxcompress.spectral.rules.RULES`.
        dim: ``d`` when fewer than ``d`` eigenvalues are given (the rest are zero).
        min_rank: keep at least this many directions.
        round_to: round k up to a multiple of this (hardware-friendly widths), never above d.
        null_eigenvalues: spectrum of the circular-shift null's *correlation* matrix
            (correlated samples, e.g. tokens); MP rules then use the effective sample size
            it implies instead of ``n_samples``.
        n_effective: that effective sample size, when already known (e.g. from
            :func:`pooled_effective_samples` over the heads of a layer); not with ``null_eigenvalues``.
        **options: the rule's own options (see each rule's docstring).
    """
    fn = _lookup(rule)
    _check_common(min_rank, round_to)
    spectrum = _spectrum(eigenvalues, n_samples, dim, "eigenvalues")
    if null_eigenvalues is not None and n_effective is not None:
        raise ConfigError("pass null_eigenvalues or n_effective, not both (n_effective is what the null implies)")
    effective = None
    if null_eigenvalues is not None and rule in MP_RULES:
        effective = effective_samples(_spectrum(null_eigenvalues, n_samples, spectrum.dim, "null_eigenvalues"))
    elif n_effective is not None and rule in MP_RULES:
        if not isinstance(n_effective, (int, np.integer)) or not 2 <= n_effective <= n_samples:
            raise ConfigError(f"n_effective must be an integer in [2, n_samples={n_samples}], got {n_effective!r}")
        effective = int(n_effective)
    if effective is not None:
        spectrum = dataclasses.replace(spectrum, n_samples=effective)
    checked = _check_options(rule, fn, options)
    if rule in MP_RULES and spectrum.nonzero.size < MIN_EIGENVALUES:
        outcome = RuleOutcome(spectrum.nonzero.size, None, None)
        diagnostics = _too_few(spectrum, effective)
    else:
        outcome = fn(spectrum, **checked)
        diagnostics = _diagnose(spectrum, rule, outcome.sigma2, outcome.n_signal, effective, outcome.extra)
    k = _width(outcome.n_signal, min_rank, round_to, spectrum.dim)
    lambda_plus = None if outcome.sigma2 is None else mp.bulk_edges(spectrum.gamma, outcome.sigma2)[1]
    effective_options = {**_defaults(fn), **options, "min_rank": min_rank, "round_to": round_to}
    return RankSelection(k, outcome.n_signal, rule, effective_options, outcome.sigma2, lambda_plus, outcome.threshold,
                         spectrum.dim, spectrum.n_samples, spectrum.gamma, spectrum.values, diagnostics)


def effective_samples(null: Spectrum) -> int:
    """The sample size whose MP law best fits a null spectrum (≤ the nominal ``n``).

    Correlated samples spread the null spectrum as fewer independent samples would; the
    ratio γ is fitted by least squares of the upper order statistics (50–99 %, where the
    edge that decides k lives) on MP quantiles.
    """
    return _fit_effective([null])


def pooled_effective_samples(nulls: Sequence[Any], n_samples: int) -> int:
    """One effective sample size from several null correlation spectra of the same size and
    samples (the heads of one attention layer): their eigenvalues are pooled, as draws of
    one MP law, into a single fit: steadier than a fit to one head's few eigenvalues, and
    one fit instead of one per head.
    """
    spectra = [_spectrum(values, n_samples, None, "null_eigenvalues") for values in nulls]
    if not spectra or len({s.dim for s in spectra}) != 1:
        raise DataError(f"pooled_effective_samples needs null spectra of one size, got sizes {[s.dim for s in spectra]}")
    return _fit_effective(spectra)


def _fit_effective(nulls: Sequence[Spectrum]) -> int:
    lo, hi = 0.5, 0.99
    asc = np.sort(np.concatenate([null.nonzero for null in nulls]))
    u = (np.arange(1, asc.size + 1) - 0.5) / asc.size
    sel = (u >= lo) & (u <= hi)

    def residual(log_gamma: float) -> float:
        gamma = math.exp(log_gamma)
        q = mp.quantile(u[sel], gamma)
        sigma2 = fit_sigma2(asc, gamma, lo, hi)
        return float(np.sum((asc[sel] - sigma2 * q) ** 2))

    best = scipy.optimize.minimize_scalar(residual, bounds=(math.log(1e-4), math.log(1e3)), method="bounded")
    dim_eff = float(np.mean([null.dim_eff for null in nulls]))
    return int(min(nulls[0].n_samples, max(2, round(dim_eff / math.exp(best.x)))))


# -- validation --------------------------------------------------------------------------
def _lookup(rule: str):
    if rule not in RULES:
        raise ConfigError(f"unknown rank-selection rule {rule!r}; choose one of {sorted(RULES)}")
    return RULES[rule]


def _check_common(min_rank: Any, round_to: Any) -> None:
    if not isinstance(min_rank, (int, np.integer)) or min_rank < 0:
        raise ConfigError(f"min_rank must be a non-negative integer, got {min_rank!r}")
    if not isinstance(round_to, (int, np.integer)) or round_to < 1:
        raise ConfigError(f"round_to must be a positive integer, got {round_to!r}")


def _defaults(fn) -> dict[str, Any]:
    params = list(inspect.signature(fn).parameters.values())[1:]
    return {p.name: p.default for p in params}


def _check_options(rule: str, fn, options: dict[str, Any]) -> dict[str, Any]:
    unknown = set(options) - set(_defaults(fn))
    if unknown:
        accepted = sorted(_defaults(fn)) or "no options"
        raise ConfigError(f"rule {rule!r} does not take {sorted(unknown)}; it accepts {accepted} plus min_rank, round_to")
    return options


def _as_real_vector(values: Any, what: str) -> np.ndarray:
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    arr = np.asarray(values)
    if np.iscomplexobj(arr):
        if np.any(np.abs(arr.imag) > 1e-12 * max(np.max(np.abs(arr.real), initial=0.0), 1e-300)):
            raise DataError(f"{what} are complex: they come from a non-symmetric matrix; "
                            "use fxcompress.spectral.eigenvalues(cov) on a covariance")
        arr = arr.real
    if arr.dtype.kind not in "biuf" or arr.ndim != 1:
        raise DataError(f"{what} must be a 1-D array of real numbers, got shape {arr.shape} dtype {arr.dtype}")
    arr = arr.astype(np.float64)
    if not np.all(np.isfinite(arr)):
        raise DataError(f"{what} hold NaN/Inf: the activations behind them are not finite")
    return arr


def _spectrum(values: Any, n_samples: Any, dim: int | None, what: str) -> Spectrum:
    arr = _as_real_vector(values, what)
    dim = arr.size if dim is None else dim
    if not isinstance(n_samples, (int, np.integer)) or n_samples < 2:
        raise DataError(f"a spectrum needs at least 2 samples, got n_samples={n_samples!r}")
    if not isinstance(dim, (int, np.integer)) or dim < 2 or arr.size > dim:
        raise DataError(f"a spectrum needs d ≥ 2 features and at most d eigenvalues; got d={dim!r}, {arr.size} eigenvalues")
    top = float(arr.max())
    if top <= 0:
        raise DataError(f"all {what} are zero or negative: the activations are constant")
    if arr.min() < -1e-8 * top:
        raise DataError(f"{what} include {arr.min():.3g} < 0: not a covariance (it must be positive semi-definite)")
    desc = np.zeros(dim)
    desc[: arr.size] = np.sort(np.clip(arr, 0.0, None))[::-1]
    nonzero = desc[desc > Spectrum.nonzero_floor(top, dim, n_samples)]
    dead = max(0, (dim - nonzero.size) - max(0, dim - int(n_samples)))
    if nonzero.size < 2:
        raise DataError(f"{what} have fewer than 2 non-zero values: the activations span at most one direction")
    return Spectrum(desc, int(n_samples), int(dim), nonzero, int(dim - dead))


def _width(n_signal: int, min_rank: int, round_to: int, dim: int) -> int:
    k = max(n_signal, min_rank)
    if k > 0 and round_to > 1:
        k = -(-k // round_to) * round_to
    return int(min(k, dim))


# -- diagnostics -------------------------------------------------------------------------
def _diagnose(spectrum: Spectrum, rule: str, sigma2: float | None, n_signal: int,
              effective: int | None, extra: dict) -> Diagnostics:
    if rule not in MP_RULES:  # judge the spectrum with the robust fit
        n_signal, sigma2, _, _ = robust_fixed_point(spectrum)
    n_signal = min(n_signal, spectrum.nonzero.size - 2)
    bulk, gamma, scale = spectrum.bulk(n_signal)
    ks = _ks_distance(bulk, gamma, sigma2 * scale)
    estimates = {
        "quantile_fit": fit_sigma2(bulk, gamma) / scale,
        "median": float(np.median(bulk)) / float(mp.quantile(0.5, gamma)) / scale,
        "mean": float(np.mean(bulk)) / mp.mean(gamma) / scale,
    }
    spread = (max(estimates.values()) - min(estimates.values())) / float(np.median(list(estimates.values())))
    many_spikes = n_signal > SPIKE_FRACTION_LIMIT * spectrum.nonzero.size
    heavy = ks > max(KS_FLOOR, bulk.size**-0.5) or spread > SPREAD_LIMIT or many_spikes
    exhausted = bulk.size <= max(8, spectrum.nonzero.size // 10)
    dead = spectrum.dim - spectrum.dim_eff
    warnings = _warnings(ks, spread, heavy, exhausted, dead, effective, spectrum)
    return Diagnostics(ks, estimates, spread, heavy, exhausted, dead, effective, warnings, dict(extra))


def _too_few(spectrum: Spectrum, effective: int | None) -> Diagnostics:
    m = spectrum.nonzero.size
    note = (f"only {m} eigenvalues have variance, too few (< {MIN_EIGENVALUES}) to fit a noise bulk: "
            "every direction with variance is kept")
    dead = spectrum.dim - spectrum.dim_eff
    return Diagnostics(math.nan, {}, math.nan, False, True, dead, effective, (note,))


def _ks_distance(bulk: np.ndarray, gamma: float, sigma2: float) -> float:
    asc = np.sort(bulk)
    f = mp.cdf(asc, gamma, sigma2)
    i = np.arange(1, asc.size + 1)
    return float(max(np.max(i / asc.size - f), np.max(f - (i - 1) / asc.size)))


def _warnings(ks, spread, heavy, exhausted, dead, effective, spectrum) -> tuple[str, ...]:
    out = []
    if heavy:
        out.append(f"the spectrum does not look like MP noise plus a few spikes (bulk KS distance {ks:.3f}, "
                   f"σ² estimators disagree by {spread:.0%}): it may be heavy-tailed, and k then depends on "
                   "the estimator; compare rules before trusting it")
    if exhausted:
        out.append("almost every direction rises above the noise edge: this layer has little noise to remove")
    if dead:
        out.append(f"{dead} directions have zero variance (dead or constant features); they are always removable")
    if effective is not None and effective < spectrum.n_samples:
        out.append(f"samples are correlated: the circular-shift null implies ~{effective} independent samples")
    return tuple(out)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
