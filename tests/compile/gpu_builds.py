"""GPU builds the OpenCL tests share: the input shape, a phone's limits, and `compile.build` for a
preset cached across tests."""

from __future__ import annotations



from dwsep_compiler import compile as tvm_compile
from dwsep_compiler.targets import resolve_target



SHAPE = (1, 3, 16, 16)


PHONE = {"max_threads_per_block": 256, "max_shared_memory_per_block": 16 * 1024}


BUILDS: dict = {}


def gpu_build(models, model_name, target_name):
    """compile.build for the preset (the product's GPU path), cached across tests."""
    key = (model_name, target_name)
    if key not in BUILDS:
        preset = resolve_target(target_name)
        mod = tvm_compile.import_onnx(models[model_name], {"x": SHAPE})
        BUILDS[key] = (mod, preset, tvm_compile.build(mod, preset))
    return BUILDS[key]
