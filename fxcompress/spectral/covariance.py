"""Streaming covariance of hidden activations, in float64, in O(d²) memory.

Activations arrive batch by batch with the feature dimension last. The accumulator keeps,
as torch tensors on the activations' device, float64 sums of ``(x - s)(x - s)ᵀ``, ``(x - s)``
and the count, where ``s`` is a fixed shift (by default the mean of the first batch):
shifting before summing keeps the centred covariance accurate when the mean is large next
to the spread, and sums still add, so accumulators over different shards
:meth:`~CovarianceAccumulator.merge` exactly. Feeding is torch only and the spectra are
NumPy/LAPACK only: small calls of the two libraries interleaved make each wait on the other's
spinning worker threads.

Tokens of one sequence are correlated samples; with ``shift_null=True`` the accumulator
also sums a *null* covariance in which every feature is rolled by its own random offset
within each sequence. That keeps each feature's variance and autocorrelation but breaks
the alignment between features, so its spectrum is the noise level a correlated but
unstructured signal would produce. Its correlation spectrum (unit variances, so unequal
feature scales do not pass for correlation) gives the effective number of independent
samples (see :func:`fxcompress.spectral.select_rank`).

Example:
    >>> import numpy as np
    >>> acc = CovarianceAccumulator(16)
    >>> rng = np.random.default_rng(0)
    >>> for _ in range(10):
    ...     acc.update(rng.standard_normal((100, 16)))
    >>> acc.count, acc.covariance().shape
    (1000, (16, 16))
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.linalg
import torch

from fxcompress.errors import DataError
from fxcompress.spectral.rules import Spectrum

ArrayLike = Any  # numpy.ndarray | torch.Tensor


def channel_samples(x: ArrayLike, channel_dim: int = 1) -> torch.Tensor:
    """View a conv activation ``(N, C, H, W, ...)`` as ``N·H·W`` samples of ``C`` features.

    Example:
        >>> channel_samples(torch.zeros(2, 3, 4, 5)).shape
        torch.Size([40, 3])
    """
    t = _as_tensor(x, "activation")
    if t.ndim < 2:
        raise DataError(f"channel_samples needs a tensor with a channel axis, got shape {tuple(t.shape)}")
    return t.movedim(channel_dim, -1).reshape(-1, t.shape[channel_dim])


class CovarianceAccumulator:
    """Streaming float64 covariance of ``dim`` features.

    Args:
        dim: number of features (the size of the last axis of every batch).
        blocks: keep only the covariance of ``blocks`` equal groups of consecutive features
            (attention heads), not across them: ``blocks`` times less work and memory. Take
            each block's accumulator with :meth:`split` to read its results.
        shift: a fixed vector subtracted before summing; default: the first batch's mean.
        shift_null: also accumulate the circular-shift null (batches need a sequence axis,
            shaped ``(..., tokens, dim)``).
        seed: seed of the null's random offsets.
    """

    def __init__(self, dim: int, *, blocks: int = 1, shift: ArrayLike | None = None, shift_null: bool = False,
                 seed: int = 0):
        if not isinstance(dim, (int, np.integer)) or dim < 2:
            raise DataError(f"a spectrum needs at least 2 features, got dim={dim!r}")
        if not isinstance(blocks, (int, np.integer)) or blocks < 1 or dim % blocks or dim // blocks < 2:
            raise DataError(f"blocks must divide dim={dim} into blocks of at least 2 features, got blocks={blocks!r}")
        self.dim, self.blocks, self.block = int(dim), int(blocks), int(dim) // int(blocks)
        self.count = 0
        self._xtx: torch.Tensor | None = None  # Σ (x-s)(x-s)ᵀ per block, once there are more samples than features
        self._rows: list[torch.Tensor] | None = []  # the rows x - s themselves, while count ≤ block
        self._gram_memo: tuple[tuple[int, bool], np.ndarray] | None = None  # ((count, centred), their Gram matrix)
        # the spectrum and the most leading eigenvectors read so far, by (count, centred): read again and again
        # when widths are tried one after another (an agreement level); any new sample changes the count
        self._values_memo: tuple[tuple[int, bool], np.ndarray] | None = None
        self._vectors_memo: tuple[tuple[int, bool], int, np.ndarray] | None = None  # (key, k asked, columns)
        self._sum = torch.zeros(self.dim, dtype=torch.float64)
        self.shift = None if shift is None else self._check_shift(shift)
        self.null = CovarianceAccumulator(self.dim, blocks=blocks, shift=self.shift) if shift_null else None
        self._seed = seed
        self._rng = torch.Generator().manual_seed(seed) if shift_null else None

    # -- feeding -------------------------------------------------------------------------
    def update(self, x: ArrayLike, mask: ArrayLike | None = None, *, null_seed: int | None = None) -> None:
        """Add a batch: ``x`` is ``(..., dim)``; ``mask`` (shape ``x.shape[:-1]``) keeps True rows.

        ``null_seed`` draws this batch's null offsets from their own seed (e.g. the batch's
        index), so the null does not depend on which process saw which batches.
        """
        t = self._check_batch(x)
        keep = None if mask is None else self._check_mask(mask, t)
        if keep is not None and bool(keep.all()):
            keep = None  # nothing masked: the plain path copies and gathers less
        if self.null is not None:
            rng = self._rng if null_seed is None else torch.Generator().manual_seed(self._seed + 7919 * (null_seed + 1))
            self.null.update(_roll_within_sequences(t, keep, rng))
        rows = t.reshape(-1, self.dim) if keep is None else t[keep]
        self._add_rows(rows)

    def merge(self, other: "CovarianceAccumulator") -> "CovarianceAccumulator":
        """Add ``other``'s samples into this accumulator (in place) and return ``self``."""
        if not isinstance(other, CovarianceAccumulator) or (other.dim, other.blocks) != (self.dim, self.blocks):
            raise DataError(f"can only merge a CovarianceAccumulator of dim {self.dim} in {self.blocks} blocks, "
                            f"got {other!r}")
        if other.count:
            shift = self._ensure_shift(other.shift)
            offset = torch.from_numpy(other.shift - shift).to(self._sum.device)
            if self._rows is not None and other._rows is not None and self.count + other.count <= self.block:
                self._rows.extend(r.to(self._sum.device) + offset for r in other._rows)
                self._sum += other._sum.to(self._sum.device) + other.count * offset
            else:
                xtx, total = other._sums_about(shift)
                self._flush()
                self._xtx += xtx.to(self._xtx.device)
                self._sum += total.to(self._sum.device)
            self.count += other.count
        if self.null is not None and other.null is not None:
            self.null.merge(other.null)
        return self

    def split(self) -> tuple["CovarianceAccumulator", ...]:
        """One accumulator per block (with its null), as if each block had been fed alone."""
        if self.blocks == 1:
            return (self,)
        nulls = self.null.split() if self.null is not None else (None,) * self.blocks
        return tuple(self._part(h, null) for h, null in enumerate(nulls))

    # -- results -------------------------------------------------------------------------
    def mean(self) -> np.ndarray:
        """Mean of the features seen so far."""
        self._require_samples(1)
        return self.shift + self._sum.cpu().numpy() / self.count

    def dof(self, centered: bool = True) -> int:
        """Degrees of freedom of :meth:`covariance`: ``n - 1`` when centred, else ``n``."""
        return self.count - 1 if centered else self.count

    def covariance(self, centered: bool = True) -> np.ndarray:
        """The ``dim × dim`` covariance: centred with divisor ``n - 1``, or ``E[xxᵀ]`` (divisor ``n``)."""
        self._require_samples(2)
        self._require_one_block()
        if centered:
            cov = self._gram() - _outer(self._sum, self._sum / self.count, 1)
        else:
            cov, _ = self._sums_about(np.zeros(self.dim))
        cov = cov[0].cpu().numpy()
        cov /= self.dof(centered)
        return _finite(cov)

    def correlation(self, centered: bool = True) -> np.ndarray:
        """:meth:`covariance` scaled to unit variances (zero-variance features stay zero)."""
        cov = self.covariance(centered)
        inv = _inverse(np.sqrt(np.diag(cov)))
        return cov * inv[:, None] * inv[None, :]

    def eigenvalues(self, centered: bool = True) -> np.ndarray:
        """Eigenvalues of :meth:`covariance`, in descending order (computed once per sample count)."""
        key = (self.count, centered)
        if self._values_memo is None or self._values_memo[0] != key:
            self._values_memo = key, self.eigh(centered, vectors=False)[0]
        return self._values_memo[1].copy()

    def eigh(self, centered: bool = True, vectors: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        """Eigenvalues (descending, ``dim`` of them) and eigenvectors (columns) of :meth:`covariance`.

        While there are no more samples than features, the spectrum comes from the ``n × n``
        Gram matrix of the kept rows, ``(d/n)³`` times cheaper than the ``d × d`` problem;
        only the eigenvectors of non-zero eigenvalues are returned then.
        """
        if self._rows is None:
            if not vectors:
                return np.linalg.eigvalsh(self.covariance(centered))[::-1], None
            values, vecs = np.linalg.eigh(self.covariance(centered))
            return values[::-1], vecs[:, ::-1]
        data, gram = self._gram_of_rows(centered)
        if not vectors:
            return self._padded(np.linalg.eigvalsh(gram)[::-1]), None
        values, u = np.linalg.eigh(gram)
        values, u = values[::-1], u[:, ::-1]
        return self._padded(values), self._lift(data, values, u, centered)

    def leading_eigenvectors(self, k: int, centered: bool = True) -> np.ndarray:
        """The eigenvectors (columns) of the ``k`` largest eigenvalues of :meth:`covariance`.

        Only those are computed (LAPACK's subset driver) when they are few, and kept: a later
        call for as many or fewer takes the first columns. While there are no more samples
        than features, they come from the Gram matrix, and only those of non-zero eigenvalues
        exist: then fewer than ``k`` columns may come back.
        """
        if not isinstance(k, (int, np.integer)) or k < 1:
            raise DataError(f"k must be a positive number of eigenvectors, got {k!r}")
        key = (self.count, centered)
        if self._vectors_memo is None or self._vectors_memo[0] != key or self._vectors_memo[1] < k:
            self._vectors_memo = key, int(k), self._leading(int(k), centered)
        return self._vectors_memo[2][:, :k].copy()

    def _leading(self, k: int, centered: bool) -> np.ndarray:
        if self._rows is None:
            _, vecs = _leading_eigh(self.covariance(centered), k)
            return vecs
        data, gram = self._gram_of_rows(centered)
        values, u = _leading_eigh(gram, k)
        return self._lift(data, values, u, centered)

    def correlation_eigenvalues(self, centered: bool = True) -> np.ndarray:
        """Eigenvalues (descending) of :meth:`correlation`."""
        if self._rows is None:
            return np.linalg.eigvalsh(self.correlation(centered))[::-1]
        data = self._data(centered)
        data = data * _inverse(np.sqrt((data * data).sum(axis=0) / self.dof(centered)))
        return self._padded(np.linalg.eigvalsh(_finite(data @ data.T / self.dof(centered)))[::-1])

    def state_bytes(self) -> int:
        """Memory held: at most ``dim × block`` float64 numbers (rows or sums), the ``n × n ≤
        block²`` Gram matrix of the rows once a spectrum was read, the spectrum and leading
        eigenvectors once read (at most ``dim²`` more), plus the null's."""
        held = [self._xtx] if self._xtx is not None else self._rows
        memos = [memo[-1] for memo in (self._gram_memo, self._values_memo, self._vectors_memo) if memo is not None]
        null = self.null.state_bytes() if self.null is not None else 0
        return sum(t.nbytes for t in held) + self._sum.nbytes + sum(m.nbytes for m in memos) + null

    def select_rank(self, rule: str = "mp-robust", *, centered: bool = True, **options: Any):
        """:func:`fxcompress.spectral.select_rank` on this covariance (and its null, if kept)."""
        from fxcompress.spectral.selection import select_rank

        if self.null is not None:
            options.setdefault("null_eigenvalues", self.null.correlation_eigenvalues(centered))
        return select_rank(self.eigenvalues(centered), self.dof(centered), rule, **options)

    def __repr__(self) -> str:
        blocks = f", blocks={self.blocks}" if self.blocks > 1 else ""
        return f"CovarianceAccumulator(dim={self.dim}{blocks}, count={self.count}, shift_null={self.null is not None})"

    # -- internals -----------------------------------------------------------------------
    def _add_rows(self, rows: torch.Tensor) -> None:
        if rows.shape[0] == 0:
            return
        data = rows.to(torch.float64)
        total = data.sum(dim=0)  # NaN/Inf propagate into it; float32 values cannot overflow it
        if not bool(torch.isfinite(total).all()) and not bool(torch.isfinite(data).all()):
            bad = int((~torch.isfinite(data)).sum())
            raise DataError(f"activation batch holds {bad} NaN/Inf values: check the model and its inputs")
        if self.count == 0:
            self._sum = self._sum.to(data.device)  # the state lives where the activations do
        shift = self._ensure_shift((total / rows.shape[0]).cpu().numpy())
        centred = data - torch.from_numpy(shift).to(data.device)
        if self._rows is not None and self.count + rows.shape[0] <= self.block:
            self._rows.append(centred)
        else:
            self._flush()
            self._xtx += _block_gram(centred, self.blocks)
        self._sum += centred.sum(dim=0)
        self.count += rows.shape[0]

    def _flush(self) -> None:
        """Leave rows mode: from now on only the (per block) sums are kept."""
        if self._xtx is None:
            self._xtx = self._gram()
            self._rows = None

    def _gram(self) -> torch.Tensor:
        """Σ (x-s)(x-s)ᵀ of each block, ``(blocks, block, block)``."""
        if self._xtx is not None:
            return self._xtx
        if not self._rows:
            return torch.zeros(self.blocks, self.block, self.block, dtype=torch.float64, device=self._sum.device)
        return _block_gram(torch.cat(self._rows), self.blocks)

    def _part(self, h: int, null: "CovarianceAccumulator | None") -> "CovarianceAccumulator":
        """Block ``h`` as an accumulator of its own (see :meth:`split`)."""
        cols = slice(h * self.block, (h + 1) * self.block)
        part = CovarianceAccumulator(self.block, shift=None if self.shift is None else self.shift[cols],
                                     shift_null=null is not None, seed=self._seed + h)
        part.null, part.count, part._sum = null, self.count, self._sum[cols].clone()
        if self._xtx is not None:
            part._xtx, part._rows = self._xtx[h:h + 1].clone(), None
        else:
            part._rows = [rows[:, cols].contiguous() for rows in self._rows]
        return part

    def _gram_of_rows(self, centered: bool) -> tuple[np.ndarray, np.ndarray]:
        """The kept rows (centred) and their ``n × n`` Gram matrix, scaled as the covariance."""
        self._require_samples(2)
        data = self._data(centered)
        key = (self.count, centered)  # any new sample changes the count
        if self._gram_memo is None or self._gram_memo[0] != key:  # kept: eigenvalues, then leading eigenvectors
            self._gram_memo = key, _finite(data @ data.T / self.dof(centered))
        return data, self._gram_memo[1]

    def _lift(self, data: np.ndarray, values: np.ndarray, u: np.ndarray, centered: bool) -> np.ndarray:
        """Covariance eigenvectors from Gram eigenpairs (descending; the largest first), for
        the eigenvalues that are not numerically zero."""
        keep = values > Spectrum.nonzero_floor(max(values[0], 0.0), self.dim, self.count)
        return data.T @ u[:, keep] / np.sqrt(values[keep] * self.dof(centered))

    def _padded(self, values: np.ndarray) -> np.ndarray:
        """Gram-matrix eigenvalues (descending) as the ``dim`` eigenvalues of the covariance."""
        return np.concatenate([np.clip(values, 0, None), np.zeros(self.dim - values.size)])

    def _data(self, centered: bool) -> np.ndarray:
        """The kept rows, centred on the mean (or on zero), as a NumPy array."""
        self._require_one_block()
        data = torch.cat(self._rows).cpu().numpy()
        return data - self._sum.cpu().numpy() / self.count if centered else data + self.shift

    def _ensure_shift(self, candidate: np.ndarray | None) -> np.ndarray:
        if self.shift is None:
            self.shift = np.zeros(self.dim) if candidate is None else np.array(candidate, dtype=np.float64)
        return self.shift

    def _sums_about(self, point: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Sums of (x - point)(x - point)ᵀ and (x - point), re-based from this shift."""
        delta = torch.from_numpy(self.shift - point).to(self._sum.device)
        cross = _outer(delta, self._sum, self.blocks)
        xtx = self._gram() + cross + cross.transpose(1, 2) + self.count * _outer(delta, delta, self.blocks)
        return xtx, self._sum + self.count * delta

    def _require_one_block(self) -> None:
        """Every result comes through covariance() or _data(): a blocked accumulator has none of its own."""
        if self.blocks > 1:
            raise DataError(f"this accumulator keeps {self.blocks} separate blocks and has no covariance or "
                            "spectrum of its own: read each block's from split()")

    def _require_samples(self, least: int) -> None:
        if self.count < least:
            raise DataError(
                f"the covariance needs at least {least} samples, got {self.count}: feed more calibration data"
            )

    def _check_shift(self, shift: ArrayLike) -> np.ndarray:
        s = _as_tensor(shift, "shift").to(torch.float64).cpu().numpy()
        if s.shape != (self.dim,) or not np.all(np.isfinite(s)):
            raise DataError(f"shift must be a finite vector of length {self.dim}, got shape {s.shape}")
        return s

    def _check_batch(self, x: ArrayLike) -> torch.Tensor:
        t = _as_tensor(x, "activation").detach()
        if t.ndim == 0 or t.shape[-1] != self.dim:
            raise DataError(
                f"activation batch has shape {tuple(t.shape)} but the accumulator expects {self.dim} features "
                "on the last axis (for conv activations use channel_samples(x))"
            )
        if not t.is_floating_point():
            t = t.to(torch.float64)
        if self.null is not None and t.ndim < 3:
            raise DataError(
                f"shift_null needs a sequence axis: pass activations shaped (batch, tokens, {self.dim}), "
                f"got {tuple(t.shape)}"
            )
        return t

    @staticmethod
    def _check_mask(mask: ArrayLike, t: torch.Tensor) -> torch.Tensor:
        m = _as_tensor(mask, "mask").to(t.device)
        if tuple(m.shape) != tuple(t.shape[:-1]):
            raise DataError(f"mask has shape {tuple(m.shape)}, expected {tuple(t.shape[:-1])} (the batch without its feature axis)")
        m = m != 0 if m.dtype != torch.bool else m
        if not bool(m.any()):
            raise DataError("the mask removes every sample of this batch: True (or 1) marks the tokens to keep")
        return m


def _as_tensor(x: ArrayLike, what: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    try:
        arr = np.asarray(x)
    except Exception as exc:  # pragma: no cover - exotic inputs
        raise DataError(f"{what} must be a NumPy array or torch tensor, got {type(x).__name__}") from exc
    if arr.dtype == object or arr.dtype.kind not in "biuf":
        raise DataError(f"{what} must hold real numbers, got dtype {arr.dtype}")
    return torch.from_numpy(np.ascontiguousarray(arr))


def _leading_eigh(matrix: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` largest eigenpairs of a symmetric matrix, largest first. The subset driver
    pays off up to about a quarter of the spectrum; beyond, the full decomposition is faster."""
    n = matrix.shape[0]
    k = min(int(k), n)
    if 4 * k <= n:
        values, vecs = scipy.linalg.eigh(matrix, subset_by_index=[n - k, n - 1])
    else:
        values, vecs = np.linalg.eigh(matrix)
    return values[::-1][:k], vecs[:, ::-1][:, :k]


def _block_gram(rows: torch.Tensor, blocks: int) -> torch.Tensor:
    """``rowsᵀ rows`` of each block of columns: ``(n, blocks·b)`` → ``(blocks, b, b)``."""
    per_block = rows.reshape(rows.shape[0], blocks, -1).transpose(0, 1)  # (blocks, n, b)
    return per_block.transpose(1, 2) @ per_block


def _finite(matrix: np.ndarray) -> np.ndarray:
    """``matrix``, unless its products overflowed float64 (activations beyond ~1e150)."""
    if not np.all(np.isfinite(matrix)):
        raise DataError("the covariance overflows float64: the activations are too large to square (beyond ~1e150); "
                        "rescale the model's inputs or weights")
    return matrix


def _outer(a: torch.Tensor, b: torch.Tensor, blocks: int) -> torch.Tensor:
    """The diagonal blocks of ``outer(a, b)``, ``(blocks, b, b)``."""
    return a.reshape(blocks, -1, 1) * b.reshape(blocks, 1, -1)


def _inverse(std: np.ndarray) -> np.ndarray:
    """``1/std``, and 0 for zero-variance features."""
    return np.divide(1.0, std, out=np.zeros_like(std), where=std > 0)


def _roll_within_sequences(t: torch.Tensor, keep: torch.Tensor | None, rng: torch.Generator) -> torch.Tensor:
    """The null sample of a batch of sequences ``(..., tokens, d)``, as rows ``(n_kept, d)``.

    Feature ``j`` of destination sequence ``b`` is taken from sequence ``π_j(b)`` (a random
    permutation of the batch per feature) rolled by a random offset among its kept tokens:
    each feature keeps its autocorrelation along the tokens, while both the within- and the
    between-sequence alignment of features is broken. Kept tokens are packed to the front
    of each sequence first (stable order), so masks need not be contiguous.
    """
    seq = t.reshape(-1, t.shape[-2], t.shape[-1])
    b, length, d = seq.shape
    device = seq.device
    if keep is None:
        lengths = torch.full((b,), length)
    else:
        keep = keep.reshape(b, length).cpu()
        lengths = keep.sum(dim=1)
        order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)
        seq = torch.gather(seq, 1, order.to(device).unsqueeze(-1).expand(b, length, d))
    source = torch.argsort(torch.rand(b, d, generator=rng), dim=0)  # (b, d): π_j(b)
    src_len = lengths.clamp(min=1)[source]
    offsets = (torch.rand(b, d, generator=rng) * src_len).long()
    pos = torch.arange(length).view(1, length, 1)
    token = torch.remainder(pos + offsets.unsqueeze(1), src_len.unsqueeze(1))  # (b, length, d)
    row = token.add_(source.unsqueeze(1) * length)  # row of the flattened (b·length, d) batch
    out = torch.gather(seq.reshape(b * length, d), 0, row.view(b * length, d).to(device)).view(b, length, d)
    valid = pos.view(1, length) < lengths.view(b, 1)
    return out[valid.to(device)]
