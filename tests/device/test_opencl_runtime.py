"""Our OpenCL runtime for TVM (`device/opencl_runtime.cc`) on PoCL: libraries built for the
mali/adreno presets and for OpenCL target dicts run in TVM's Relax VM and match onnxruntime,
the device's attributes are clinfo's, a launch beyond the device's work-group limit fails with
one line, and the aarch64 build links and loads under qemu.

The mali/adreno presets' host code is aarch64: here their kernels run with host code for this
machine (`opencl.build_for_this_host`, whose OpenCL source is checked byte-identical to the
shipped library's). An OpenCL target dict with an x86 host runs as shipped (`dwsep-run
--local`). No test times anything."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest
import tvm
from tvm.script import tirx as T  # noqa: N812

from dwsep_compiler import compile_model
from dwsep_compiler.compile import import_onnx, opencl, run_executable
from dwsep_compiler.compile import build as tvm_build
from dwsep_compiler.device import opencl_runtime
from dwsep_compiler.targets import resolve_target
from dwsep_compiler.zoo import light_model

from helpers import rel_error, run_onnx
from rpc_env import dwsep_run

pytestmark = pytest.mark.opencl

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = str(ROOT / "examples" / "fashion_mnist" / "fashion_cnn.onnx")
CALIBRATION = str(ROOT / "examples" / "fashion_mnist" / "calibration.npz")
# An OpenCL target whose host code is this machine's: the whole library runs here.
X86_OPENCL = {"kind": "opencl", "device": "mali", "max_num_threads": 256,
              "max_threads_per_block": 256, "max_shared_memory_per_block": 16384,
              "thread_warp_size": 1, "host": {"kind": "llvm"}}


@pytest.fixture(scope="module")
def device():
    return opencl_runtime.opencl_device()


@pytest.fixture(scope="module")
def factorized(tmp_path_factory):
    """The bundled example distilled at 0.4x conv MACs, and light ResNet-50 (random weights,
    32x32) at rank 2: (path of the factorized model, input name, input)."""
    out = tmp_path_factory.mktemp("factorized")
    example = compile_model(EXAMPLE, output_dir=str(out / "fashion"), calibration=CALIBRATION,
                            macs_ratio=0.4, compile=False)
    resnet_path = out / "resnet50.onnx"
    onnx.save(light_model("resnet50", input_hw=(32, 32), max_fc=64), resnet_path)
    resnet = compile_model(str(resnet_path), output_dir=str(out / "resnet"), rank=2,
                           compile=False)
    assert example.report.totals()["factorized"] > 0 and resnet.report.totals()["factorized"] > 0
    rng = np.random.default_rng(3)
    return {
        "fashion": (example.model_path, "image",
                    rng.uniform(0, 1, (1, 1, 28, 28)).astype(np.float32)),
        "light_resnet50": (resnet.model_path, "gpu_0/data_0",  # not a C identifier
                           rng.standard_normal((1, 3, 32, 32)).astype(np.float32)),
    }


@pytest.mark.parametrize("model", ["fashion", "light_resnet50"])
@pytest.mark.parametrize("target", ["mali", "adreno"])
def test_preset_libraries_run_in_the_relax_vm(tmp_path, device, factorized, model, target):
    path, name, x = factorized[model]
    written = onnx.load(path)
    preset = resolve_target(target)
    executable = tvm_build(import_onnx(written, {name: x.shape}), preset)
    twin = opencl.build_for_this_host(executable)
    library = tmp_path / "model.so"
    twin.export_library(str(library))
    (out, *_) = run_executable(library, [x], device)
    expected = run_onnx(written, {name: x})[0]
    assert out.shape == expected.shape
    assert rel_error(out, expected) < 1e-4, rel_error(out, expected)


def test_an_opencl_dict_target_compiles_verifies_and_runs_locally(tmp_path):
    """dwsep-compile verifies the build in the VM on the local device; dwsep-run --local runs
    the shipped model.so there (the device is the report's default)."""
    out = tmp_path / "out"
    result = compile_model(EXAMPLE, target=json.dumps(X86_OPENCL), output_dir=str(out),
                           rank=2)
    verification = result.report.verification
    assert verification["ran"].startswith("OpenCL device "), verification
    assert "host code for this machine" not in verification["ran"]  # the library as shipped
    assert verification["max_rel_error"] < 1e-4
    assert result.report.to_dict()["device"] == "opencl"
    x = np.random.default_rng(4).uniform(0, 1, (1, 1, 28, 28)).astype(np.float32)
    np.savez(tmp_path / "in.npz", image=x)
    proc = dwsep_run(out, "--local", "--inputs", tmp_path / "in.npz", "--repeat", "2",
                     "--output", tmp_path / "y.npz")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # no "no timer for opencl" warning: the runtime has one
    assert "on this machine, device opencl" in proc.stdout, proc.stdout
    with np.load(tmp_path / "y.npz") as data:
        got = data["logits"]
    assert rel_error(got, run_onnx(onnx.load(result.model_path), {"image": x})[0]) < 1e-4


def test_device_attributes_match_clinfo(device):
    raw = subprocess.run(["clinfo", "--raw"], capture_output=True, text=True, check=True).stdout
    devices: dict[str, dict[str, str]] = {}
    for line in raw.splitlines():
        match = re.match(r"\[(\S+)\]\s+(CL_\w+)\s+(.*)$", line)
        if match:
            devices.setdefault(match.group(1), {})[match.group(2)] = match.group(3).strip()
    mine = opencl_runtime.device_summary(device)
    info = next((d for d in devices.values() if d.get("CL_DEVICE_NAME") == mine["name"]), None)
    assert info is not None, (mine["name"], list(devices))
    assert mine["max_work_group_size"] == int(info["CL_DEVICE_MAX_WORK_GROUP_SIZE"])
    assert mine["local_memory_bytes"] == int(info["CL_DEVICE_LOCAL_MEM_SIZE"])
    assert mine["compute_units"] == int(info["CL_DEVICE_MAX_COMPUTE_UNITS"])
    assert mine["max_work_item_sizes"] == [int(v) for v in
                                           info["CL_DEVICE_MAX_WORK_ITEM_SIZES"].split()]
    assert info["CL_DEVICE_VERSION"].startswith(f"OpenCL {mine['opencl_version']}")
    assert mine["driver_version"] == info["CL_DRIVER_VERSION"]


def _wide_kernel(threads: int) -> tvm.IRModule:
    """One kernel of ``threads`` work-items in a single work-group (B = A + 1)."""

    @T.prim_func
    def add_one(a: T.Buffer((threads,), "float32"), b: T.Buffer((threads,), "float32")):
        T.func_attr({"global_symbol": "add_one"})
        for i in T.thread_binding(threads, thread="threadIdx.x"):
            b[i] = a[i] + T.float32(1)

    return tvm.IRModule({"add_one": add_one})


def test_a_launch_beyond_the_work_group_limit_fails_with_one_line(tmp_path, device):
    limit = device.max_threads_per_block
    target = tvm.target.Target({**X86_OPENCL, "max_num_threads": 2 * limit,
                                "max_threads_per_block": 2 * limit})
    fits, too_wide = limit, 2 * limit
    for threads in (fits, too_wide):
        library = tmp_path / f"k{threads}.so"
        tvm.compile(_wide_kernel(threads), target=target).export_library(str(library))
        kernel = tvm.runtime.load_module(str(library))["add_one"]
        a = tvm.runtime.tensor(np.arange(threads, dtype=np.float32), device)
        b = tvm.runtime.tensor(np.zeros(threads, np.float32), device)
        if threads == fits:
            kernel(a, b)
            np.testing.assert_array_equal(b.numpy(), np.arange(threads) + 1)
            continue
        with pytest.raises(Exception) as caught:
            kernel(a, b)
            device.sync()
        message = str(caught.value).strip()
        assert len(message.splitlines()) == 1, message
        assert (f"launches {too_wide} work-items per group; the OpenCL device allows {limit}"
                in message), message


@pytest.mark.emulation
def test_the_aarch64_build_links_and_loads_under_qemu(tmp_path):
    """Cross-built against the aarch64 wheel and the arm64 ICD loader, loaded by the aarch64
    Python under qemu: it registers the OpenCL device API and loader, and a mali library
    (aarch64 host) loads with its OpenCL module. No OpenCL driver runs under qemu here, so the
    device is reported absent and the VM refuses to start with the runtime's one-line reason."""
    from dwsep_compiler.device import aarch64_root, qemu

    runtime = aarch64_root.ensure_aarch64_runtime()
    library = opencl_runtime.build_runtime("aarch64")
    head = library.read_bytes()[:20]
    assert head[:4] == b"\x7fELF" and int.from_bytes(head[18:20], "little") == 183  # EM_AARCH64
    mali = compile_model(EXAMPLE, target="mali", output_dir=str(tmp_path / "mali"), rank=2)
    assert mali.library.linked, "needs aarch64-linux-gnu-g++"
    script = f"""
import ctypes, tvm, tvm_ffi, tvm.runtime.vm
ctypes.CDLL({str(library)!r}, mode=ctypes.RTLD_GLOBAL)
for name in ("device_api.opencl", "ffi.Module.load_from_bytes.opencl", "runtime.timer.opencl"):
    print(name, tvm_ffi.get_global_func(name, allow_missing=True) is not None)
print("exist", tvm.opencl(0).exist)
lib = tvm.runtime.load_module({mali.library.path!r})
kinds = lambda m: [m.kind] + [k for s in m.imports for k in kinds(s)]
print("kinds", " ".join(kinds(lib)))
try:
    tvm.runtime.vm.VirtualMachine(lib, tvm.opencl(0))
except Exception as exc:
    print("vm", str(exc).strip().splitlines()[-1])
"""
    proc = qemu.run_guest(runtime, qemu.find_qemu(), "cortex-a53", ["-c", script], timeout=600,
                          what="loading the aarch64 OpenCL runtime")
    lines = proc.stdout.splitlines()
    assert "device_api.opencl True" in lines and "runtime.timer.opencl True" in lines, lines
    assert "ffi.Module.load_from_bytes.opencl True" in lines, lines
    assert "exist False" in lines, lines
    assert "kinds relax.VMExecutable library opencl" in lines, lines
    assert "vm no OpenCL device found (is an OpenCL driver/ICD installed?)" in lines, lines
