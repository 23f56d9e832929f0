"""Per-input-channel truncated SVD of a convolution kernel: the factorization math, once.

A standard convolution with kernel ``W`` of shape ``[N, M, kh, kw]`` (N output channels, M input
channels) computes, for each output channel n, ``sum_m W[n, m] * x_m``. For each input channel m
the slice ``A_m = W[:, m].reshape(N, kh*kw)`` has an SVD ``A_m = U S V^T``. Keeping r singular
triplets gives

* a depthwise convolution with ``M*r`` output channels (depth multiplier r, ``group = M``): filter
  ``m*r + j`` is ``sqrt(s_j) * V[:, j]`` reshaped to ``kh x kw`` and reads input channel m;
* a pointwise 1x1 convolution ``[N, M*r]``: column ``m*r + j`` is ``sqrt(s_j) * U[:, j]``.

Their composition is ``sum_m sum_j s_j U[:, j] V[:, j]^T * x_m``: the best rank-r approximation
of every ``A_m`` (Eckart-Young), so the error ``||W - W_hat||_F^2`` is exactly the energy of the
dropped singular values, and at ``r = min(N, kh*kw)`` the rewrite is exact.

Everything here is a pure numpy function: kernels in, factors and numbers out, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ChannelSVD:
    """The SVD of every input-channel slice of one kernel.

    ``u``: ``[M, N, k]``, ``s``: ``[M, k]`` (descending), ``vt``: ``[M, k, kh*kw]`` with
    ``k = min(N, kh*kw)``; ``kernel_shape`` is ``(N, M, kh, kw)``.
    """

    u: np.ndarray
    s: np.ndarray
    vt: np.ndarray
    kernel_shape: tuple[int, ...]

    @property
    def max_rank(self) -> int:
        return int(self.s.shape[1])

    @property
    def energy(self) -> float:
        """``||W||_F^2`` (float64)."""
        return float(np.sum(np.square(self.s, dtype=np.float64)))


def channel_svd(kernel: np.ndarray) -> ChannelSVD:
    """SVD of each input channel's ``N x (kh*kw...)`` slice of a ``[N, M, *spatial]`` kernel."""
    if kernel.ndim < 3:
        raise ValueError(f"expected a [N, M, *spatial] kernel, got shape {kernel.shape}")
    n, m = kernel.shape[:2]
    taps = int(np.prod(kernel.shape[2:]))
    slices = np.ascontiguousarray(
        np.asarray(kernel, dtype=np.float64).reshape(n, m, taps).transpose(1, 0, 2)
    )  # [M, N, taps]
    u, s, vt = np.linalg.svd(slices, full_matrices=False)
    return ChannelSVD(u=u, s=s, vt=vt, kernel_shape=tuple(int(d) for d in kernel.shape))


def factorize_kernel(
    kernel: np.ndarray, rank: int, svd: ChannelSVD | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Depthwise and pointwise weights of the rank-``rank`` factorization of ``kernel``.

    Returns ``(depthwise [M*rank, 1, *spatial], pointwise [N, M*rank, 1, ...])`` in the dtype of
    ``kernel``. ``rank`` may exceed ``min(N, taps)``: the extra filters are zero (still exact).
    """
    svd = svd or channel_svd(kernel)
    n, m, *spatial = svd.kernel_shape
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    taps = int(np.prod(spatial))
    kept = min(rank, svd.max_rank)
    root = np.sqrt(svd.s[:, :kept])  # [M, kept]
    depthwise = np.zeros((m, rank, taps), dtype=np.float64)
    depthwise[:, :kept] = root[:, :, None] * svd.vt[:, :kept, :]
    pointwise = np.zeros((n, m, rank), dtype=np.float64)
    pointwise[:, :, :kept] = (svd.u[:, :, :kept] * root[:, None, :]).transpose(1, 0, 2)
    ones = (1,) * len(spatial)
    return (
        depthwise.reshape(m * rank, 1, *spatial).astype(kernel.dtype),
        pointwise.reshape(n, m * rank, *ones).astype(kernel.dtype),
    )


def compose(depthwise: np.ndarray, pointwise: np.ndarray, in_channels: int) -> np.ndarray:
    """The standard kernel ``[N, M, *spatial]`` that depthwise-then-pointwise computes."""
    m = in_channels
    r = depthwise.shape[0] // m
    n = pointwise.shape[0]
    dw = depthwise.reshape(m, r, -1).astype(np.float64)
    pw = pointwise.reshape(n, m, r).astype(np.float64)
    return np.einsum("nmr,mrt->nmt", pw, dw).reshape(n, m, *depthwise.shape[2:])


def dropped_energy(svd: ChannelSVD, rank: int) -> float:
    """``||W - W_hat_r||_F^2``: the energy of the singular values beyond ``rank``."""
    return float(np.sum(np.square(svd.s[:, rank:], dtype=np.float64)))


def relative_error(svd: ChannelSVD, rank: int) -> float:
    """``||W - W_hat_r||_F / ||W||_F`` (0 for an all-zero kernel)."""
    total = svd.energy
    return float(np.sqrt(dropped_energy(svd, rank) / total)) if total > 0 else 0.0


def rank_for_energy(svd: ChannelSVD, energy: float) -> int:
    """Smallest r keeping at least ``energy`` of the squared singular values, over all channels."""
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    total = svd.energy
    if total == 0.0:
        return 1
    kept = np.cumsum(np.sum(np.square(svd.s, dtype=np.float64), axis=0)) / total
    # Tolerate round-off: energy 1.0 must give the numerical rank, not always max_rank.
    return int(min(np.searchsorted(kept, energy - 1e-12) + 1, svd.max_rank))


def fold_batch_norm(
    kernel: np.ndarray,
    bias: np.ndarray | None,
    scale: np.ndarray,
    shift: np.ndarray,
    mean: np.ndarray,
    var: np.ndarray,
    epsilon: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Kernel and bias of ``BatchNorm(Conv(x))`` as one conv (inference-mode BN)."""
    factor = (scale.astype(np.float64) / np.sqrt(var.astype(np.float64) + epsilon))
    folded = kernel.astype(np.float64) * factor.reshape(-1, *([1] * (kernel.ndim - 1)))
    b = np.zeros(kernel.shape[0]) if bias is None else bias.astype(np.float64)
    folded_bias = (b - mean.astype(np.float64)) * factor + shift.astype(np.float64)
    return folded.astype(kernel.dtype), folded_bias.astype(kernel.dtype)
