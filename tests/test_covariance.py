"""CovarianceAccumulator: streaming equals one shot, merges add up, bad input is refused."""

import numpy as np
import pytest
import torch

from fxcompress import DataError, FxCompressError
from fxcompress.spectral import CovarianceAccumulator, channel_samples


def _rel(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    mixing = rng.standard_normal((48, 48))
    return rng.standard_normal((10_000, 48)) @ mixing + 5.0


def test_streaming_100_batches_equals_one_shot(data):
    one = CovarianceAccumulator(48)
    one.update(data)
    streamed = CovarianceAccumulator(48)
    for chunk in np.array_split(data, 100):
        streamed.update(chunk)
    assert streamed.count == one.count == 10_000
    for centered in (True, False):
        assert _rel(streamed.covariance(centered), one.covariance(centered)) < 1e-12
    assert _rel(streamed.mean(), one.mean()) < 1e-12


def test_matches_numpy_reference(data):
    acc = CovarianceAccumulator(48)
    acc.update(torch.from_numpy(data).float())  # float32 tensors accumulate in float64
    ref = np.cov(data.astype(np.float32).astype(np.float64), rowvar=False)
    assert _rel(acc.covariance(), ref) < 1e-10
    assert acc.dof() == 9_999 and acc.dof(centered=False) == 10_000
    uncentered = data.astype(np.float32).astype(np.float64)
    assert _rel(acc.covariance(centered=False), uncentered.T @ uncentered / 10_000) < 1e-10


def test_two_merged_accumulators_equal_one_fed_everything(data):
    whole, a, b = CovarianceAccumulator(48), CovarianceAccumulator(48), CovarianceAccumulator(48)
    whole.update(data)
    a.update(data[:3_000])
    b.update(data[3_000:] * 1.0)  # b has its own shift (first batch mean)
    assert a.merge(b) is a
    assert a.count == whole.count
    assert _rel(a.covariance(), whole.covariance()) < 1e-12
    assert _rel(a.mean(), whole.mean()) < 1e-12


def test_merge_into_empty_and_large_offset_stays_accurate():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5_000, 8)) + 1e6  # mean ≫ spread: naive sums would cancel
    empty, acc = CovarianceAccumulator(8), CovarianceAccumulator(8)
    acc.update(x)
    empty.merge(acc)
    assert _rel(empty.covariance(), np.cov(x - 1e6, rowvar=False)) < 1e-8


def test_mask_selects_rows():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((4, 10, 6))
    mask = rng.random((4, 10)) > 0.3
    acc, ref = CovarianceAccumulator(6), CovarianceAccumulator(6)
    acc.update(x, mask=mask.astype(np.int64))  # 0/1 attention masks work too
    ref.update(x[mask])
    assert acc.count == int(mask.sum())
    assert _rel(acc.covariance(), ref.covariance()) < 1e-14


def test_channel_samples_for_conv_activations():
    x = torch.randn(2, 5, 3, 4)
    rows = channel_samples(x)
    assert rows.shape == (24, 5)
    assert torch.equal(rows[7], x[0, :, 1, 3])  # sample (n=0, h=1, w=3) holds all 5 channels


def test_memory_does_not_grow_with_samples():
    acc = CovarianceAccumulator(16)
    for _ in range(20):
        acc.update(np.random.default_rng(3).standard_normal((1000, 16)))
    held = [v for v in vars(acc).values() if isinstance(v, (np.ndarray, torch.Tensor))]
    assert max(a.numel() if isinstance(a, torch.Tensor) else a.size for a in held) == 16 * 16
    assert acc.state_bytes() == (16 * 16 + 16) * 8


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda a: a.update(np.array([[1.0, np.nan, 0, 0]])), "NaN/Inf"),
        (lambda a: a.update(np.array([[1.0, np.inf, 0, 0]])), "NaN/Inf"),
        (lambda a: a.update(np.ones((3, 5))), "expects 4 features"),
        (lambda a: a.update(np.ones((2, 3, 4)), mask=np.zeros((2, 3), bool)), "removes every sample"),
        (lambda a: a.update(np.ones((2, 3, 4)), mask=np.ones((3, 2), bool)), "mask has shape"),
        (lambda a: a.update(np.array([["a", "b", "c", "d"]])), "real numbers"),
        (lambda a: (a.update(np.ones((1, 4))), a.covariance()), "at least 2 samples"),
        (lambda a: a.covariance(), "at least 2 samples"),
        (lambda a: a.merge(CovarianceAccumulator(5)), "merge"),
    ],
)
def test_bad_input_is_a_clear_error(make, match):
    acc = CovarianceAccumulator(4)
    with pytest.raises(DataError, match=match):
        make(acc)


