"""The ARM profiler (`dwsep_compiler.device.profile`): the TCG plugin counts what it should, exactly, on
hand-written aarch64 loops; its attribution covers a TVM library's code; a kernel left
unscheduled on purpose comes out on top. No test asserts a count of our kernels (bench/arm.py
measures them)."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest

from dwsep_compiler.device import profile
from dwsep_compiler.compile import build, export_library, import_onnx
from dwsep_compiler.targets import resolve_target


pytestmark = pytest.mark.emulation

# x0 iterations of a 4-instruction body; 1 + 4 x N + 3 instructions in all.
LOOP = """
.global _start
_start:
    mov x0, #{n}
1:  add x1, x1, #1
    add x2, x2, #2
    subs x0, x0, #1
    b.ne 1b
    mov x8, #93
    mov x0, #0
    svc #0
"""

# Two sweeps of 8-byte loads over a 128 KB array (2048 lines of 64 bytes): 2 x 16384 loads;
# LRU L1 (64 KB) misses every line on both sweeps, L2 (512 KB) only on the first.
SWEEP = """
.global _start
_start:
    mov x3, #2
2:  adrp x1, buffer
    add x1, x1, :lo12:buffer
    mov x0, #16384
1:  ldr x2, [x1], #8
    subs x0, x0, #1
    b.ne 1b
    subs x3, x3, #1
    b.ne 2b
    mov x8, #93
    mov x0, #0
    svc #0
