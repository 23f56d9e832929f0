"""Dense layers (matmul, batch x K @ K x N) on CPUs, batch small: a streamed outer product.

``out[i, j] += x[i, k] * W[k, j]``: for each k the row ``W[k, j-tile]`` is read once,
contiguously, and accumulated into a vector tile of outputs, so the (often huge) weight matrix
streams through memory exactly once. Output tiles spread over the cores; the epilogue (bias,
ReLU) runs per tile.
"""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir.dlight.base import ScheduleRule
from tvm.target import Target

from .common import _iter_kinds, largest_divisor
from .knobs import cpu_knobs

_MAX_ROWS = 16  # batch rows handled by this rule; bigger matmuls belong to a GEMM rule


class Dense(ScheduleRule):
    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool):
        if not isinstance(func, tirx.PrimFunc):
            return None
        sch = s_tir.Schedule(func)
        root = sch.get_sblock("root")
        blocks = list(sch.get_child_blocks(root))
        reductions = [b for b in blocks if "R" in _iter_kinds(sch, b)]
        if len(reductions) != 1 or "matmul" not in sch.get(reductions[0]).name_hint:
            return None
        block = reductions[0]
        kinds = _iter_kinds(sch, block)
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
        knobs = cpu_knobs(target)
        # Long contiguous runs of each weight row (accumulators live in L1, not registers), but
        # enough tiles for every core.
        # Vectors of the widest power of two <= lanes that divides the columns: 1000 classes
        # on AVX-512 take 8-wide vectors (a 250-wide one, split by LLVM into registers and
        # masked parts, streamed VGG's last layer at a quarter of the bandwidth).
        vector = next(v for v in (knobs.lanes >> s for s in range(knobs.lanes.bit_length()))
                      if cols % v == 0)
        tile = largest_divisor(cols, max(vector, min(512, cols // (2 * knobs.cores))),
                               multiple_of=vector)
        *batch, i, j, k = loops
        jo, ji = sch.split(j, [None, tile])
        jv, jl = sch.split(ji, [None, vector if vector > 1 else tile])
        sch.reorder(*batch, jo, k, i, jv, jl)
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


def _try_inline(sch, block) -> bool:
    try:
        sch.compute_inline(block)
        return True
    except Exception:
        return False