def test_dim_one_and_missing_sequence_axis_are_refused():
    with pytest.raises(FxCompressError, match="at least 2 features"):
        CovarianceAccumulator(1)
    with pytest.raises(DataError, match="sequence axis"):
        CovarianceAccumulator(4, shift_null=True).update(np.ones((10, 4)))


def test_shift_null_permutes_each_feature_and_keeps_the_count():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3, 7, 5))
    acc = CovarianceAccumulator(5, shift_null=True, seed=1)
    acc.update(x)
    # each feature's values are permuted (other sequence, rolled): same per-feature moments
    assert np.allclose(np.diag(acc.null.covariance()), np.diag(acc.covariance()))
    assert np.allclose(acc.null.mean(), acc.mean())
    assert not np.allclose(acc.null.covariance(), acc.covariance())
    mask = np.ones((3, 7), bool)
    mask[1, 2] = mask[2, 5:] = False  # a hole and right padding
    masked = CovarianceAccumulator(5, shift_null=True, seed=1)
    masked.update(x, mask)
    assert masked.null.count == masked.count == mask.sum()


def test_rows_mode_while_fewer_samples_than_features_equals_the_sums():
    """With n ≤ d the accumulator keeps the rows and decomposes the n × n Gram matrix; every
    result equals the d × d path, and it switches to sums as soon as n > d."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((300, 500)) + 3.0
    x[:, :5] *= 5.0
    rows = CovarianceAccumulator(500)
    for chunk in np.array_split(x, 6):
        rows.update(chunk)
    sums = CovarianceAccumulator(500)
    sums.update(x)
    sums._flush()
    assert rows._rows is not None and sums._rows is None
    v_rows, vec_rows = rows.eigh()
    v_sums, vec_sums = sums.eigh()
    assert np.max(np.abs(v_rows - v_sums)) < 1e-12 * v_sums[0] and v_rows.shape == (500,)
    assert vec_rows.shape == (500, 299)  # centred: n - 1 directions carry variance
    assert np.allclose(np.abs(np.sum(vec_rows[:, :5] * vec_sums[:, :5], axis=0)), 1.0, atol=1e-10)
    assert _rel(rows.covariance(), np.cov(x, rowvar=False)) < 1e-12
    assert np.allclose(rows.correlation_eigenvalues(), np.linalg.eigvalsh(np.corrcoef(x, rowvar=False))[::-1], atol=1e-10)
    assert rows.select_rank(round_to=1).k == sums.select_rank(round_to=1).k == 5
    assert rows.state_bytes() < sums.state_bytes()
    rows.update(rng.standard_normal((300, 500)))  # now n > d
    assert rows._rows is None and rows.count == 600


def test_merge_across_rows_and_sums_modes():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((900, 400)) + 1.0
    whole = CovarianceAccumulator(400)
    whole.update(x)
    small, small2, big = CovarianceAccumulator(400), CovarianceAccumulator(400), CovarianceAccumulator(400)
    small.update(x[:100])
    small2.update(x[100:250] * 1.0)
    big.update(x[250:])
    small.merge(small2)
    assert small._rows is not None  # 250 ≤ 400 rows: still rows
    small.merge(big)
    assert small._rows is None and small.count == 900
    assert _rel(small.covariance(), whole.covariance()) < 1e-12


@pytest.mark.parametrize("samples", [40, 400])  # rows mode (n ≤ block) and sums mode
def test_blocks_split_into_what_each_block_fed_alone_holds(samples):
    rng = np.random.default_rng(8)
    x = rng.standard_normal((4, samples // 4, 3 * 64)) * np.linspace(1, 3, 3 * 64) + 2.0
    blocked = CovarianceAccumulator(3 * 64, blocks=3, shift_null=True)
    shard = CovarianceAccumulator(3 * 64, blocks=3, shift_null=True)
    blocked.update(x[:2], null_seed=0)
    shard.update(x[2:], null_seed=1)
    blocked.merge(shard)
    parts = blocked.split()
    assert len(parts) == 3
    if samples > 64:  # sums of the three 64 × 64 blocks (and the null's), not of 192 × 192
        assert blocked.state_bytes() == 2 * (3 * 64 * 64 + 3 * 64) * 8
    for h, part in enumerate(parts):
        alone = CovarianceAccumulator(64)
        alone.update(x[..., h * 64:(h + 1) * 64])
        assert part.dim == 64 and part.count == alone.count == samples
        assert _rel(part.covariance(), alone.covariance()) < 1e-12
        assert _rel(part.mean(), alone.mean()) < 1e-12
        assert part.null.count == samples and part.null.correlation_eigenvalues().shape == (64,)
    with pytest.raises(DataError, match="split"):
        blocked.covariance()
    with pytest.raises(DataError, match="blocks must divide"):
        CovarianceAccumulator(10, blocks=3)
    with pytest.raises(DataError, match="in 3 blocks"):
        blocked.merge(CovarianceAccumulator(3 * 64))


@pytest.mark.parametrize("samples", [120, 900])  # rows mode (n ≤ d) and sums mode
@pytest.mark.parametrize("k", [5, 60])  # LAPACK's subset driver, and the full decomposition
def test_leading_eigenvectors_are_the_top_of_eigh(samples, k):
    rng = np.random.default_rng(9)
    x = rng.standard_normal((samples, 200)) * np.linspace(0.5, 4.0, 200) + 1.0
    acc = CovarianceAccumulator(200)
    acc.update(x)
    _, vecs = acc.eigh()
    top = acc.leading_eigenvectors(k)
    assert top.shape == (200, k)
    assert np.allclose(np.abs(np.sum(top * vecs[:, :k], axis=0)), 1.0, atol=1e-8)
    with pytest.raises(DataError, match="positive number"):
        acc.leading_eigenvectors(0)


def test_spectra_read_between_batches_follow_the_samples():
    """The rows' Gram matrix is kept between reads of one state, never across new samples."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((90, 120)) * np.linspace(0.5, 3.0, 120)
    acc, fresh = CovarianceAccumulator(120), CovarianceAccumulator(120)
    acc.update(x[:40])
    first, first_vectors = acc.eigenvalues(), acc.leading_eigenvectors(5)
    acc.update(x[40:])
    fresh.update(x)
    assert not np.allclose(first, acc.eigenvalues())
    assert np.allclose(acc.eigenvalues(), fresh.eigenvalues(), atol=1e-12)
    assert np.allclose(acc.eigenvalues(centered=False), fresh.eigenvalues(centered=False), atol=1e-12)
    assert np.allclose(np.abs(np.sum(acc.leading_eigenvectors(3) * fresh.leading_eigenvectors(3), axis=0)), 1.0)
    # the vectors read before the new samples differ from them: the line above would catch a stale one
    assert not np.allclose(np.abs(np.sum(first_vectors[:, :3] * fresh.leading_eigenvectors(3), axis=0)), 1.0)


@pytest.mark.parametrize("samples", [120, 900])  # rows mode (n ≤ d) and sums mode
def test_spectra_read_again_are_kept_and_the_callers_own(samples):
    """Widths tried one after another (an agreement level) read one state's spectrum and
    eigenvectors again and again: they are computed once, for the most columns asked so far."""
    rng = np.random.default_rng(5)
    acc = CovarianceAccumulator(200)
    acc.update(rng.standard_normal((samples, 200)) * np.linspace(0.5, 4.0, 200))
    _, vecs = acc.eigh()
    wide = acc.leading_eigenvectors(40)
    held = acc.state_bytes()
    narrow = acc.leading_eigenvectors(7)  # the first columns of the 40 kept
    assert np.array_equal(narrow, wide[:, :7]) and acc.state_bytes() == held
    assert np.allclose(np.abs(np.sum(acc.leading_eigenvectors(60) * vecs[:, :60], axis=0)), 1.0, atol=1e-8)
    values = acc.eigenvalues()
    values[:] = 0.0
    narrow[:] = 0.0
    assert acc.eigenvalues()[0] > 0 and np.allclose(np.abs(np.sum(acc.leading_eigenvectors(7) * vecs[:, :7], axis=0)), 1.0)
