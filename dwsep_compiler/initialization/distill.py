"""Layer-wise distillation of one depthwise + pointwise pair: the least-squares math, once.

A factorized layer computes ``y = sum_m P_m D_m x_m + b`` per output pixel, where ``x_m`` is the
``taps = kh*kw`` patch of input channel m, ``D_m`` (``r x taps``) its depthwise filters and
``P_m`` (``N x r``) the pointwise columns that read them. Given calibration pixels (patches ``X``
of the layer's input, teacher outputs ``T``) we minimize ``||T - (W(D, P) X + b)||_F^2`` where
``W(D, P)[:, m] = P_m D_m`` is the effective kernel.

Everything the solver needs is in the Gram matrices of the augmented patches ``X~ = [X; 1]``:

* ``xx = X~ X~^T``: ``(K+1)^2`` with ``K = M * taps``;
* ``xt = X~ T^T``: ``(K+1) x N``;
* ``tt = ||T||_F^2``.

`LayerGram` accumulates them over batches, so the activations are never held: **memory is
``8 * ((K+1)^2 + (K+1)*N)`` bytes per layer, whatever the number of samples** (one batch of
patches, ``rows x K`` float32, is alive at a time; `add_conv` cuts batches into chunks of at most
``CHUNK_ROWS`` pixels). The objective of any candidate is a quadratic form in these matrices
(`factors_error`), and both alternating steps are exact minimizers:

* pointwise step, D fixed: the features are ``Z~ = [Dblk^T X; 1]`` (``M*r + 1`` channels, the bias
  included), ``Z~ Z~^T = Dblk~^T xx Dblk~`` and ``Z~ T^T = Dblk~^T xt``: one ridge-regularized
  linear solve of size ``M*r + 1`` (`solve_pointwise`);
* depthwise step, P fixed: the output is linear in the filters too. The joint system has
  ``(M*r*taps)^2`` entries; instead we update one input channel's block ``D_m`` at a time with the
  others fixed (block Gauss-Seidel): its normal matrix is ``kron(P_m^T P_m, xx_mm)``, size
  ``r*taps``, and the residual statistics ``xt - xx W~^T`` are updated after each block
  (`solve_depthwise`). Each block update minimizes the (ridge) objective exactly, so a sweep
  never increases it.

`fit_layer` starts from the data-free SVD factors and alternates, keeping the best iterate by
the unregularized calibration error: the result is never worse than the SVD initialization (nor
than the first pointwise-only refit) on the calibration data.

Pure numpy, no I/O: weights and statistics in, factors and numbers out.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from dwsep_compiler.initialization import lowrank

CHUNK_ROWS = 16384  # pixels per Gram update: bounds the float32 patch buffer to CHUNK_ROWS*K*4 B
DEFAULT_RIDGE = 1e-4  # relative to the mean diagonal of each normal matrix
DEFAULT_ITERATIONS = 3  # alternations (depthwise sweep + pointwise solve) after the first refit


@dataclass(frozen=True)
class ConvGeometry:
    """What a 2-D convolution does to its input's pixels (pads: top, left, bottom, right)."""

    kernel: tuple[int, int]
    strides: tuple[int, int] = (1, 1)
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)
    dilations: tuple[int, int] = (1, 1)

    @property
    def taps(self) -> int:
        return self.kernel[0] * self.kernel[1]

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        (kh, kw), (sh, sw), (dh, dw) = self.kernel, self.strides, self.dilations
        top, left, bottom, right = self.pads
        return ((height + top + bottom - dh * (kh - 1) - 1) // sh + 1,
                (width + left + right - dw * (kw - 1) - 1) // sw + 1)


def patch_view(x: np.ndarray, geometry: ConvGeometry) -> np.ndarray:
    """``[B, Ho, Wo, M, kh, kw]``: every output pixel's input patch, a strided view (no copy) of
    ``x`` ``[B, M, H, W]`` padded."""
    b, m, h, w = x.shape
    (kh, kw), (sh, sw), (dh, dw) = geometry.kernel, geometry.strides, geometry.dilations
    top, left, bottom, right = geometry.pads
    ho, wo = geometry.output_size(h, w)
    padded = np.pad(np.asarray(x, dtype=np.float32),
                    ((0, 0), (0, 0), (top, bottom), (left, right)))
    s = padded.strides
    return np.lib.stride_tricks.as_strided(
        padded, shape=(b, ho, wo, m, kh, kw),
        strides=(s[0], s[2] * sh, s[3] * sw, s[1], s[2] * dh, s[3] * dw), writeable=False)


def conv_patches(x: np.ndarray, geometry: ConvGeometry) -> np.ndarray:
    """The im2col matrix of ``x`` ``[B, M, H, W]``: ``[B*Ho*Wo, M*kh*kw]`` float32, pixel rows in
    ``(b, i, j)`` order, columns ``m*taps + (u*kw + v)`` (the layout of ``W.reshape(N, -1)``)."""
    view = patch_view(x, geometry)
    return view.reshape(int(np.prod(view.shape[:3])), -1)


def output_pixels(y: np.ndarray) -> np.ndarray:
    """``[B, N, Ho, Wo]`` -> ``[B*Ho*Wo, N]`` in the row order of `conv_patches`."""
    return np.asarray(y).transpose(0, 2, 3, 1).reshape(-1, y.shape[1])


@dataclass
class LayerGram:
    """Streaming sufficient statistics of one layer's least-squares problem (see module doc)."""

    in_channels: int
    taps: int
    out_channels: int
    xx: np.ndarray = field(repr=False, default=None)  # (K+1, K+1) float64
    xt: np.ndarray = field(repr=False, default=None)  # (K+1, N) float64
    tt: float = 0.0
    pixels: int = 0

    def __post_init__(self):
        k = self.in_channels * self.taps
        if self.xx is None:
            self.xx = np.zeros((k + 1, k + 1))
        if self.xt is None:
            self.xt = np.zeros((k + 1, self.out_channels))

    @property
    def size(self) -> int:
        return self.in_channels * self.taps

    def add(self, patches: np.ndarray, target: np.ndarray | None = None) -> None:
        """Accumulate pixel rows: ``patches [P, K]`` and (unless the teacher is set later with
        `with_local_teacher`) ``target [P, N]``."""
        k = self.size
        if patches.shape[1] != k:
            raise ValueError(f"patches have {patches.shape[1]} columns, expected {k}")
        # One chunk's products in float32 (at most CHUNK_ROWS terms each), accumulated across
        # chunks in float64.
        p = np.ascontiguousarray(patches, dtype=np.float32)
        sums = p.sum(axis=0, dtype=np.float64)
        self.xx[:k, :k] += p.T @ p
        self.xx[:k, k] += sums
        self.xx[k, :k] += sums
        self.xx[k, k] += p.shape[0]
        if target is not None:
            t = np.ascontiguousarray(target, dtype=np.float32)
            self.xt[:k] += p.T @ t
            self.xt[k] += t.sum(axis=0, dtype=np.float64)
            self.tt += float(np.sum(np.square(t, dtype=np.float64)))
        self.pixels += p.shape[0]

    def add_conv(self, x: np.ndarray, geometry: ConvGeometry,
                 teacher: np.ndarray | None = None) -> None:
        """Accumulate a batch: layer input ``x [B, M, H, W]``, teacher output ``[B, N, Ho, Wo]``."""
        ho, wo = geometry.output_size(*x.shape[2:])
        if teacher is not None and tuple(teacher.shape) != (x.shape[0], self.out_channels, ho, wo):
            raise ValueError(f"teacher shape {teacher.shape} does not match the conv output "
                             f"{(x.shape[0], self.out_channels, ho, wo)}")
        per_sample = max(1, ho * wo)
        step = max(1, CHUNK_ROWS // per_sample)
        for start in range(0, x.shape[0], step):
            patches = conv_patches(x[start:start + step], geometry)
            target = None if teacher is None else output_pixels(teacher[start:start + step])
            self.add(patches, target)

    def with_local_teacher(self, weight: np.ndarray, bias: np.ndarray | None) -> "LayerGram":
        """The statistics for the teacher "original conv applied to this (student) input":
        ``T = W X + b`` needs no teacher activations, only ``xx``."""
        waug = augmented_kernel(weight.reshape(weight.shape[0], -1), bias)
        xt = self.xx @ waug.T
        return LayerGram(self.in_channels, self.taps, self.out_channels, self.xx.copy(), xt,
                         float(np.sum(waug * xt.T)), self.pixels)

    def merged(self, other: "LayerGram") -> "LayerGram":
        """The statistics of both sample sets (Gram matrices add)."""
        return LayerGram(self.in_channels, self.taps, self.out_channels, self.xx + other.xx,
                         self.xt + other.xt, self.tt + other.tt, self.pixels + other.pixels)


@dataclass
class Factors:
    """One factorized layer: ``depthwise [M, r, taps]``, ``pointwise [N, M, r]``, ``bias [N]``
    (float64; `onnx_weights` gives the ONNX tensors)."""

    depthwise: np.ndarray
    pointwise: np.ndarray
    bias: np.ndarray

    @property
    def rank(self) -> int:
        return self.depthwise.shape[1]

    def kernel(self) -> np.ndarray:
        """The effective standard kernel ``[N, M*taps]``."""
        n, m, _ = self.pointwise.shape
        return np.einsum("nmr,mrt->nmt", self.pointwise, self.depthwise).reshape(n, -1)

    def onnx_weights(self, kernel: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(depthwise [M*r, 1, kh, kw], pointwise [N, M*r, 1, 1], bias [N])`` float32."""
        m, r, _ = self.depthwise.shape
        n = self.pointwise.shape[0]
        return (self.depthwise.reshape(m * r, 1, *kernel).astype(np.float32),
                self.pointwise.reshape(n, m * r, 1, 1).astype(np.float32),
                self.bias.astype(np.float32))


def svd_factors(weight: np.ndarray, bias: np.ndarray | None, rank: int,
                svd: lowrank.ChannelSVD | None = None) -> Factors:
    """The data-free initialization: `lowrank.factorize_kernel` in `Factors` form."""
    n, m = weight.shape[:2]
    taps = int(np.prod(weight.shape[2:]))
    dw, pw = lowrank.factorize_kernel(np.asarray(weight, dtype=np.float64), rank, svd)
    return Factors(dw.reshape(m, rank, taps), pw.reshape(n, m, rank),
                   np.zeros(n) if bias is None else np.asarray(bias, dtype=np.float64))


def augmented_kernel(kernel: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    """``[W, b]``: ``N x (K+1)`` float64."""
    b = np.zeros(kernel.shape[0]) if bias is None else np.asarray(bias, dtype=np.float64)
    return np.concatenate([np.asarray(kernel, dtype=np.float64), b[:, None]], axis=1)


def factors_error(gram: LayerGram, factors: Factors) -> float:
    """``||T - (W X + b)||_F / ||T||_F`` of a factorized layer (``W = P D``; 0 when the teacher
    is all zero), from the Gram matrices alone, through the pointwise normal equations
    (`fit_pointwise`): ``K^2 r + (M*r+1)^2 N`` work instead of ``K^2 N`` through ``W``.

    A quadratic form of Gram matrices whose chunks are float32 products, so values below
    about 1e-3 are at the round-off floor (the squared error cancels to ~1e-7 of ``tt``)."""
    a, b = pointwise_normal_equations(gram, factors.depthwise)
    n, m, r = factors.pointwise.shape
    x = np.concatenate([factors.pointwise.reshape(n, m * r).T, factors.bias[None]])
    return _normal_error(gram, a, b, x)


def _normal_error(gram: LayerGram, a: np.ndarray, b: np.ndarray, x: np.ndarray) -> float:
    """The relative error of pointwise weights and bias ``x`` ``[M*r+1, N]`` given the normal
    equations ``(a, b)`` of their depthwise filters: ``||T||^2 - 2 <x, b> + <x, a x>``."""
    squared = float(np.sum(x * (a @ x))) - 2.0 * float(np.sum(x * b)) + gram.tt
    return float(np.sqrt(max(squared, 0.0) / gram.tt)) if gram.tt > 0 else 0.0


def ridge_solve(a: np.ndarray, b: np.ndarray, ridge: float,
                unpenalized: slice | None = None) -> np.ndarray:
    """``argmin_x ||.||``: solves ``(A + lambda I) x = b`` with ``lambda = ridge * mean(diag A)``
    (rows in ``unpenalized``, e.g. the bias, get no penalty). Falls back to least squares when
    the system is singular (e.g. ridge 0 and a dead input channel)."""
    a = np.array(a, dtype=np.float64)
    diagonal = a.reshape(-1)[::a.shape[0] + 1]  # a view: updated in place below
    scale = float(diagonal.mean()) if a.size else 0.0
    penalty = np.full(a.shape[0], ridge * scale if scale > 0 else ridge)
    if unpenalized is not None:
        penalty[unpenalized] = 0.0
    diagonal += penalty
    try:
        return np.linalg.solve(a, b)
    except np.linalg.LinAlgError:
        return np.linalg.lstsq(a, b, rcond=None)[0]


def pointwise_normal_equations(gram: LayerGram, depthwise: np.ndarray):
    """``(Z~ Z~^T, Z~ T^T)`` for the depthwise output ``Z~ = [Dblk^T X; 1]`` (``M*r + 1`` rows,
    the bias last), computed from the patch Gram matrices (no data pass)."""
    m, r, taps = depthwise.shape
    k = m * taps
    # zz[(m, j), (m', i)] = sum_{t,u} D[m, j, t] xx[(m, t), (m', u)] D[m', i, u]
    dg = _depthwise_gram(gram, depthwise).reshape(m * r, m, taps)
    zz = np.matmul(dg.transpose(1, 0, 2), depthwise.transpose(0, 2, 1))  # [m, (m, j), i]
    zz = zz.transpose(1, 0, 2).reshape(m * r, m * r)
    zx1 = np.einsum("mjt,mt->mj", depthwise, gram.xx[:k, k].reshape(m, taps)).reshape(-1)
    a = np.empty((m * r + 1, m * r + 1))
    a[:-1, :-1] = zz
    a[:-1, -1] = zx1
    a[-1, :-1] = zx1
    a[-1, -1] = gram.xx[k, k]
    b = np.empty((m * r + 1, gram.out_channels))
    b[:-1] = np.matmul(depthwise, gram.xt[:k].reshape(m, taps, -1)).reshape(m * r, -1)
    b[-1] = gram.xt[k]
    return a, b


def _depthwise_gram(gram: LayerGram, depthwise: np.ndarray) -> np.ndarray:
    """``Dblk^T xx`` ``[M, r, K]`` (``= (xx Dblk)^T``, xx is symmetric): channel m's filters
    times its ``taps`` rows of the patch Gram, one batched product over contiguous rows,
    ``K^2 r`` work."""
    m, _, taps = depthwise.shape
    k = m * taps
    return np.matmul(depthwise, gram.xx[:k, :k].reshape(m, taps, k))


def solve_pointwise(gram: LayerGram, depthwise: np.ndarray,
                    ridge: float = DEFAULT_RIDGE) -> tuple[np.ndarray, np.ndarray]:
    """Pointwise weights ``[N, M, r]`` and bias ``[N]`` minimizing the ridge objective with the
    depthwise filters fixed (closed form)."""
    factors, _ = fit_pointwise(gram, depthwise, ridge)
    return factors.pointwise, factors.bias


def fit_pointwise(gram: LayerGram, depthwise: np.ndarray,
                  ridge: float = DEFAULT_RIDGE) -> tuple[Factors, float]:
    """`solve_pointwise` as `Factors`, with their `factors_error` from the same normal
    equations."""
    m, r, _ = depthwise.shape
    a, b = pointwise_normal_equations(gram, depthwise)
    x = ridge_solve(a, b, ridge, unpenalized=slice(m * r, m * r + 1))
    error = _normal_error(gram, a, b, x)
    return Factors(depthwise, x[:-1].T.reshape(-1, m, r), x[-1].copy()), error


def solve_depthwise(gram: LayerGram, factors: Factors, ridge: float = DEFAULT_RIDGE) -> np.ndarray:
    """One block Gauss-Seidel sweep over input channels: new depthwise filters ``[M, r, taps]``
    with the pointwise weights and bias fixed. Each block is the exact ridge minimizer given the
    other channels' current filters.

    Only the residual projected on the pointwise columns is tracked,
    ``S[c] = (xt - xx W~^T)[rows_c] P_c`` (``taps x r`` per channel): after channel c' moves by
    ``dD``, ``S[c] -= xx[c, c'] dD^T (P_c'^T P_c)``; that is ``O(K * taps * r)`` work per block
    instead of ``O(K * taps * N)`` for the full residual, and ``S`` starts from
    ``Dblk^T xx`` (``K^2 r``) instead of the full residual (``K^2 N``). Extra memory:
    ``(M*r)^2`` floats.
    """
    depthwise = factors.depthwise.copy()
    pw = factors.pointwise
    m, r, taps = depthwise.shape
    k = m * taps
    flat = pw.reshape(pw.shape[0], m * r)
    pw_gram = flat.T @ flat  # P^T P
    # S = xt P - xx W~^T P with W~^T P = [Dblk P^T P; b^T P], only channel c's own block of
    # rows and columns kept: no (M*taps)^2 N product.
    # (Batched products, not einsum: einsum's loops were 10x slower at M*r = 256.)
    dg = _depthwise_gram(gram, depthwise).reshape(m * r, m, taps)
    projected = (np.matmul(gram.xt[:k].reshape(m, taps, -1), pw.transpose(1, 0, 2))
                 - np.matmul(dg.transpose(1, 2, 0), pw_gram.reshape(m * r, m, r).transpose(1, 0, 2))
                 - gram.xx[:k, k].reshape(m, taps, 1) * (factors.bias @ flat).reshape(m, 1, r))
    # ptp[a, b] = P_a^T P_b [r, r]: row a carries channel a's change into every channel's
    # projected residual in one batched product.
    ptp = pw_gram.reshape(m, r, m, r).transpose(0, 2, 1, 3).copy()
    channels = np.arange(m)
    own_gram = gram.xx[:k, :k].reshape(m, taps, m, taps)[channels, :, channels]  # C_c
    solver = _KroneckerRidge(ptp[channels, channels], own_gram, ridge)
    for c in range(m):
        rows = slice(c * taps, (c + 1) * taps)
        old = depthwise[c]
        # taps x r: channel c's part removed
        own = projected[c] + own_gram[c] @ (old.T @ ptp[c, c])
        new = solver.solve(c, own.T)
        # [K, r]: xx[:k, rows] through its transpose (xx is symmetric), whose rows are
        # contiguous: 4x faster than the column slice at K = 2304.
        change = gram.xx[rows, :k].T @ (new - old).T
        projected -= change.reshape(m, taps, r) @ ptp[c]
        depthwise[c] = new
    return depthwise


class _KroneckerRidge:
    """The depthwise block solves of one sweep: for channel c, ``X`` ``[r, taps]`` with
    ``G_c X C_c + lambda_c X = B`` (the ridge system ``(kron(G_c, C_c) + lambda_c I) vec X =
    vec B`` of `ridge_solve`, ``lambda_c = ridge * mean(diag G_c) * mean(diag C_c)``), where
    ``G_c = P_c^T P_c`` and ``C_c`` (channel c's block of the patch Gram) do not change during
    the sweep. Both are diagonalized once for all channels (two batched ``eigh``), so a block
    costs a few small products instead of a factorization: the per-block solves were two
    thirds of a sweep. A zero eigenvalue of the system (ridge 0, a dead channel) gets the
    minimum-norm solution, as least squares gives it."""

    def __init__(self, g: np.ndarray, c: np.ndarray, ridge: float):
        self.g_values, self.g_vectors = np.linalg.eigh(g)  # [M, r], [M, r, r]
        self.c_values, self.c_vectors = np.linalg.eigh(c)  # [M, taps], [M, taps, taps]
        scale = (np.einsum("mii->m", g) / g.shape[1]) * (np.einsum("mii->m", c) / c.shape[1])
        penalty = np.where(scale > 0, ridge * scale, ridge)
        values = (self.g_values[:, :, None] * self.c_values[:, None, :]
                  + penalty[:, None, None])  # [M, r, taps]: the system's eigenvalues
        tiny = 1e-12 * np.abs(values).max(axis=(1, 2), keepdims=True)
        self.inverse = np.where(np.abs(values) > tiny, 1.0 / np.where(values == 0, 1, values), 0)

    def solve(self, channel: int, b: np.ndarray) -> np.ndarray:
        v, u = self.g_vectors[channel], self.c_vectors[channel]
        return v @ ((v.T @ b @ u) * self.inverse[channel]) @ u.T


def _balance(factors: Factors) -> Factors:
    """Rescale each (channel, filter) pair so depthwise and pointwise norms match (the product is
    unchanged; keeps the relative ridge meaningful across alternations)."""
    d = np.linalg.norm(factors.depthwise, axis=2)  # [M, r]
    p = np.linalg.norm(factors.pointwise, axis=0)  # [M, r]
    scale = np.where((d > 0) & (p > 0), np.sqrt(p / np.where(d > 0, d, 1.0)), 1.0)
    return Factors(factors.depthwise * scale[:, :, None], factors.pointwise / scale[None],
                   factors.bias)


@dataclass
class LayerFit:
    """The result of `fit_layer`: the best factors and the relative errors on the calibration
    pixels of the SVD initialization, of each iterate, and of the returned factors."""

    factors: Factors
    svd_error: float
    error: float
    history: list[float]


def fit_layer(gram: LayerGram, init: Factors, iterations: int = DEFAULT_ITERATIONS,
              ridge: float = DEFAULT_RIDGE, refine_depthwise: bool = True) -> LayerFit:
    """Refit ``init`` (the SVD factors) to the calibration statistics: pointwise + bias in closed
    form, then ``iterations`` alternations of (depthwise sweep, pointwise solve). Returns the
    iterate with the least calibration error (the SVD init included)."""
    best = init
    svd_error = factors_error(gram, init)
    best_error = svd_error
    history = [svd_error]
    current = init
    for step in range(1 + (iterations if refine_depthwise else 0)):
        if step > 0:
            current = _balance(Factors(solve_depthwise(gram, current, ridge), current.pointwise,
                                       current.bias))
        current, error = fit_pointwise(gram, current.depthwise, ridge)
        history.append(error)
        if error < best_error:
            best, best_error = current, error
    return LayerFit(best, svd_error, best_error, history)


# ------------------------------------------------------------------------------ post-activation

POST_ACTIVATION_BYTES = 1 << 28  # pixel sample of one layer: patches + teacher, float32
POST_ACTIVATION_ROWS = 32768  # and at most this many pixels (each round is a few passes over them)
POST_ACTIVATION_PENALTIES = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0)  # one W/z alternation each


class PixelSample:
    """A uniform random subset of one layer's calibration pixels, held in memory: the
    post-activation fit needs the pixels themselves (its targets change every round), not only
    their Gram matrices. **Memory: at most ``budget_bytes``** (``rows * (K + N) * 4`` bytes of
    float32 patches and teacher rows) and ``max_rows`` pixels; every pixel is kept when they all fit.

    ``total_rows``: the number of pixels the stream will offer (samples x output pixels), so that
    each is kept with the same probability."""

    def __init__(self, geometry: ConvGeometry, in_channels: int, out_channels: int,
                 total_rows: int, budget_bytes: int = POST_ACTIVATION_BYTES,
                 max_rows: int = POST_ACTIVATION_ROWS, seed: int = 0):
        self.geometry = geometry
        row_bytes = 4 * (in_channels * geometry.taps + out_channels)
        self.capacity = max(1, min(total_rows, max_rows, budget_bytes // row_bytes))
        self.keep = self.capacity / max(total_rows, 1)
        self.rng = np.random.default_rng(seed)
        self.patches: list[np.ndarray] = []
        self.teachers: list[np.ndarray] = []
        self.rows = 0

    def add_conv(self, x: np.ndarray, teacher: np.ndarray | None = None) -> None:
        """Offer a batch: layer input ``[B, M, H, W]``, teacher output ``[B, N, Ho, Wo]``."""
        if self.rows >= self.capacity:
            return
        view = patch_view(x, self.geometry)
        b, ho, wo = view.shape[:3]
        chosen = (np.arange(b * ho * wo) if self.keep >= 1.0 else
                  np.flatnonzero(self.rng.random(b * ho * wo) < self.keep))
        chosen = chosen[:self.capacity - self.rows]
        bi, ii, ji = np.unravel_index(chosen, (b, ho, wo))
        self.patches.append(np.ascontiguousarray(view[bi, ii, ji].reshape(len(chosen), -1)))
        if teacher is not None:
            self.teachers.append(np.asarray(teacher, dtype=np.float32)[bi, :, ii, ji])
        self.rows += len(chosen)

    def arrays(self) -> tuple[np.ndarray, np.ndarray | None]:
        """``(patches [P, K], teacher [P, N] or None)``."""
        patches = np.concatenate(self.patches)
        return patches, np.concatenate(self.teachers) if self.teachers else None


def linear_output(patches: np.ndarray, factors: Factors) -> np.ndarray:
    """The layer's pre-activation output ``[P, N]`` on patch rows, computed as the factorized
    pair computes it (depthwise, then pointwise): at every rank where the rewrite cuts MACs
    that is cheaper than through the effective kernel (a 256-channel 3x3 layer at rank 1:
    4x faster)."""
    m, r, taps = factors.depthwise.shape
    depthwise = np.einsum("pmt,mrt->pmr", patches.reshape(len(patches), m, taps),
                          factors.depthwise.astype(np.float32))
    pointwise = factors.pointwise.reshape(-1, m * r).T.astype(np.float32)
    return depthwise.reshape(len(patches), m * r) @ pointwise + factors.bias.astype(np.float32)


def post_activation_error(patches: np.ndarray, target: np.ndarray, factors: Factors,
                          activation) -> float:
    """``||act(y) - target||_F / ||target||_F`` with ``target = act(teacher)``."""
    return _activated_error(linear_output(patches, factors), target, activation)


def _activated_error(linear: np.ndarray, target: np.ndarray, activation) -> float:
    norm = float(np.sqrt(np.sum(np.square(target, dtype=np.float64))))
    if norm == 0.0:
        return 0.0
    diff = activation(linear) - target
    return float(np.sqrt(np.sum(np.square(diff, dtype=np.float64)))) / norm


def fit_post_activation(patches: np.ndarray, teacher: np.ndarray, init: Factors, activation,
                        penalties=POST_ACTIVATION_PENALTIES,
                        ridge: float = DEFAULT_RIDGE) -> LayerFit:
    """Refit ``init`` (the linear fit) so that ``act(layer(x))`` matches ``act(teacher)`` on the
    sampled pixels (``patches [P, K]``, pre-activation ``teacher [P, N]``), by Zhang et al.'s
    relaxation (see `activation`): per penalty, the targets ``z`` move to their closed-form
    minimizer, then the factors to the least-squares fit toward ``z`` (one depthwise sweep and
    pointwise solve, from the Gram matrices of the sample). The patch Gram is formed once.

    Returns the iterate with the least post-activation error, ``init`` included, so the result is
    never worse than the linear fit on these pixels; ``svd_error`` holds ``init``'s error."""
    n = teacher.shape[1]
    taps = init.depthwise.shape[2]
    m = init.depthwise.shape[0]
    base = LayerGram(m, taps, n)
    base.add(patches)
    teacher = np.asarray(teacher, dtype=np.float32)
    target = activation(teacher)
    linear = linear_output(patches, init)  # the current factors' output, one per round
    best, best_error = init, _activated_error(linear, target, activation)
    history = [best_error]
    current = init
    for penalty in penalties:
        z = activation.relaxed_target(teacher, linear, penalty)
        z = np.asarray(z, dtype=np.float32)
        k = base.size
        xt = np.empty((k + 1, n))
        xt[:k] = patches.T @ z
        xt[k] = z.sum(axis=0, dtype=np.float64)
        gram = LayerGram(m, taps, n, base.xx, xt,
                         float(np.sum(np.square(z, dtype=np.float64))), base.pixels)
        current = fit_layer(gram, current, iterations=1, ridge=ridge).factors
        linear = linear_output(patches, current)
        error = _activated_error(linear, target, activation)
        history.append(error)
        if error < best_error:
            best, best_error = current, error
    return LayerFit(best, history[0], best_error, history)
