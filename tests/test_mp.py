"""The Marchenko–Pastur law and the edges the rules rely on."""

import numpy as np
import pytest
import scipy.integrate

from fxcompress.spectral import mp


@pytest.mark.parametrize("gamma", [0.05, 0.25, 1.0, 4.0])
def test_density_integrates_to_one(gamma):
    lo, hi = mp.bulk_edges(gamma)
    total, _ = scipy.integrate.quad(lambda x: float(mp.density(np.array([x]), gamma)[0]), lo, hi, limit=200)
    assert total == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("gamma", [0.05, 0.25, 1.0, 4.0])
def test_quantile_inverts_cdf_and_mean_matches(gamma):
    p = np.linspace(0.01, 0.99, 50)
    assert np.allclose(mp.cdf(mp.quantile(p, gamma), gamma), p, atol=1e-6)
    lo, hi = mp.bulk_edges(gamma)
    first_moment, _ = scipy.integrate.quad(lambda x: x * float(mp.density(np.array([x]), gamma)[0]), lo, hi, limit=200)
    assert first_moment == pytest.approx(mp.mean(gamma), rel=1e-5)


def test_known_values():
    # MP(1) median, as implied by Gavish–Donoho's published ω(1) = 2.858 = (4/√3)/√μ₁
    assert float(mp.quantile(0.5, 1.0)) == pytest.approx((4 / 3**0.5 / 2.858) ** 2, abs=5e-4)
    assert mp.bulk_edges(0.25, 2.0) == pytest.approx((0.5, 4.5))
    # Gavish–Donoho's published cubic approximation of ω(β), good to ~0.02
    for beta in (0.1, 0.5, 1.0):
        approx = 0.56 * beta**3 - 0.95 * beta**2 + 1.82 * beta + 1.43
        assert mp.gavish_donoho_omega(beta) == pytest.approx(approx, abs=0.03)
    assert mp.gavish_donoho_omega(1.0) == pytest.approx(2.858, abs=2e-3)  # 4/√3 / √μ₁


def test_tracy_widom_edge_sits_just_above_bulk_edge():
    n, d = 100_000, 25_000
    edge = mp.tracy_widom_edge(n, d, 1.0)
    assert mp.bulk_edges(d / n)[1] < edge < mp.bulk_edges(d / n)[1] * 1.001
    assert mp.tracy_widom_edge(n, d, 3.0) == pytest.approx(3 * edge)
