"""The spectrum plot (the RMT-KD paper's Fig. 2): histogram, fitted MP law, edge, kept directions."""

from __future__ import annotations

import os

import numpy as np

from fxcompress.atomic import atomic_path
from fxcompress.spectral import mp
from fxcompress.spectral.rules import Spectrum
from fxcompress.spectral.selection import RankSelection


def plot_spectrum(selection: RankSelection, path: str | os.PathLike, title: str | None = None,
                  bins: int = 80) -> None:
    """Write a PNG of ``selection``'s eigenvalue histogram with the MP density it implies.

    The eigenvalues counted as signal are a red rug, λ+ and the rule's threshold dashed
    lines. Spectra whose largest eigenvalue lies past 5·λ+ get a log x-axis.

    Example:
        >>> plot_spectrum(select_rank(eig, n), "spectrum.png", title="layer1")  # doctest: +SKIP
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    top = float(selection.eigenvalues[0])
    values = selection.eigenvalues[selection.eigenvalues > Spectrum.nonzero_floor(top, selection.dim, selection.n_samples)]
    sigma2 = selection.sigma2 or selection.diagnostics.sigma2_estimates["quantile_fit"]
    gamma = selection.gamma
    lo, hi = mp.bulk_edges(gamma, sigma2)
    log_x = values.max() > 5 * hi
    edges = np.geomspace(values.min(), values.max(), bins + 1) if log_x else np.linspace(0, values.max(), bins + 1)
    kept = values[: selection.n_signal]

    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    ax.hist(values, bins=edges, density=True, color="#8fb3d9", label=f"eigenvalues (d={selection.dim})")
    if kept.size:
        ax.plot(kept, np.zeros_like(kept), "|", color="#d62728", ms=18, mew=1.5,
                label=f"{kept.size} above threshold", clip_on=False)
    grid = np.geomspace(max(lo, hi * 1e-4), hi, 400) if log_x else np.linspace(lo, hi, 400)
    ax.plot(grid, mp.density(grid, gamma, sigma2), color="black", lw=1.5, label=f"MP law, σ²={sigma2:.3g}")
    ax.axvline(hi, color="#d62728", ls="--", lw=1, label=f"λ+ = {hi:.3g}")
    if selection.threshold is not None and not np.isclose(selection.threshold, hi):
        ax.axvline(selection.threshold, color="#ff7f0e", ls=":", lw=1.2, label=f"threshold = {selection.threshold:.3g}")
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density")
    summary = f"{selection.rule}: keep {selection.k} of {selection.dim} ({selection.n_signal} above threshold)"
    ax.set_title(f"{title}\n{summary}" if title else summary, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
