"""Benchmark of the spectral stage: streaming accumulation and rank selection.

For each width d, streams n samples (float32 batches, 16 planted spikes in random
directions) through a CovarianceAccumulator, then times the whole selection
(covariance → eigenvalues → rule → diagnostics) against a bare ``numpy.linalg.eigvalsh``
of the same matrix, alternating the two so machine drift hits both. Prints wall times,
peak memory and the ratio (goal ≤ 1.3).

    python benchmarks/bench_spectral.py                      # d = 768 and 4096, n = 200,000
    python benchmarks/bench_spectral.py --dims 768 --n 50000 --repeats 5
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import numpy as np

from fxcompress.spectral import CovarianceAccumulator


def planted_batches(d: int, n: int, batch: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.standard_normal((d, 16)))[0].T.astype(np.float32)
    strength = np.linspace(2.0, 8.0, 16, dtype=np.float32)[:, None]
    for start in range(0, n, batch):
        rows = min(batch, n - start)
        x = rng.standard_normal((rows, d), dtype=np.float32)
        yield x + (rng.standard_normal((rows, 16), dtype=np.float32) @ (strength * basis))


def accumulate(d: int, n: int, batch: int) -> tuple[CovarianceAccumulator, float]:
    acc, spent = CovarianceAccumulator(d), 0.0
    for x in planted_batches(d, n, batch):
        start = time.perf_counter()
        acc.update(x)
        spent += time.perf_counter() - start
    return acc, spent


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def spread(values: list[float]) -> str:
    return f"median {statistics.median(values):.3f} s (min {min(values):.3f}, max {max(values):.3f})"


def bench(d: int, n: int, batch: int, repeats: int, rules: list[str]) -> None:
    acc, acc_time = accumulate(d, n, batch)
    print(f"\nd = {d}, n = {n:,} (batches of {batch})")
    print(f"  accumulate: {acc_time:.2f} s = {n / acc_time:,.0f} samples/s; state {acc.state_bytes() / 2**20:.1f} MiB")
    cov = acc.covariance()
    for rule in rules:
        bare, whole, ratios, selection = [], [], [], None
        for _ in range(repeats):  # alternate A B A B
            t_bare, _ = timed(lambda: np.linalg.eigvalsh(cov))
            t_whole, selection = timed(lambda: acc.select_rank(rule))
            bare.append(t_bare)
            whole.append(t_whole)
            ratios.append(t_whole / t_bare)
        print(f"  {rule:10s} k = {selection.k:4d} (σ² = {selection.sigma2:.4f}, {selection.n_signal} above edge)")
        print(f"    bare eigvalsh    {spread(bare)}")
        print(f"    whole selection  {spread(whole)}")
        print(f"    ratio            median {statistics.median(ratios):.3f} "
              f"(min {min(ratios):.3f}, max {max(ratios):.3f}; goal ≤ 1.3)")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"  peak RSS of the process so far: {peak:.0f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dims", default="768,4096", help="comma-separated widths (default 768,4096)")
    parser.add_argument("--n", type=int, default=200_000, help="samples to accumulate (default 200,000)")
    parser.add_argument("--batch", type=int, default=8192, help="rows per update (default 8192)")
    parser.add_argument("--repeats", type=int, default=3, help="alternating repeats (default 3)")
    parser.add_argument("--rules", default="mp-robust,mp-hist", help="rules to time")
    args = parser.parse_args()
    import os

    print(f"fxcompress spectral benchmark; {os.cpu_count()} CPUs, numpy {np.__version__}")
    for d in (int(v) for v in args.dims.split(",")):
        bench(d, args.n, args.batch, args.repeats, args.rules.split(","))


if __name__ == "__main__":
    main()
