"""Schedule rules for CPUs (ARM NEON, x86 AVX2/AVX-512): one file per operator family."""

from .conv2d import Conv2D
from .dense import Dense
from .depthwise import Depthwise
from .fallback import Fallback
from .fused_dwpw import FusedDepthwisePointwise
from .pointwise import Pointwise
from .pool import Pool
from .reduction import Reduction


def rules():
    """In order of precedence; the first rule that accepts a PrimFunc schedules it."""
    from tvm.s_tir import dlight

    return [FusedDepthwisePointwise(), Pointwise(), Depthwise(), Conv2D(), Dense(), dlight.cpu.GEMV(),
            Pool(), Reduction(), Fallback()]
