"""Spectrum plots (the RMT-KD paper's Fig. 2): histogram, fitted MP law, edge, kept directions —
one group, or a panel per group."""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np

from fxcompress.atomic import atomic_path
from fxcompress.errors import ConfigError
from fxcompress.spectral import mp
from fxcompress.spectral.rules import Spectrum
from fxcompress.spectral.selection import RankSelection


def plot_spectrum(selection: RankSelection, path: str | os.PathLike, title: str | None = None,
                  bins: int = 80) -> None:
    """Write a PNG of ``selection``'s eigenvalue histogram with the MP density it implies.

    The eigenvalues counted as signal are a red rug; one dashed line is the cut (the last kept
    direction, after ``min_rank`` and ``round_to``); a note says how well the bulk fits MP, and
    says so in red where it fits poorly. Spectra whose largest eigenvalue lies past 5·λ+ get
    a log x-axis.

    Example:
        >>> plot_spectrum(select_rank(eig, n), "spectrum.png", title="layer1")  # doctest: +SKIP
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    _draw(ax, selection, title, bins)
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_spectra(selections: Mapping[str, RankSelection], path: str | os.PathLike, title: str | None = None,
                 columns: int = 3, bins: int = 60) -> None:
    """Write one PNG with a panel per group (the paper's Fig. 2: the spectra layer by layer).

    Example:
        >>> plot_spectra(fxcompress.compress(model, calib).selections, "spectra.png")  # doctest: +SKIP
    """
    if not selections:
        raise ConfigError("plot_spectra needs at least one selection: the model had no width group to plot")
    plt = _pyplot()
    rows = -(-len(selections) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.2 * rows), dpi=110, squeeze=False)
    for ax, (name, selection) in zip(axes.flat, selections.items()):
        _draw(ax, selection, name, bins, fontsize=8)
        ax.legend(fontsize=6)
    for ax in axes.flat[len(selections):]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=11)
    _save(fig, path)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _draw(ax, selection: RankSelection, title: str | None, bins: int, fontsize: int = 10) -> None:
    top = float(selection.eigenvalues[0])
    values = selection.eigenvalues[selection.eigenvalues > Spectrum.nonzero_floor(top, selection.dim, selection.n_samples)]
    sigma2 = selection.sigma2 or selection.diagnostics.sigma2_estimates.get("quantile_fit")
    fitted = sigma2 is not None and np.isfinite(sigma2)  # not when too few eigenvalues to fit a bulk
    lo, hi = mp.bulk_edges(selection.gamma, sigma2) if fitted else (0.0, float(values.max()))
    log_x = values.max() > 5 * hi
    edges = np.geomspace(values.min(), values.max(), bins + 1) if log_x else np.linspace(0, values.max(), bins + 1)
    kept = values[: selection.n_signal]

    ax.hist(values, bins=edges, density=True, color="#8fb3d9", label=f"eigenvalues (d={selection.dim})")
    if kept.size:
        ax.plot(kept, np.zeros_like(kept), "|", color="#d62728", ms=18, mew=1.5,
                label=f"{kept.size} above threshold", clip_on=False)
    if fitted:
        grid = np.geomspace(max(lo, hi * 1e-4), hi, 400) if log_x else np.linspace(lo, hi, 400)
        ax.plot(grid, mp.density(grid, selection.gamma, sigma2), color="black", lw=1.5,
                label=f"MP law, σ²={sigma2:.3g}, λ+={hi:.3g}")
    if selection.k < values.size:  # one line where the kept directions end, after min_rank and round_to
        cut = float(np.sqrt(values[selection.k - 1] * values[selection.k])) if log_x else \
            float(values[selection.k - 1] + values[selection.k]) / 2
        ax.axvline(cut, color="#d62728", ls="--", lw=1.2, label=f"cut: keep {selection.k} of {selection.dim}")
    notes = fit_notes(selection)
    ax.text(0.98, 0.97, "\n".join(notes), transform=ax.transAxes, ha="right", va="top", fontsize=fontsize - 1,
            color="#d62728" if selection.diagnostics.heavy_tailed else "#333333")
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel("eigenvalue", fontsize=fontsize)
    ax.set_ylabel("density", fontsize=fontsize)
    summary = f"{selection.rule}: keep {selection.k} of {selection.dim} ({selection.n_signal} above threshold)"
    ax.set_title(f"{title}\n{summary}" if title else summary, fontsize=fontsize)


def fit_notes(selection: RankSelection) -> list[str]:
    """How well the spectrum fits MP noise plus spikes, in a few words for the plot."""
    d = selection.diagnostics
    notes = [f"bulk KS distance {d.ks_distance:.3f}" if np.isfinite(d.ks_distance) else "too few eigenvalues to fit"]
    if d.heavy_tailed:
        notes.append(f"poor MP fit (σ² estimators differ by {d.sigma2_spread:.0%}): k depends on the rule")
    if d.bulk_exhausted:
        notes.append("little noise: almost every direction is above the edge")
    return notes


def _save(fig, path: str | os.PathLike) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
