"""Dense layers (matmul, batch x K @ K x N) on CPUs, batch small: a streamed outer product.

``out[i, j] += x[i, k] * W[k, j]``: for each k the row ``W[k, :]`` is read once, contiguously,
and accumulated into a row of partial sums that stays in L1/L2, so the (often huge) weight
matrix streams through memory exactly once, as one contiguous run per core: the reduction is
split over the cores (`rfactor`), core c summing rows ``[c*K/cores, (c+1)*K/cores)`` into its
own partial row, and a short vectorized pass adds the partial rows and applies the epilogue
(bias, ReLU). Where K is too short to split (or no divisor of it fits the cores), output tiles
spread over the cores instead, each reading a tile-wide slice of every row.

On NEON the weight arrives packed in tiles of ``R`` rows by ``C`` columns
(`lowering.pack_dense`, ``R`` and ``C`` from `packed_dense_tile`): the same loops, with the
row block and the vectors per pass taken from the tile, so that each pass reads one
contiguous tile.
"""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir.dlight.base import ScheduleRule
from tvm.target import Target

from dwsep_compiler.schedules.analysis import iter_kinds, largest_divisor, output_dtype
from dwsep_compiler.schedules.cpu.knobs import cpu_knobs

_MAX_ROWS = 16  # batch rows handled by this rule; bigger matmuls belong to a GEMM rule
MIN_ROWS_PER_CORE = 64  # weight rows per core below which the reduction is not split
ROW_BLOCK = 8  # weight rows accumulated per load and store of a vector of partial sums
VECTOR_BLOCK = 4  # vectors of partial sums kept in registers together
# A packed weight's row block (`packed_dense_tile`): its rows' inputs stay in registers across
# the tiles of a block (emulated Cortex-A76, 2048 x 1024, instructions per FMA: row-major 2.17;
# packed 8 x 4 vectors 1.73, 16 x 4 1.62, 8 x 8 1.70, 16 x 8 1.86, where registers spill).
PACKED_ROW_BLOCK = 16


