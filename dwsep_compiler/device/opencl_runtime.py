"""TVM's OpenCL runtime, which no apache-tvm wheel ships, built here from `opencl_runtime.cc`.

The library adds the OpenCL device API and the loader of the OpenCL module embedded in a
``model.so`` to TVM's core runtime (the way the wheel's ``libtvm_runtime_cuda.so`` adds CUDA):
with it loaded, a library built for ``mali`` / ``adreno`` / an OpenCL target dict runs in the
Relax VM on ``tvm.opencl(0)``: PoCL here, a phone's driver there.

It is compiled with the machine's g++ against the wheel's headers and ``libtvm_runtime.so`` on
first use and cached under ``DWSEP_CACHE_DIR`` (``opencl-runtime/<arch>/``), keyed by its source
and the TVM versions; the aarch64 build is cross-compiled against the aarch64 wheel and the arm64
OpenCL ICD loader of the emulation root (`aarch64_root`), to be copied to a phone or board.

Host packages (Debian): ``g++ ocl-icd-opencl-dev`` (+ an ICD, e.g. ``pocl-opencl-icd``, to have
a device); for aarch64 also ``g++-aarch64-linux-gnu``.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import os
import platform
import subprocess
from pathlib import Path

from dwsep_compiler.errors import DwsepError, first_line

RUNTIME_SOURCE = Path(__file__).with_name("opencl_runtime.cc")
LIBRARY_NAME = "libdwsep_opencl.so"

_LOADED: dict[str, Path] = {}


class OpenCLRuntimeError(DwsepError):
    """The OpenCL runtime cannot be built or loaded, or there is no OpenCL device."""


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise OpenCLRuntimeError(f"{name} is not installed")
    return Path(list(spec.submodule_search_locations)[0])


def _versions() -> str:
    from importlib import metadata

    return "-".join(f"{dist}{metadata.version(dist)}"
                    for dist in ("apache-tvm", "apache-tvm-ffi"))


def library_path(arch: str = "host", cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the cached build for ``arch`` ("host" or "aarch64") lives (it may not exist yet)."""
    from dwsep_compiler.device import aarch64_root

    machine = platform.machine() if arch == "host" else arch
    key = hashlib.sha256(RUNTIME_SOURCE.read_bytes() + _versions().encode()).hexdigest()[:16]
    base = Path(cache_dir).expanduser() if cache_dir else aarch64_root.default_cache_dir()
    return base / "opencl-runtime" / machine / key / LIBRARY_NAME


def build_runtime(arch: str = "host", cache_dir: str | os.PathLike | None = None) -> Path:
    """The runtime library for ``arch``, compiled on first use (~20 s), then cached."""
    path = library_path(arch, cache_dir)
    if path.is_file():
        return path
    tvm_dir, ffi_dir = _package_dir("tvm"), _package_dir("tvm_ffi")
    includes = [f"-I{tvm_dir / 'include'}", f"-I{ffi_dir / 'include'}"]
    if arch == "host":
        compiler = "g++"
        lib_dirs = [tvm_dir / "lib", ffi_dir / "lib"]
        opencl = ["-lOpenCL"]
        missing_hint = "apt-get install g++ ocl-icd-opencl-dev"
    elif arch == "aarch64":
        from dwsep_compiler.device import aarch64_root

        compiler = "aarch64-linux-gnu-g++"
        runtime = aarch64_root.ensure_aarch64_runtime(cache_dir)
        lib_dirs = [runtime.site / "tvm" / "lib", runtime.site / "tvm_ffi" / "lib"]
        icd = runtime.root / "usr" / "lib" / "aarch64-linux-gnu" / "libOpenCL.so.1"
        if not icd.is_file():
            raise OpenCLRuntimeError(f"the aarch64 root has no OpenCL ICD loader ({icd})")
        opencl = [str(icd)]
        missing_hint = "apt-get install g++-aarch64-linux-gnu"
    else:
        raise OpenCLRuntimeError(f"no OpenCL runtime build for architecture '{arch}'")
    if not os.path.exists("/usr/include/CL/cl.h"):
        raise OpenCLRuntimeError("OpenCL headers not found (/usr/include/CL/cl.h): apt-get "
                                 "install ocl-icd-opencl-dev")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    command = [compiler, "-std=c++17", "-O2", "-shared", "-fPIC", "-fvisibility=hidden",
               *includes, "-o", str(tmp), str(RUNTIME_SOURCE),
               *[f"-L{d}" for d in lib_dirs], "-ltvm_runtime", "-ltvm_ffi", *opencl,
               # found beside the wheel's libraries wherever the package is installed
               *[f"-Wl,-rpath,{d}" for d in lib_dirs]]
    try:
        subprocess.run(command, check=True, capture_output=True, text=True, timeout=300)
    except FileNotFoundError:
        raise OpenCLRuntimeError(f"{compiler} not found (it builds the OpenCL runtime): "
                                 f"{missing_hint}") from None
    except subprocess.CalledProcessError as exc:
        errors = [line for line in exc.stderr.splitlines() if "error" in line]
        raise OpenCLRuntimeError("building the OpenCL runtime failed: "
                                 f"{first_line(errors[0] if errors else exc.stderr)}") from None
    os.replace(tmp, path)
    return path


