"""Schedule rules for CPUs (ARM NEON, x86 AVX2/AVX-512): one file per operator family."""

from dwsep_compiler.schedules.cpu.conv2d import Conv2D
from dwsep_compiler.schedules.cpu.dense import Dense
from dwsep_compiler.schedules.cpu.depthwise import Depthwise
from dwsep_compiler.schedules.cpu.fallback import Fallback
from dwsep_compiler.schedules.cpu.fused_dwpw import FusedDepthwisePointwise
from dwsep_compiler.schedules.cpu.pointwise import Pointwise
from dwsep_compiler.schedules.cpu.pool import Pool
from dwsep_compiler.schedules.cpu.reduction import Reduction


def rules():
    """In order of precedence; the first rule that accepts a PrimFunc schedules it."""
    from tvm.s_tir import dlight

    return [FusedDepthwisePointwise(), Pointwise(), Depthwise(), Conv2D(), Dense(), dlight.cpu.GEMV(),
            Pool(), Reduction(), Fallback()]
