"""dwsep-compiler: replace standard convolutions by depthwise + pointwise pairs and compile the
result with Apache TVM for ARM CPUs and mobile GPUs.

    from dwsep_compiler import compile_model
    result = compile_model("model.onnx", target="arm", rank=2)
    print(result.table())
"""

from .errors import DwsepError
from .initialization.ranks import RankPolicy
from .pipeline import CompileResult, NoEligibleConvs, compile_model
from .report import LayerReport, Report

__all__ = ["compile_model", "CompileResult", "DwsepError", "NoEligibleConvs", "RankPolicy",
           "Report", "LayerReport"]
__version__ = "0.1.0"
