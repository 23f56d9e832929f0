"""`dwsep-run` through a real TVM RPC tracker and real servers, all on 127.0.0.1.

One tracker (`python -m tvm.exec.rpc_tracker`) and three servers per module, started together at
the first test that needs them and killed at the end (process groups):

* `x86`: the stock `python -m tvm.exec.rpc_server` on this machine;
* `aarch64`: `dwsep_compiler/device/rpc_server.py` run by the aarch64 Python under qemu-user
  (`emulate.popen_python`), serving a library cross-compiled for `--target arm`;
* `victim`: another stock server, killed while `dwsep-run` is using it.

The runs go through the command line (`python -m dwsep_compiler.run_cli`, what the `dwsep-run`
script calls) and are checked against onnxruntime on the rewritten model. Each error case must
exit 2 with one line on stderr. Every wait is bounded. Needs what the emulation tests need (the
aarch64 cross compiler, qemu-user-static, debootstrap: tests/run.sh installs them) and
`tornado` for the tracker; when one is missing the tests fail naming it, they never skip.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from dwsep_compiler import compile_model
from dwsep_compiler.errors import DwsepError
from dwsep_compiler.device.remote import executable_shapes
from dwsep_compiler.device.tracker import tracker_summary

from helpers import rel_error, run_onnx
from rpc_env import (HOST, RUN_TIMEOUT_S, START_TIMEOUT_S, RpcEnv, aarch64_server,
                     dwsep_run, free_port, opencl_server, start_background, stock_server)

pytestmark = pytest.mark.rpc

CROSS_CXX = "aarch64-linux-gnu-g++"


# ---------------------------------------------------------------------------------------------
# Background processes
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rpc(tmp_path_factory, runtime):
    """The tracker, then all servers at once (they start in parallel; tests wait for theirs)."""
    try:
        import tornado  # noqa: F401  (the tracker needs it)
    except ImportError:
        pytest.fail("tornado is not installed (the RPC tracker needs it): pip install tornado",
                    pytrace=False)
    env = RpcEnv(tmp_path_factory.mktemp("rpc-logs"))
    try:
        tracker = start_background("tracker", [sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", HOST,
                                     "--port", str(env.port), "--port-end", str(env.port + 1)],
                         env.logs)
        env.processes["tracker"] = tracker
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:  # servers retry the tracker only every 5 s: start them once it listens
            try:
                tracker_summary(env.tracker, timeout=5)
                break
            except DwsepError:
                if not tracker.alive() or time.monotonic() > deadline:
                    pytest.fail(f"the RPC tracker did not start:\n{tracker.tail()}",
                                pytrace=False)
                time.sleep(0.3)
        env.processes["aarch64"] = aarch64_server(env, runtime)
        env.processes["x86"] = stock_server(env, "x86")
        env.processes["victim"] = stock_server(env, "victim")
        env.processes["opencl"] = opencl_server(env)
        yield env
    finally:
        env.stop()


@pytest.fixture(scope="module")
def host_build(cnn) -> Path:
    return Path(compile_model(str(cnn), target="host", output_dir=str(cnn.parent / "host"),
                              rank=2).output_dir)


@pytest.fixture(scope="module")
def opencl_build(cnn) -> Path:
    """An OpenCL target with an x86 host: the library as shipped runs on the opencl server."""
    target = {"kind": "opencl", "device": "mali", "max_num_threads": 256,
              "max_shared_memory_per_block": 16384, "host": {"kind": "llvm"}}
    return Path(compile_model(str(cnn), target=json.dumps(target),
                              output_dir=str(cnn.parent / "opencl"), rank=2).output_dir)


@pytest.fixture(scope="module")
def arm_build(cnn) -> Path:
    if shutil.which(CROSS_CXX) is None:
        pytest.fail(f"{CROSS_CXX} not found: apt-get install g++-aarch64-linux-gnu",
                    pytrace=False)
    out = Path(compile_model(str(cnn), target="arm", output_dir=str(cnn.parent / "arm"),
                             rank=2).output_dir)
    assert (out / "model.so").is_file(), sorted(os.listdir(out))
    return out


@pytest.fixture(scope="module")
def cnn_inputs(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    arrays = {"x": np.random.default_rng(7).standard_normal((1, 3, 16, 16)).astype(np.float32)}
    path = tmp_path_factory.mktemp("inputs") / "inputs.npz"
    np.savez(path, **arrays)
    return path, arrays


def assert_one_line_error(proc: subprocess.CompletedProcess[str] | tuple, *needles: str) -> str:
    returncode, stderr = (proc.returncode, proc.stderr) if hasattr(proc, "returncode") else proc
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert returncode == 2, (returncode, stderr)
    assert len(lines) == 1, stderr
    assert lines[0].startswith("dwsep-run: error: "), stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def check_against_onnxruntime(build: Path, inputs: dict[str, np.ndarray], outputs: Path) -> None:
    expected = run_onnx(str(build / "model.onnx"), inputs)
    with np.load(outputs) as data:
        assert data.files == ["logits"], data.files
        got = data["logits"]
    assert got.shape == expected[0].shape == (1, 10)
    assert rel_error(got, expected[0]) < 1e-4, rel_error(got, expected[0])


# ---------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------


def test_x86_server_matches_onnxruntime(rpc, host_build, cnn_inputs, tmp_path):
    inputs_path, arrays = cnn_inputs
    rpc.wait_for("x86")
    out = tmp_path / "out.npz"
    proc = dwsep_run(host_build, "--rpc-tracker", rpc.tracker, "--rpc-key", "x86",
                     "--inputs", inputs_path, "--repeat", "5", "--output", out)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert f"on {HOST}:" in proc.stdout and "(key x86)" in proc.stdout, proc.stdout
    assert "input  x: float32[1, 3, 16, 16] from --inputs" in proc.stdout, proc.stdout
    assert "output logits: float32[1, 10]  min " in proc.stdout, proc.stdout
    assert "median latency: " in proc.stdout and " over 5 runs" in proc.stdout, proc.stdout
    check_against_onnxruntime(host_build, arrays, out)


def test_aarch64_server_under_qemu_matches_onnxruntime(rpc, arm_build, cnn_inputs, tmp_path):
    inputs_path, arrays = cnn_inputs
    server = rpc.wait_for("aarch64")
    out = tmp_path / "out.npz"
    proc = dwsep_run(arm_build, "--rpc-tracker", rpc.tracker, "--rpc-key", "aarch64",
                     "--inputs", inputs_path, "--repeat", "3", "--output", out)
    assert proc.returncode == 0, f"{proc.stderr}\nserver log:\n{server.tail()}"
    assert "(key aarch64)" in proc.stdout and " over 3 runs" in proc.stdout, proc.stdout
    check_against_onnxruntime(arm_build, arrays, out)
    log = server.log.read_text(errors="replace")
    assert "libtvm_runtime_extra.so" in log, log  # loaded before serving


@pytest.mark.opencl
def test_opencl_server_runs_an_opencl_library(rpc, opencl_build, cnn_inputs, tmp_path):
    """Our server with our OpenCL runtime loaded (--load-library): the VM runs on its OpenCL
    device (the report's default device), through the tracker."""
    inputs_path, arrays = cnn_inputs
    server = rpc.wait_for("opencl")
    out = tmp_path / "out.npz"
    proc = dwsep_run(opencl_build, "--rpc-tracker", rpc.tracker, "--rpc-key", "opencl",
                     "--inputs", inputs_path, "--repeat", "3", "--output", out)
    assert proc.returncode == 0, f"{proc.stderr}\nserver log:\n{server.tail()}"
    assert "(key opencl), device opencl" in proc.stdout, proc.stdout
    check_against_onnxruntime(opencl_build, arrays, out)
    assert "libdwsep_opencl.so" in server.log.read_text(errors="replace")


def test_random_inputs_take_the_library_shapes(rpc, host_build, tmp_path):
    """No --inputs: random inputs of the compiled shapes; the saved outputs match onnxruntime
    on the same seed's inputs."""
    rpc.wait_for("x86")
    out = tmp_path / "out.npz"
    proc = dwsep_run(host_build, "--rpc-tracker", rpc.tracker, "--rpc-key", "x86",
                     "--repeat", "0", "--seed", "3", "--output", out)
    assert proc.returncode == 0, proc.stderr
    assert "random (standard normal)" in proc.stdout and "median" not in proc.stdout
    x = np.random.default_rng(3).standard_normal((1, 3, 16, 16)).astype(np.float32)
    check_against_onnxruntime(host_build, {"x": x}, out)


def test_local_run_matches_onnxruntime(host_build, cnn_inputs, tmp_path):
    inputs_path, arrays = cnn_inputs
    out = tmp_path / "out.npz"
    proc = dwsep_run(host_build / "model.so", "--local", "--inputs", inputs_path,
                     "--repeat", "2", "--output", out)
    assert proc.returncode == 0, proc.stderr
    assert "on this machine, device cpu" in proc.stdout, proc.stdout
    check_against_onnxruntime(host_build, arrays, out)


# ---------------------------------------------------------------------------------------------
# Errors: exit 2, one line, bounded
# ---------------------------------------------------------------------------------------------


def test_unreachable_tracker(host_build):
    started = time.monotonic()
    proc = dwsep_run(host_build, "--rpc-tracker", f"{HOST}:{free_port()}", "--rpc-key", "x86",
                     timeout=60)
    assert_one_line_error(proc, "cannot reach the RPC tracker", "refused")
    assert time.monotonic() - started < 30


def test_unknown_key_times_out(rpc, host_build):
    rpc.wait_for("x86")
    started = time.monotonic()
    proc = dwsep_run(host_build, "--rpc-tracker", rpc.tracker, "--rpc-key", "nobody",
                     "--session-timeout", "5", timeout=60)
    line = assert_one_line_error(proc, "no RPC server registered under key 'nobody'",
                                 "within 5 s")
    assert "x86" in line, line  # names the keys that are registered
    assert time.monotonic() - started < 40


def test_bad_inputs(rpc, host_build, tmp_path):
    rpc.wait_for("x86")
    remote = ["--rpc-tracker", rpc.tracker, "--rpc-key", "x86"]
    wrong_name = tmp_path / "name.npz"
    np.savez(wrong_name, image=np.zeros((1, 3, 16, 16), np.float32))
    assert_one_line_error(dwsep_run(host_build, *remote, "--inputs", wrong_name),
                          "missing x", "unknown image")
    wrong_dims = tmp_path / "dims.npz"
    np.savez(wrong_dims, x=np.zeros((1, 3, 8, 8), np.float32))
    assert_one_line_error(dwsep_run(host_build, *remote, "--inputs", wrong_dims),
                          "input 'x' has shape [1, 3, 8, 8]")
    # The batch is symbolic in model.onnx: only the library knows it was compiled for 1.
    wrong_batch = tmp_path / "batch.npz"
    np.savez(wrong_batch, x=np.zeros((2, 3, 16, 16), np.float32))
    assert_one_line_error(dwsep_run(host_build, *remote, "--inputs", wrong_batch),
                          "input 'x' has shape [2, 3, 16, 16], expected x float32[1, 3, 16, 16]")
    wrong_dtype = tmp_path / "dtype.npz"
    np.savez(wrong_dtype, x=np.zeros((1, 3, 16, 16), np.float64))
    assert_one_line_error(dwsep_run(host_build, *remote, "--inputs", wrong_dtype),
                          "input 'x' is float64")
    not_npz = tmp_path / "junk.npz"
    not_npz.write_text("not numpy")
    assert_one_line_error(dwsep_run(host_build, *remote, "--inputs", not_npz),
                          "cannot read inputs")


def test_opencl_device_missing_on_the_server(rpc, host_build):
    """The x86 server's TVM has no OpenCL runtime: say so instead of failing somewhere later."""
    rpc.wait_for("x86")
    print(assert_one_line_error(dwsep_run(host_build, "--rpc-tracker", rpc.tracker,
                                          "--rpc-key", "x86", "--device", "opencl"), "opencl"))


def test_local_refuses_an_aarch64_library(arm_build):
    assert_one_line_error(dwsep_run(arm_build, "--local"), "aarch64 library")


def test_server_killed_mid_run(rpc, host_build):
    """Kill the server (its whole process group: the session child too) once it has loaded the
    library, while dwsep-run times a very long series of runs."""
    victim = rpc.wait_for("victim")
    client = subprocess.Popen(
        [sys.executable, "-m", "dwsep_compiler.run_cli", str(host_build), "--rpc-tracker",
         rpc.tracker, "--rpc-key", "victim", "--repeat", "10000000"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while "load_module" not in victim.log.read_text(errors="replace"):
            assert client.poll() is None, client.communicate()
            assert time.monotonic() < deadline, victim.tail()
            time.sleep(0.1)
        time.sleep(0.5)  # into the timed runs (or still before them: a lost session either way)
        victim.kill()
        _, stderr = client.communicate(timeout=60)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
    line = assert_one_line_error((client.returncode, stderr), "dropped the connection",
                                 "did it die?")
    print(line)


# ---------------------------------------------------------------------------------------------
# Unit: the executable's shape checks
# ---------------------------------------------------------------------------------------------


def test_executable_shapes_parses_match_shape():
    text = ("@main:\n"
            "  call  vm.builtin.check_tensor_info in: %0, i4, c[0], c[1] dst: %void\n"
            "  call  vm.builtin.match_shape in: %0, %void, i4, i0, i1, i0, i3, i0, i16, i0, i16,"
            " c[1] dst: %void\n"
            "  call  vm.builtin.match_shape in: %1, %3, i2, i1, i0, i0, i8, c[2] dst: %void\n"
            "  ret   %1\n\n@other:\n"
            "  call  vm.builtin.match_shape in: %0, %void, i1, i0, i5, c[1] dst: %void\n")
    assert executable_shapes(text) == {0: (1, 3, 16, 16), 1: (None, 8)}
    assert executable_shapes(text, "other") == {0: (5,)}
    assert executable_shapes(text, "missing") == {}