.bss
.balign 4096
buffer: .skip 131072
"""


def _run(tmp_path, source: str, memory: bool) -> dict:
    asm, exe, out = tmp_path / "prog.S", tmp_path / "prog", tmp_path / "blocks.txt"
    asm.write_text(source)
    subprocess.run(["aarch64-linux-gnu-gcc", "-nostdlib", "-static", "-o", str(exe), str(asm)],
                   check=True, capture_output=True)
    subprocess.run([profile.plugin_qemu(), *profile.plugin_args(out, memory), str(exe)],
                   check=True, capture_output=True, timeout=120)
    return profile.read_blocks(out)


@pytest.mark.parametrize("n", [1, 10, 1000])
def test_plugin_counts_a_known_loop_exactly(tmp_path, n):
    blocks = _run(tmp_path, LOOP.format(n=n), memory=False)
    assert sum(c.instructions for c in blocks.values()) == 1 + 4 * n + 3


def test_plugin_counts_loads_and_cache_misses_exactly(tmp_path):
    blocks = _run(tmp_path, SWEEP, memory=True)
    total = profile.Counts()
    for counts in blocks.values():
        total.add(counts)
    assert (total.loads, total.load_bytes, total.stores) == (2 * 16384, 2 * 131072, 0)
    assert (total.l1_misses, total.l2_misses) == (2 * 2048, 2048)


def _library(tmp_path, rules=None, monkeypatch=None):
    """A 3x3 conv (16 -> 16, 0.6 M MACs) then a 1x1 conv (16 -> 256, 1 M MACs) at 16x16 for
    arm-a76; ``rules`` replaces the CPU rule list while building."""
    from onnx import helper, numpy_helper

    from helpers import make_model

    rng = np.random.default_rng(0)
    model = make_model(
        [helper.make_node("Conv", ["x", "w1"], ["c"], pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["c"], ["r"]),
         helper.make_node("Conv", ["r", "w2"], ["y"])],
        [helper.make_tensor_value_info("x", 1, [1, 16, 16, 16])],
        [helper.make_tensor_value_info("y", 1, [1, 256, 16, 16])],
        [numpy_helper.from_array(rng.standard_normal((16, 16, 3, 3)).astype(np.float32), "w1"),
         numpy_helper.from_array(rng.standard_normal((256, 16, 1, 1)).astype(np.float32), "w2")])
    target = resolve_target("arm-a76")
    if rules is not None:
        from dwsep_compiler.schedules import cpu

        monkeypatch.setattr(cpu, "rules", rules)
    mod = import_onnx(model, {"x": (1, 16, 16, 16)})
    tmp_path.mkdir(parents=True, exist_ok=True)
    library = export_library(build(mod, target), target, str(tmp_path))
    x = rng.standard_normal((1, 16, 16, 16)).astype(np.float32)
    return library.path, x, profile.kernel_macs(mod, target.tvm_target())


def test_a_librarys_kernels_account_for_all_of_its_code(tmp_path, runtime):
    """Every instruction executed in model.so is attributed to one of its kernels (none left
    unnamed), and per kernel the counts add up to the library's total taken straight from the
    address range of its mapping."""
    path, x, macs = _library(tmp_path)
    result = profile.profile_library(path, [x], "cortex-a76", runtime, memory=False, runs=3,
                                     kernel_macs=macs)
    kernels = dict(result.kernels())
    total = result.total(result.library).instructions
    assert total > 0 and "[no symbol]" not in kernels
    assert sum(c.instructions for c in kernels.values()) == pytest.approx(total, rel=1e-9)
    conv = [name for name in kernels if "conv2d" in name]
    assert len(conv) == 2 and sum(kernels[n].instructions for n in conv) > 0.9 * total
    assert set(macs) >= set(conv)


def test_the_runtime_outside_the_library_is_named_by_its_functions(tmp_path, runtime):
    """The wheel's TVM runtime is stripped: its code is attributed to the exported function
    before it (the dynamic symbol table), so what an inference spends outside ``model.so``
    (the VM, the workspace pool, the thread pool) has names in the profile and its table."""
    from pathlib import Path

    stripped = next(Path(runtime.site).rglob("libtvm_runtime.so"))
    _, ends = profile.symbol_table(str(stripped))
    assert {"TVMBackendAllocWorkspace", "TVMBackendParallelLaunch"} <= {n for _, n in ends}
    path, x, _ = _library(tmp_path)
    result = profile.profile_library(path, [x], "cortex-a76", runtime, memory=False, runs=3)
    tvm_rows = [(symbol, c.instructions) for lib, symbol, c in result.runtime()
                if lib.startswith("libtvm_runtime")]
    spent = sum(n for _, n in tvm_rows)
    assert spent > 0 and sum(n for symbol, n in tvm_rows if symbol) > 0.5 * spent
    assert "TVM runtime, libc, loader" in result.table()
    assert result.as_dict()["runtime"][0]["instructions"] > 0


def test_kernel_macs_count_every_call_of_a_shared_kernel():
    """Structurally equal convs (a ResNet stage's repeated blocks) compile to one PrimFunc called
    several times: its MACs per inference count every call, so the kernels' MACs add up to the
    model's, on a chain of three equal 3x3 convs and on ResNet-50."""
    from onnx import helper, numpy_helper

    from dwsep_compiler import zoo
    from dwsep_compiler.macs import model_macs
    from dwsep_compiler.model import view_model

    from helpers import make_model

    rng = np.random.default_rng(0)
    nodes, weights, x = [], [], "x"
    for i in range(3):
        nodes += [helper.make_node("Conv", [x, f"w{i}"], [f"c{i}"], pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", [f"c{i}"], [f"r{i}"])]
        weights.append(numpy_helper.from_array(
            rng.standard_normal((8, 8, 3, 3)).astype(np.float32), f"w{i}"))
        x = f"r{i}"
    chain = make_model(nodes, [helper.make_tensor_value_info("x", 1, [1, 8, 12, 12])],
                       [helper.make_tensor_value_info("r2", 1, [1, 8, 12, 12])], weights)
    resnet = zoo.light_model("resnet50", input_hw=(32, 32))
    target = resolve_target("arm-a76").tvm_target()
    for model, size, kernels in ((chain, (1, 8, 12, 12), 1), (resnet, (1, 3, 32, 32), None)):
        shapes = {model.graph.input[0].name: size}
        per_kernel = profile.kernel_macs(import_onnx(model, shapes), target)
        assert sum(per_kernel.values()) == model_macs(view_model(model, shapes)), per_kernel
        assert kernels is None or len(per_kernel) == kernels, per_kernel


def test_a_kernel_left_unscheduled_comes_out_on_top(tmp_path, runtime, monkeypatch):
    """Scheduled, the 1x1 conv (more MACs) costs the most; with the 3x3 conv left as legalized
    (scalar loops over the taps, no tiles) the 3x3 conv is the most expensive kernel."""
    from tvm import s_tir

    from dwsep_compiler.schedules import cpu

    real = cpu.rules

    class LeaveAlone:  # claims the 3x3 conv's PrimFunc and schedules nothing
        def apply(self, func, target, tunable):
            shapes = [[int(d) for d in p.shape] for p in func.params]
            if len(shapes) > 1 and shapes[1][2:4] == [3, 3]:  # OIHW, or packed on NEON
                return s_tir.Schedule(func)
            return None

    path, x, _ = _library(tmp_path / "a")
    scheduled = profile.profile_library(path, [x], "cortex-a76", runtime, memory=False, runs=3)
    path, x, _ = _library(tmp_path / "b", lambda: [LeaveAlone(), *real()], monkeypatch)
    unscheduled = profile.profile_library(path, [x], "cortex-a76", runtime, memory=False, runs=3)

    def top(result):
        return result.kernels()[0][0]

    def conv3x3(result):  # the conv with the ReLU epilogue
        return next(n for n, _ in result.kernels() if "conv2d" in n and "relu" in n)

    assert top(scheduled) != conv3x3(scheduled), scheduled.table()
    assert top(unscheduled) == conv3x3(unscheduled), unscheduled.table()


def test_dwsep_run_emulate_profile(tmp_path):
    """The command a user without a board runs: per-kernel table with MACs and the floor; a
    host library or --profile without --emulate is one line, exit 2."""
    import json
    import sys

    import onnx

    from dwsep_compiler import compile_model

    from helpers import small_cnn

    source = tmp_path / "cnn.onnx"
    onnx.save(small_cnn(np.random.default_rng(0)), source)
    out = compile_model(str(source), target="arm-a53", output_dir=str(tmp_path / "arm"),
                        rank=2).output_dir
    proc = subprocess.run([sys.executable, "-m", "dwsep_compiler.run_cli", out, "--emulate",
                           "--profile", "--runs", "2", "--json", str(tmp_path / "p.json")],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    assert "emulated cortex-a53" in proc.stdout and "NEON fp32 floor" in proc.stdout
    data = json.loads((tmp_path / "p.json").read_text())
    assert data["cpu"] == "cortex-a53" and data["kernels"][0]["instructions"] > 0
    assert any(k["macs"] for k in data["kernels"]) and data["library_total"]["loads"] > 0
    assert "TVM runtime, libc, loader" in proc.stdout and data["runtime"]
    host = compile_model(str(source), target="host", output_dir=str(tmp_path / "host"),
                         rank=2).output_dir
    for args in ([host, "--emulate", "--profile"], [out, "--local", "--profile"]):
        proc = subprocess.run([sys.executable, "-m", "dwsep_compiler.run_cli", *args],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
