"""Schedule rules for mobile GPUs (OpenCL: Mali, Adreno): one file per operator family.

Applied before dlight's GPU rules (`dwsep_compiler.compile.opencl`); a PrimFunc none of these claims is
scheduled by dlight."""

from dwsep_compiler.schedules.gpu.depthwise import Depthwise
from dwsep_compiler.schedules.gpu.fused_dwpw import FusedDepthwisePointwise
from dwsep_compiler.schedules.gpu.pointwise import Pointwise


def rules(target=None):
    """In order of precedence; the first rule that accepts a PrimFunc schedules it. ``target``
    (unused today) is where target-specific rule sets would be chosen."""
    return [FusedDepthwisePointwise(), Pointwise(), Depthwise()]
