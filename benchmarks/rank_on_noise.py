"""What each rank rule keeps where the truth is known: pure white noise (the right width is 0)
and white noise plus 16 planted spikes in random directions (the right width is 16).

Per (d, n) and draw, the sample covariance of n rows is formed and every rule reads its
spectrum (``round_to=1``, so the figures are the rules' own, not rounded up). Prints, per rule,
the median width and its range over the draws.

    python benchmarks/rank_on_noise.py                 # d = 500 at n = 500 and 2,000, 20 draws
    python benchmarks/rank_on_noise.py --draws 50 --shapes 768x768,768x4096
"""

from __future__ import annotations

import argparse

import numpy as np

from fxcompress.spectral import select_rank

RULES = {"mp-hist q0.5": dict(rule="mp-hist", q=0.5), "mp-hist q0.3": dict(rule="mp-hist", q=0.3),
         "mp-robust": dict(rule="mp-robust"), "gavish-donoho": dict(rule="gavish-donoho"),
         "energy 0.90": dict(rule="energy", tau=0.9)}
SPIKES = 16


def spectrum(d: int, n: int, spikes: int, seed: int) -> np.ndarray:
    """Descending eigenvalues of the centred sample covariance of ``n`` rows: unit white noise,
    plus ``spikes`` directions of variance 2 to 8 (well above the MP edge at these shapes)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d))
    if spikes:
        basis = np.linalg.qr(rng.standard_normal((d, spikes)))[0].T
        x += rng.standard_normal((n, spikes)) @ (np.sqrt(np.linspace(2.0, 8.0, spikes))[:, None] * basis)
    x -= x.mean(axis=0)
    return np.linalg.eigvalsh(x.T @ x / (n - 1))[::-1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="500x500,500x2000", help="comma-separated d×n")
    parser.add_argument("--draws", type=int, default=20)
    args = parser.parse_args(argv)
    print(f"| d | n | truth | {' | '.join(RULES)} |")
    print("| ---: | ---: | ---: |" + " ---: |" * len(RULES))
    for shape in args.shapes.split(","):
        d, n = (int(v) for v in shape.split("x"))
        for spikes in (0, SPIKES):
            widths = {name: [] for name in RULES}
            for draw in range(args.draws):
                values = spectrum(d, n, spikes, draw)
                for name, options in RULES.items():
                    widths[name].append(select_rank(values, n - 1, **options, round_to=1).k)
            cells = [f"{np.median(k):.0f} ({min(k)}–{max(k)})" for k in widths.values()]
            print(f"| {d} | {n} | {spikes} | {' | '.join(cells)} |")
    print(f"\nmedian width (range) over {args.draws} draws; round_to=1")


if __name__ == "__main__":
    main()
