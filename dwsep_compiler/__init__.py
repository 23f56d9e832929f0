"""dwsep-compiler: replace standard convolutions by depthwise + pointwise pairs and compile the
result with Apache TVM for ARM CPUs and mobile GPUs.

    from dwsep_compiler import compile_model
    result = compile_model("model.onnx", target="arm", rank=2)
    print(result.table())

Names are imported on first use, so that light tools (the device runner, the emulator, the CLI's
--help) do not pay for importing TVM.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "compile_model": "pipeline", "CompileResult": "pipeline", "NoEligibleConvs": "pipeline",
    "DwsepError": "errors", "RankPolicy": "initialization.ranks", "Report": "report",
    "LayerReport": "report",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'dwsep_compiler' has no attribute {name!r}")