def packed_dense_tile(batch: int, k: int, n: int, lanes: int) -> tuple[int, int] | None:
    """``(R, C)``: the tile of weight rows by columns one pass of the split reduction reads, for
    a ``batch x K @ K x N`` matmul with ``lanes``-wide vectors; None where this rule would not
    take the matmul (batch too large), the columns are no whole vectors, or no row block above
    one divides K (nothing to pack for). ``C``: up to ``VECTOR_BLOCK`` vectors, dividing N
    (1000 classes: two)."""
    rows = largest_divisor(k, PACKED_ROW_BLOCK)
    if batch > _MAX_ROWS or n % lanes or rows == 1:
        return None
    return rows, lanes * largest_divisor(n // lanes, VECTOR_BLOCK)


class Dense(ScheduleRule):
    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool):
        if not isinstance(func, tirx.PrimFunc):
            return None
        sch = s_tir.Schedule(func)
        root = sch.get_sblock("root")
        blocks = list(sch.get_child_blocks(root))
        reductions = [b for b in blocks if "R" in iter_kinds(sch, b)]
        if len(reductions) != 1 or "matmul" not in sch.get(reductions[0]).name_hint:
            return None
        block = reductions[0]
        kinds = iter_kinds(sch, block)
        loops = sch.get_loops(block)
        if not kinds.endswith("SSR") or set(kinds[:-3]) - {"S"} or len(loops) != len(kinds):
            return None
        extents = [int(sch.get(loop).extent) for loop in loops]
        rows, cols = extents[-3], extents[-2]
        if rows > _MAX_ROWS or any(e != 1 for e in extents[:-3]):
            return None
        start = blocks.index(block)
        for producer in blocks[:start]:
            try:
                sch.compute_inline(producer)
            except Exception:
                return None
        # Inline what can be (bias, ReLU); blocks with several outputs (inference dropout also
        # writes its mask) stay separate, small elementwise stages.
        epilogue = blocks[start + 1:]
        kept = [b for b in epilogue[:-1] if not _try_inline(sch, b)] + epilogue[-1:]
        last = kept[0] if len(kept) == 1 else None
        knobs = cpu_knobs(target, output_dtype(func))
        # Vectors of the widest power of two <= lanes that divides the columns: 1000 classes
        # on AVX-512 take 8-wide vectors (a 250-wide one, split by LLVM into registers and
        # masked parts, streamed VGG's last layer at a quarter of the bandwidth).
        vector = next(v for v in (knobs.lanes >> s for s in range(knobs.lanes.bit_length()))
                      if cols % v == 0)
        # A packed weight (R x C tiles): splits keep whole row blocks, passes whole tiles.
        packed = _packed_tile(sch, block)
        rows, columns = packed or (1, vector)
        splits = largest_divisor(extents[-1] // rows, knobs.cores)
        if splits > 1 and extents[-1] >= MIN_ROWS_PER_CORE * splits:
            tile = (rows, columns // vector) if packed else ()
            return _split_reduction(sch, block, last, splits, vector, *tile)
        # Output tiles: long contiguous runs of each weight row (accumulators live in L1, not
        # registers), but enough tiles for every core.
        tile = largest_divisor(cols, max(columns, min(512, cols // (2 * knobs.cores))),
                               multiple_of=columns)
        *batch, i, j, k = loops
        jo, ji = sch.split(j, [None, tile])
        jv, jl = sch.split(ji, [None, vector if vector > 1 else tile])
        # A packed weight's row blocks as a loop of their own: affine indices, no divisions.
        k, *ks = sch.split(k, [None, rows]) if rows > 1 else [k]
        sch.reorder(*batch, jo, k, *ks, i, jv, jl)
        outer = sch.fuse(*batch, jo) if batch else jo
        sch.parallel(outer)
        sch.unroll(jv)
        sch.vectorize(jl)
        if last is not None:
            sch.reverse_compute_at(last, outer, preserve_unit_loops=True)
            lane_loop = sch.get_loops(last)[-1]
            if int(sch.get(lane_loop).extent) % knobs.lanes == 0:
                sch.vectorize(sch.split(lane_loop, [None, knobs.lanes])[1])
        sch.decompose_reduction(block, k)
        return sch


def _split_reduction(sch: s_tir.Schedule, block, last, splits: int, vector: int,
                     rows: int | None = None, vectors: int | None = None):
    """Weight rows in ``splits`` contiguous runs, one per core, each summed into a partial
    output row; then the partial rows added (and the epilogue applied) vector by vector.

    A weight row is 16 KB for VGG-19's 4096 outputs: output tiles (the fallback below) read
    2 KB of every row, a new 4 KB page each time, where one run per core streams. Measured
    (2 threads, AMD EPYC with AVX-512, standalone, interleaved): VGG-19's 25088 x 4096 layer
    (411 MB) 18.1 -> 11.6 ms (numpy's SGEMV 12-14 ms), 4096 x 4096 2.33 -> 1.47 ms,
    4096 x 1000 0.19 -> 0.15 ms; in-model (interleaved builds) the factorized VGG-19 rank 1
    59 -> 47 ms (onnxruntime's FusedGemm takes 12 ms for the first layer; ours took 18.6).

    Within a run, ``ROW_BLOCK`` rows by ``VECTOR_BLOCK`` vectors of partial sums held in
    registers (measured against one row at a time: emulated Cortex-A76 2048 x 1024, 3.05 ->
    2.17 instructions per FMA; AVX2, 2 cores, two runs: 2048 x 1024 0.89-0.92x the time,
    4096 x 4096 0.64-0.75x, 25088 x 4096 0.78-0.87x, 4096 x 1000 0.70-0.93x).

    ``rows`` and ``vectors``: a packed weight's tile (default: the largest divisors of the run
    and of the columns up to ``ROW_BLOCK`` and ``VECTOR_BLOCK``).
    """
    *batch, i, j, k = sch.get_loops(block)
    run = int(sch.get(k).extent) // splits
    ko, ki = sch.split(k, [splits, None])
    sch.reorder(*batch, ko, ki, i, j)
    partial = sch.rfactor(ko, factor_axis=0)
    *_, pko, pki, pi, pj = sch.get_loops(partial)
    sch.parallel(pko)
    # ``ROW_BLOCK`` weight rows per pass over the partial row: each vector of partial sums is
    # loaded and stored once per block, not once per row (a GEMV is one weight load per FMA;
    # the partial sums' load and store per FMA made it 3 instructions per FMA on NEON).
    rows = rows or largest_divisor(run, ROW_BLOCK)
    pkb, pkr = sch.split(pki, [None, rows])
    # ``VECTOR_BLOCK`` neighbouring vectors per weight row: one pass of the loop's bookkeeping
    # and one read of the input value serve four vectors (A76: 2.89 -> 2.17 instructions per
    # FMA over the row blocks alone; LLVM did not pair the weight loads into LDPs: rows 4N bytes
    # apart are beyond their reach, hence NEON's packed tiles).
    columns = int(sch.get(pj).extent) // vector
    vectors = vectors or largest_divisor(columns, VECTOR_BLOCK)
    pjv, pju, pjl = sch.split(pj, [None, vectors, vector])
    sch.reorder(pkb, pi, pjv, pkr, pju, pjl)
    sch.unroll(pkr)
    sch.unroll(pju)
    sch.vectorize(pjl)
    sch.decompose_reduction(partial, pkb)
    # The sum over the partial rows: vectors of outputs, the partials innermost but one.
    *batch, ko, i, j = sch.get_loops(block)
    jo, jl = sch.split(j, [None, vector])
    sch.reorder(*batch, i, jo, ko, jl)
    sch.vectorize(jl)
    sch.decompose_reduction(block, ko)
    if last is not None:
        sch.reverse_compute_at(last, jo, preserve_unit_loops=True)
        sch.vectorize(sch.get_loops(last)[-1])
    return sch


def _packed_tile(sch: s_tir.Schedule, block) -> tuple[int, int] | None:
    """``(R, C)`` if the matmul reads a weight packed by `lowering.pack_dense`
    (``[K/R, N/C, R, C]``), else None."""
    for region in sch.get(block).reads:
        shape = region.source.shape
        if len(shape) == 4:
            return int(shape[2]), int(shape[3])
    return None


def _try_inline(sch, block) -> bool:
    try:
        sch.compute_inline(block)
        return True
    except Exception:
        return False
