"""Target-derived knobs shared by the CPU rules: vector width, register budget, core count; the
lanes per vector follow the kernel's element type (``cpu_knobs(target, dtype)``).

ARM (NEON, 128-bit, 32 vector registers) and x86 (AVX2 256-bit with 16 registers, AVX-512 with
32) run the same algorithms; only these numbers differ.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import tvm


# L1 data cache assumed for every CPU target: the smallest of them (Cortex-A7x, x86: 32 KB,
# indexed by address bits 6-11, i.e. rows 4 KB apart share a set).
L1_DATA_BYTES = 32 * 1024
L1_SET_SPAN = 4096


@dataclass(frozen=True)
class CPUKnobs:
    vector_bytes: int  # one vector register
    registers: int  # architectural vector registers
    cores: int
    # FMA by lane (NEON's FMLA by element): one vector load of weights serves ``lanes`` rows of
    # FMAs, where x86 broadcasts a weight per row from memory inside the FMA itself.
    fma_by_lane: bool = False
    element_bytes: int = 4  # the kernel's element type: float32, or float16 (--precision fp16)
    # Reduction steps per iteration of a register tile's loop over input channels, unrolled
    # (`tiling.unroll_reduction`); 1 leaves it to LLVM. NEON: the loop's counter, pointer
    # updates and branch (4 instructions) otherwise come every few steps of 14-24 FMAs.
    reduction_unroll: int = 1
    # Unroll a register tile's epilogue / write-back (`tiling.schedule_tile_epilogue`). NEON: a
    # two-operand FMA copies each polynomial constant, and a looped epilogue re-broadcast the
    # constants and reloaded the tile from memory. x86 keeps the loop: its FMAs take three
    # operands and constants from memory, and the per-kernel timings of the unrolled form were
    # level or worse within this VM's noise (ddddocr's 48 -> 192 1x1 + SiLU 83 us against
    # 90-124 us, `bench/results/speed-vm-20261207-0847-*`, `-0848-*`). An epilogue computed
    # wider than the tile keeps the loop as well (`tiling.schedule_tile_epilogue`).
    unroll_epilogue: bool = False

    @property
    def lanes(self) -> int:
        """Elements in one vector register (NEON: 4 float32, 8 float16)."""
        return self.vector_bytes // self.element_bytes

    @property
    def accumulators(self) -> int:
        """Vector accumulators a micro-kernel may hold (keep some for loads and broadcasts)."""
        return self.registers - 4 if self.registers <= 16 else self.registers - 8


def cpu_knobs(target: tvm.target.Target, dtype: str = "float32") -> CPUKnobs:
    """The knobs of ``target`` for kernels computing in ``dtype``."""
    width = max(1, tvm.DataType(dtype).bits // 8)
    attrs = target.attrs
    mtriple = str(attrs.get("mtriple", "") or "")
    keys = {str(k) for k in target.keys}
    cores = int(attrs.get("num-cores", 0) or 0) or os.cpu_count() or 1
    if mtriple.startswith("aarch64") or "arm_cpu" in keys:
        return CPUKnobs(16, registers=32, cores=cores, fma_by_lane=True, element_bytes=width,
                        reduction_unroll=16, unroll_epilogue=True)
    has = tvm.target.codegen.llvm_cpu_has_features
    if has(["avx512f"], target):
        return CPUKnobs(64, registers=32, cores=cores, element_bytes=width)
    if has(["avx"], target):
        return CPUKnobs(32, registers=16, cores=cores, element_bytes=width)
    return CPUKnobs(16, registers=16, cores=cores, element_bytes=width)