def load_runtime(cache_dir: str | os.PathLike | None = None) -> Path:
    """Build (if needed) and load the host runtime into this process, once; returns its path.

    After this, ``tvm.runtime.load_module`` reads OpenCL libraries and ``tvm.opencl(0)`` is a
    device the Relax VM runs on."""
    if "host" in _LOADED:
        return _LOADED["host"]
    import tvm  # noqa: F401  (the core runtime must be loaded first: we link against it)

    path = build_runtime("host", cache_dir)
    try:
        ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
    except OSError as exc:
        raise OpenCLRuntimeError(f"cannot load the OpenCL runtime {path}: {exc}") from None
    _LOADED["host"] = path
    return path


def opencl_device(index: int = 0):
    """``tvm.opencl(index)`` with the runtime loaded; a one-line error when there is none."""
    import tvm

    load_runtime()
    device = tvm.opencl(index)
    if not device.exist:
        raise OpenCLRuntimeError(f"no OpenCL device {index} (install an OpenCL driver/ICD, e.g. "
                                 "apt-get install pocl-opencl-icd)")
    return device


def device_summary(device) -> dict:
    """What the runtime reports about an OpenCL device (name, limits, versions)."""
    return {
        "name": device.device_name,
        "max_work_group_size": device.max_threads_per_block,
        "local_memory_bytes": device.max_shared_memory_per_block,
        "max_work_item_sizes": device.max_thread_dimensions,
        "compute_units": device.multi_processor_count,
        "opencl_version": device.compute_version,
        "driver_version": device.driver_version,
    }


def main(argv: list[str] | None = None) -> int:
    """``python -m dwsep_compiler.device.opencl_runtime [--arch aarch64] [--info]``: build the
    runtime (cached) and print its path: what ``rpc_server.py --load-library`` loads on a
    device. ``--info``: also what it reports about the local OpenCL device."""
    import argparse
    import json
    import sys

    parser = argparse.ArgumentParser(prog="python -m dwsep_compiler.device.opencl_runtime",
                                     description=main.__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=("host", "aarch64"), default="host",
                        help="build for this machine or cross-build for aarch64 [host]")
    parser.add_argument("--info", action="store_true",
                        help="load it here and print the local OpenCL device's attributes")
    args = parser.parse_args(argv)
    try:
        print(build_runtime(args.arch))
        if args.info:
            if args.arch != "host":
                raise OpenCLRuntimeError("--info loads the runtime here: --arch host only")
            print(json.dumps(device_summary(opencl_device()), indent=1))
    except DwsepError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
