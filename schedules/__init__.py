"""Schedule rules: for each (operator family, target family), how its PrimFunc runs fast.

Rules have TVM dlight's shape, ``apply(func, target, tunable) -> Schedule | None``: with
``tunable=False`` they pick knobs from the target (vector width, registers, cores); None means
"not mine". `cpu` holds the CPU rules (NEON, AVX2, AVX-512), `gpu` the OpenCL ones; `analysis`
is what rules of both families share (finding a PrimFunc's conv blocks, tile sizes); `apply`
runs a rule list over a module. The pipelines that call them are `dwsep_compiler.compile.cpu`
and `dwsep_compiler.compile.opencl`.
"""
