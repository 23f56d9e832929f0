"""The factorization math against its definition (numpy SVD of each input-channel slice)."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from dwsep_compiler.initialization import lowrank


def _reference_singular_values(kernel):
    n, m = kernel.shape[:2]
    return np.stack([np.linalg.svd(kernel[:, c].reshape(n, -1).astype(np.float64),
                                   compute_uv=False) for c in range(m)])


kernels = st.tuples(st.integers(1, 24), st.integers(1, 12), st.integers(1, 5),
                    st.integers(1, 5), st.integers(0, 2**31 - 1))


@settings(max_examples=60, deadline=None)
@given(kernels)
def test_full_rank_reproduces_the_kernel(case):
    n, m, kh, kw, seed = case
    kernel = np.random.default_rng(seed).standard_normal((n, m, kh, kw)).astype(np.float32)
    svd = lowrank.channel_svd(kernel)
    depthwise, pointwise = lowrank.factorize_kernel(kernel, svd.max_rank, svd)
    assert depthwise.shape == (m * svd.max_rank, 1, kh, kw)
    assert pointwise.shape == (n, m * svd.max_rank, 1, 1)
    np.testing.assert_allclose(lowrank.compose(depthwise, pointwise, m), kernel,
                               rtol=0, atol=1e-5 * np.abs(kernel).max())
    assert lowrank.relative_error(svd, svd.max_rank) < 1e-6


@settings(max_examples=60, deadline=None)
@given(kernels, st.integers(1, 8))
def test_truncation_error_is_the_dropped_singular_value_energy(case, rank):
    n, m, kh, kw, seed = case
    kernel = np.random.default_rng(seed).standard_normal((n, m, kh, kw)).astype(np.float32)
    svd = lowrank.channel_svd(kernel)
    depthwise, pointwise = lowrank.factorize_kernel(kernel, rank, svd)
    approx = lowrank.compose(depthwise, pointwise, m)
    dropped = np.sum(_reference_singular_values(kernel)[:, rank:] ** 2)
    actual = np.sum((approx.astype(np.float64) - kernel) ** 2)
    assert actual == pytest.approx(dropped, rel=1e-4, abs=1e-6 * np.sum(kernel.astype(np.float64) ** 2))
    assert lowrank.dropped_energy(svd, rank) == pytest.approx(dropped, rel=1e-9, abs=1e-9)
    # Eckart-Young: no other rank-r split of a channel does better than the SVD one.
    other = lowrank.compose(depthwise + 0.01, pointwise, m)
    assert np.sum((other.astype(np.float64) - kernel) ** 2) >= actual - 1e-6


def test_rank_for_energy_is_the_smallest_rank_that_keeps_it():
    kernel = np.random.default_rng(0).standard_normal((16, 4, 3, 3)).astype(np.float32)
    svd = lowrank.channel_svd(kernel)
    energy_by_rank = np.cumsum(np.sum(_reference_singular_values(kernel) ** 2, axis=0))
    fractions = energy_by_rank / energy_by_rank[-1]
    for target in (0.1, 0.5, 0.9, 0.99, 1.0):
        rank = lowrank.rank_for_energy(svd, target)
        assert fractions[rank - 1] >= target - 1e-9
        assert rank == 1 or fractions[rank - 2] < target


def test_constant_kernel_is_exactly_rank_one():
    kernel = np.full((32, 8, 3, 3), 0.02, dtype=np.float32)
    svd = lowrank.channel_svd(kernel)
    assert lowrank.rank_for_energy(svd, 1.0) == 1
    depthwise, pointwise = lowrank.factorize_kernel(kernel, 1, svd)
    np.testing.assert_allclose(lowrank.compose(depthwise, pointwise, 8), kernel, atol=1e-8)


def test_rank_above_max_pads_with_zero_filters_and_stays_exact():
    kernel = np.random.default_rng(3).standard_normal((2, 3, 3, 3)).astype(np.float32)
    depthwise, pointwise = lowrank.factorize_kernel(kernel, 5)
    assert depthwise.shape == (15, 1, 3, 3)
    np.testing.assert_allclose(lowrank.compose(depthwise, pointwise, 3), kernel, atol=1e-5)


def test_fold_batch_norm_matches_the_definition():
    rng = np.random.default_rng(4)
    kernel = rng.standard_normal((6, 2, 3, 3)).astype(np.float32)
    bias = rng.standard_normal(6).astype(np.float32)
    scale, shift, mean = (rng.standard_normal(6).astype(np.float32) for _ in range(3))
    var = rng.uniform(0.5, 2, 6).astype(np.float32)
    w, b = lowrank.fold_batch_norm(kernel, bias, scale, shift, mean, var, 1e-5)
    factor = scale / np.sqrt(var + 1e-5)
    np.testing.assert_allclose(w, kernel * factor[:, None, None, None], rtol=1e-6)
    np.testing.assert_allclose(b, (bias - mean) * factor + shift, rtol=1e-5, atol=1e-6)
