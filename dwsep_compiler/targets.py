"""Targets: named presets for the devices we deploy to, and TVM target dicts for anything else.

A preset fixes the TVM target (kind, triple, CPU, ISA features), the machine the library's host
code runs on, the qemu CPU model that emulates it here, and (for GPUs) the device limits every
kernel must respect. Each feature listed is one the core really has: a preset that claims more
produces code that dies with SIGILL on the real core, and the emulation tests catch that.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field

import tvm

from dwsep_compiler.errors import DwsepError

AARCH64_TRIPLE = "aarch64-linux-gnu"
AARCH64_CROSS_COMPILER = "aarch64-linux-gnu-g++"


@dataclass(frozen=True)
class TargetPreset:
    name: str
    description: str
    target: dict  # a TVM target JSON dict
    host_arch: str  # "host" (this machine) or "aarch64"
    # QEMU_CPU that emulates the core (aarch64 only). QEMU 7.2 has no A55/A78 model: those run on
    # cortex-a76, which has exactly their features (fp16 arithmetic, dot product).
    qemu_cpu: str | None = None
    gpu_limits: dict = field(default_factory=dict)  # max_threads_per_block, max_shared_memory...

    @property
    def is_gpu(self) -> bool:
        return self.target.get("kind") == "opencl"

    @property
    def cross_compiled(self) -> bool:
        return self.host_arch == "aarch64"

    def tvm_target(self) -> tvm.target.Target:
        return tvm.target.Target(self.target)


# What LLVM may assume of our float arithmetic on CPUs: the sign of a zero does not matter
# (``fast-math-nsz``). A register tile's accumulators start at +0 and take FMAs; with the sign
# of zero free, LLVM turns a fully unrolled reduction's first FMA into a multiply and drops the
# zeroing (a 3x3 depthwise tile of 7 rows: 7 `movi` fewer per 63 FMAs; Fashion's 96-channel
# depthwise at 28x28, emulated Cortex-A76, 347K -> 329K instructions). Results differ only in
# the sign of exact zeros, which no consumer of a CNN's outputs (or onnxruntime's comparison)
# distinguishes; no flag that changes a non-zero value (reassociation, reciprocals, NaN/Inf
# assumptions) is set.
FLOAT_FLAGS = {"fast-math-nsz": True}


def _aarch64(mcpu: str | None, features: list[str]) -> dict:
    target = {"kind": "llvm", "mtriple": AARCH64_TRIPLE, "mattr": ["+neon", *features],
              **FLOAT_FLAGS}
    if mcpu:
        target["mcpu"] = mcpu
    return target


def _opencl(device: str, max_threads: int, local_memory: int) -> dict:
    return {"kind": "opencl", "device": device, "max_num_threads": max_threads,
            "max_threads_per_block": max_threads, "max_shared_memory_per_block": local_memory,
            "thread_warp_size": 1, "host": _aarch64(None, [])}


def _host_target() -> dict:
    cpu = tvm.target.codegen.llvm_get_system_cpu()
    target = {"kind": "llvm", **FLOAT_FLAGS}
    if cpu and cpu != "generic":
        target["mcpu"] = cpu
    return target


# ARMv8.0 cores (A53, A72): NEON only. ARMv8.2 cores (A55, A76, A78): FP16 arithmetic and dot
# product too.
_V82 = ["+fullfp16", "+dotprod"]

PRESETS: dict[str, TargetPreset] = {p.name: p for p in [
    TargetPreset("host", "this machine's CPU (runs here)", {}, "host"),
    TargetPreset("arm", "generic aarch64 Linux/Android CPU, NEON", _aarch64(None, []), "aarch64",
                 qemu_cpu="cortex-a53"),
    TargetPreset("arm-a53", "Cortex-A53 (ARMv8.0-A, NEON)", _aarch64("cortex-a53", []),
                 "aarch64", qemu_cpu="cortex-a53"),
    TargetPreset("arm-a55", "Cortex-A55 (ARMv8.2-A, NEON, FP16, dot product)",
                 _aarch64("cortex-a55", _V82), "aarch64", qemu_cpu="cortex-a76"),
    TargetPreset("arm-a72", "Cortex-A72 (ARMv8.0-A, NEON)", _aarch64("cortex-a72", []),
                 "aarch64", qemu_cpu="cortex-a72"),
    TargetPreset("arm-a76", "Cortex-A76 (ARMv8.2-A, NEON, FP16, dot product)",
                 _aarch64("cortex-a76", _V82), "aarch64", qemu_cpu="cortex-a76"),
    TargetPreset("arm-a78", "Cortex-A78 (ARMv8.2-A, NEON, FP16, dot product)",
                 _aarch64("cortex-a78", _V82), "aarch64", qemu_cpu="cortex-a76"),
    TargetPreset("mali", "Arm Mali GPU, OpenCL (aarch64 host)", _opencl("mali", 256, 16384),
                 "aarch64", qemu_cpu="cortex-a53",
                 gpu_limits={"max_threads_per_block": 256, "max_shared_memory_per_block": 16384}),
    TargetPreset("adreno", "Qualcomm Adreno GPU, OpenCL (aarch64 host)",
                 _opencl("adreno", 256, 16384), "aarch64", qemu_cpu="cortex-a53",
                 gpu_limits={"max_threads_per_block": 256, "max_shared_memory_per_block": 16384}),
]}


def resolve_target(spec: str) -> TargetPreset:
    """A preset name, or a TVM target JSON dict (``'{"kind": "llvm", ...}'``)."""
    spec = spec.strip()
    if spec in PRESETS:
        preset = PRESETS[spec]
        if preset.name == "host":
            preset = TargetPreset("host", preset.description, _host_target(), "host")
        return preset
    if spec.startswith("{"):
        try:
            target = json.loads(spec)
        except json.JSONDecodeError as exc:
            raise DwsepError(f"--target is not valid JSON: {exc.msg} at column {exc.colno}") from None
        try:
            tvm.target.Target(target)
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise DwsepError(f"TVM refuses the target dict: {first}") from None
        triple = target.get("host", target).get("mtriple", "") if isinstance(target, dict) else ""
        arch = "aarch64" if triple.startswith("aarch64") else "host"
        return TargetPreset("custom", "user-supplied TVM target dict", target, arch)
    known = ", ".join(PRESETS)
    raise DwsepError(f"unknown target '{spec}' (known: {known}; or a JSON TVM target dict)")


def list_targets() -> str:
    """One line per preset with its TVM target dict (what ``--list-targets`` prints)."""
    lines = []
    width = max(len(name) for name in PRESETS)
    for name in PRESETS:
        preset = resolve_target(name)
        lines.append(f"{name.ljust(width)}  {preset.description}")
        lines.append(f"{' ' * width}  {json.dumps(preset.target)}")
    return "\n".join(lines)


def find_cross_compiler(preferred: str | None = None) -> str | None:
    """The command that links aarch64 shared libraries here, or None."""
    command = preferred or AARCH64_CROSS_COMPILER
    program = command.split()[0]
    return command if shutil.which(program) else None
