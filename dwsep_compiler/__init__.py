"""dwsep-compiler: replace standard convolutions by depthwise + pointwise pairs and compile the
result with Apache TVM for ARM CPUs and mobile GPUs.

    from dwsep_compiler import compile_model
    result = compile_model("model.onnx", target="arm", rank=2)
    print(result.table())

    from dwsep_compiler import factorize     # in memory, for a pipeline's next step
    factorized, report = factorize(model_proto, macs_ratio=0.4, calibration=data_loader)

Names are imported on first use, so that light tools (the device runner, the emulator, the CLI's
--help) do not pay for importing TVM.
"""

from __future__ import annotations

import importlib

from dwsep_compiler import relax_pipelines

__version__ = "0.1.0"

_EXPORTS = {
    "compile_model": "pipeline", "factorize": "pipeline", "CompileResult": "pipeline", "NoEligibleConvs": "pipeline",
    "DwsepError": "errors", "RankPolicy": "initialization.ranks", "Report": "report",
    "LayerReport": "report",
}
__all__ = sorted(_EXPORTS)

# tvm.compile(..., relax_pipeline="dwsep_cpu" / "dwsep_opencl"), without importing TVM here
relax_pipelines.install()


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'dwsep_compiler' has no attribute {name!r}")
