"""aarch64 artifacts run under qemu-user (dwsep_compiler.device.emulate), checked against onnxruntime.

The `emulation` tests need the cross compiler, qemu-user-static and debootstrap (tests/run.sh
installs them); when one is missing they fail naming it, they never skip. The aarch64 Python root
is built once into $DWSEP_CACHE_DIR (conftest: <repo>/.cache) and reused: about a minute cold.
Every qemu run costs a few seconds of emulated imports, so each test makes as few as it can.
Libraries are compiled here with TVM directly (not through the package's compile API) so that
these tests check the emulator, not the pipeline.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from dwsep_compiler.device import aarch64_root, emulate, qemu
from dwsep_compiler.device.runner import order_inputs, parse_random_spec
from dwsep_compiler.device.aarch64_root import ensure_aarch64_runtime
from dwsep_compiler.device.emulate import cpu_features, required_hwcaps, run_aarch64, run_python
from dwsep_compiler.device.qemu import EmulationError, qemu_cpu_models
from dwsep_compiler.device.runner import HWCAP2_BITS, HWCAP_BITS, decode_hwcaps
from dwsep_compiler.errors import DwsepError

from helpers import make_model, rel_error, run_onnx

CROSS_CXX = "aarch64-linux-gnu-g++"
HWCAP_HEADER = Path("/usr/aarch64-linux-gnu/include/asm/hwcap.h")


# ---------------------------------------------------------------------------------------------
# Models and builds
# ---------------------------------------------------------------------------------------------


def dwsep_block(dtype: np.dtype, seed: int = 0) -> onnx.ModelProto:
    """conv3x3(3->8)+bias -> relu -> depthwise3x3(8)+bias -> pointwise1x1(8->16) -> * scale.

    Two inputs (`x`, a per-channel `scale`) and two outputs (`y` and the relu activation `r`),
    so that argument order and tuple results are exercised too.
    """
    rng = np.random.default_rng(seed)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))

    def init(name: str, shape: tuple[int, ...]) -> str:
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        value = rng.standard_normal(shape) / np.sqrt(fan_in)
        inits.append(numpy_helper.from_array(value.astype(dtype), name))
        return name

    inits: list[onnx.TensorProto] = []
    nodes = [
        helper.make_node("Conv", ["x", init("w1", (8, 3, 3, 3)), init("b1", (8,))], ["c1"],
                         pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r"]),
        helper.make_node("Conv", ["r", init("wd", (8, 1, 3, 3)), init("bd", (8,))], ["cd"],
                         pads=[1, 1, 1, 1], group=8),
        helper.make_node("Conv", ["cd", init("wp", (16, 8, 1, 1))], ["cp"]),
        helper.make_node("Mul", ["cp", "scale"], ["y"]),
    ]
    inputs = [
        helper.make_tensor_value_info("x", elem, [1, 3, 20, 20]),
        helper.make_tensor_value_info("scale", elem, [1, 16, 1, 1]),
    ]
    outputs = [
        helper.make_tensor_value_info("y", elem, [1, 16, 20, 20]),
        helper.make_tensor_value_info("r", elem, [1, 8, 20, 20]),
    ]
    model = make_model(nodes, inputs, outputs, inits, opset=13)
    onnx.checker.check_model(model, full_check=True)
    return model


def block_inputs(dtype: np.dtype, seed: int = 1) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [
        rng.standard_normal((1, 3, 20, 20)).astype(dtype),
        rng.uniform(0.5, 2.0, (1, 16, 1, 1)).astype(dtype),
    ]


def as_float32(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same network with every float16 initializer and I/O widened to float32 (exactly)."""
    wide = onnx.ModelProto()
    wide.CopyFrom(model)
    for tensor in wide.graph.initializer:
        tensor.CopyFrom(numpy_helper.from_array(
            numpy_helper.to_array(tensor).astype(np.float32), tensor.name))
    for value in [*wide.graph.input, *wide.graph.output]:
        value.type.tensor_type.elem_type = TensorProto.FLOAT
    return wide


def cross_compiler() -> str:
    cxx = shutil.which(CROSS_CXX)
    if cxx is None:
        pytest.fail(f"{CROSS_CXX} not found: apt-get install g++-aarch64-linux-gnu", pytrace=False)
    return cxx


def build_aarch64(model: onnx.ModelProto, mattr: list[str], path: Path) -> Path:
    """Compile `model` with plain TVM for aarch64 Linux and link it with the cross compiler."""
    import tvm
    import tvm.support.cc
    from tvm.relax.frontend.onnx import from_onnx

    mod = from_onnx(model, keep_params_in_input=False)
    target = tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": mattr})
    executable = tvm.compile(mod, target=target)
    executable.export_library(str(path), fcompile=tvm.support.cc.cross_compiler(cross_compiler()))
    return path


# ---------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def features(runtime):
    """cpu_features, one qemu probe per CPU model for the whole session."""
    seen: dict[str, set[str]] = {}

    def get(qemu_cpu: str) -> set[str]:
        if qemu_cpu not in seen:
            seen[qemu_cpu] = cpu_features(qemu_cpu, runtime)
        return seen[qemu_cpu]

    return get


@pytest.fixture(scope="module")
def fp32_block(tmp_path_factory):
    model = dwsep_block(np.float32)
    inputs = block_inputs(np.float32)
    expected = run_onnx(model, {"x": inputs[0], "scale": inputs[1]})
    library = build_aarch64(model, ["+neon"], tmp_path_factory.mktemp("fp32") / "block.so")
    return library, inputs, expected


@pytest.fixture(scope="module")
def fp16_block(tmp_path_factory):
    """The block in float16, built with and without +fullfp16, and a float32 reference."""
    model = dwsep_block(np.float16)
    inputs = block_inputs(np.float16)
    expected = run_onnx(as_float32(model), {"x": inputs[0].astype(np.float32),
                                            "scale": inputs[1].astype(np.float32)})
    out = tmp_path_factory.mktemp("fp16")
    return {
        "fullfp16": build_aarch64(model, ["+neon", "+fullfp16"], out / "fullfp16.so"),
        "neon": build_aarch64(model, ["+neon"], out / "neon.so"),
        "inputs": inputs,
        "expected": expected,
    }


# ---------------------------------------------------------------------------------------------
# Emulation tests
# ---------------------------------------------------------------------------------------------


@pytest.mark.emulation
def test_qemu_emulates_the_cpu_models_the_tests_use():
    models = qemu_cpu_models()
    assert {"cortex-a53", "cortex-a76"} <= set(models), models


@pytest.mark.emulation
@pytest.mark.parametrize("qemu_cpu", ["cortex-a53", "cortex-a76"])
def test_fp32_block_matches_onnxruntime(runtime, fp32_block, qemu_cpu):
    library, inputs, expected = fp32_block
    outputs = run_aarch64(library, inputs, qemu_cpu=qemu_cpu, runtime=runtime)
    assert [o.shape for o in outputs] == [e.shape for e in expected]
    assert all(o.dtype == np.float32 for o in outputs)
    for name, got, want in zip(["y", "r"], outputs, expected, strict=True):
        assert rel_error(got, want) <= 1e-4, (name, rel_error(got, want))


@pytest.mark.emulation
def test_fullfp16_library_dies_with_sigill_on_cortex_a53(runtime, fp16_block):
    with pytest.raises(EmulationError) as info:
        run_aarch64(fp16_block["fullfp16"], fp16_block["inputs"], qemu_cpu="cortex-a53",
                    runtime=runtime)
    assert info.value.signal_name == "SIGILL"
    message = str(info.value)
    assert "SIGILL" in message and "cortex-a53" in message and "\n" not in message


@pytest.mark.emulation
def test_fullfp16_library_runs_on_cortex_a76(runtime, fp16_block):
    outputs = run_aarch64(fp16_block["fullfp16"], fp16_block["inputs"], qemu_cpu="cortex-a76",
                          runtime=runtime)
    assert all(o.dtype == np.float16 for o in outputs)
    for got, want in zip(outputs, fp16_block["expected"], strict=True):
        assert rel_error(got, want) <= 1e-2  # float16 arithmetic against a float32 reference


@pytest.mark.emulation
def test_fp16_library_without_fullfp16_runs_on_cortex_a53(runtime, fp16_block):
    """The control: float16 data alone is fine on an ARMv8.0 core (LLVM widens to float32);
    the SIGILL above comes from the +fullfp16 arithmetic."""
    outputs = run_aarch64(fp16_block["neon"], fp16_block["inputs"], qemu_cpu="cortex-a53",
                          runtime=runtime)
    for got, want in zip(outputs, fp16_block["expected"], strict=True):
        assert rel_error(got, want) <= 1e-2


@pytest.mark.emulation
def test_cpu_features_tell_armv80_from_armv82_cores(features):
    a53, a76 = features("cortex-a53"), features("cortex-a76")
    assert {"fp", "asimd"} <= a53
    assert not a53 & {"fphp", "asimdhp", "asimddp", "i8mm", "bf16", "sve"}, a53
    assert {"fp", "asimd", "fphp", "asimdhp", "asimddp"} <= a76
    assert not a76 & {"i8mm", "bf16", "sve"}, a76


def aarch64_presets():
    from dwsep_compiler.targets import PRESETS

    return [preset for preset in PRESETS.values() if preset.cross_compiled]


@pytest.mark.emulation
@pytest.mark.parametrize("preset", aarch64_presets(), ids=lambda preset: preset.name)
def test_preset_features_exist_on_its_qemu_cpu(features, preset):
    """A preset's qemu CPU model must have every feature its target enables; else the emulation
    tests would pass code that dies with SIGILL on the real core (or fail on a good build)."""
    assert preset.qemu_cpu, f"preset {preset.name} names no qemu CPU model"
    models = qemu_cpu_models()
    assert preset.qemu_cpu in models, (
        f"preset {preset.name}: qemu has no CPU model {preset.qemu_cpu!r} "
        f"(available: {', '.join(models)})"
    )
    missing = required_hwcaps(preset.target) - features(preset.qemu_cpu)
    assert not missing, f"preset {preset.name}: {preset.qemu_cpu} lacks {sorted(missing)}"


@pytest.mark.emulation
def test_device_runner_as_a_deploy_script(runtime, fp32_block, tmp_path):
    """What a user runs on the board: random inputs, a benchmark, outputs to an .npz."""
    library, _, _ = fp32_block
    out = tmp_path / "outputs"  # no .npz suffix on purpose: the file keeps the given name
    proc = run_python([str(emulate.RUNNER_SCRIPT), str(library), "--random", "1x3x20x20",
                       "--random", "1x16x1x1:float32", "--bench", "2", "--output", str(out)],
                      runtime=runtime)
    assert "output_0: float32[1, 16, 20, 20]" in proc.stdout
    assert "output_1: float32[1, 8, 20, 20]" in proc.stdout
    assert re.search(r"median latency over 2 runs: [\d.]+ ms", proc.stdout), proc.stdout
    with np.load(out) as data:
        assert sorted(data.files) == ["output_0", "output_1"]


@pytest.mark.emulation
def test_a_library_that_does_not_load_is_one_line_with_the_reason(runtime, tmp_path):
    bogus = tmp_path / "bogus.so"
    bogus.write_bytes(b"\x7fELF not really a shared library")
    with pytest.raises(EmulationError) as info:
        run_aarch64(bogus, [np.zeros((1,), np.float32)], runtime=runtime)
    message = str(info.value)
    assert "bogus.so" in message and "exit 1" in message and "\n" not in message
    assert info.value.signal_name is None and info.value.returncode == 1


@pytest.mark.emulation
def test_unknown_qemu_cpu_is_a_one_line_error(runtime, fp32_block):
    library, inputs, _ = fp32_block
    with pytest.raises(DwsepError, match=r"no CPU model 'cortex-a999' \(available: .*cortex-a53"):
        run_aarch64(library, inputs, qemu_cpu="cortex-a999", runtime=runtime)


@pytest.mark.emulation
def test_prepare_command_reports_where_the_runtime_is(runtime):
    proc = subprocess.run([sys.executable, "-m", "dwsep_compiler.device.emulate", "--prepare"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert f"aarch64 runtime ready at {runtime.root.parent}" in proc.stdout
    assert re.search(r"\(already built, in [\d.]+ s\)", proc.stdout), proc.stdout


# ---------------------------------------------------------------------------------------------
# Host-only tests (no qemu)
# ---------------------------------------------------------------------------------------------


def test_hwcap_names_match_the_kernel_header():
    """Bit numbers as in linux arch/arm64/include/uapi/asm/hwcap.h (the cross toolchain's copy);
    names as /proc/cpuinfo prints them (macro suffix, lower case, no '_')."""
    if not HWCAP_HEADER.is_file():
        pytest.fail(f"{HWCAP_HEADER} not found: apt-get install libc6-dev-arm64-cross",
                    pytrace=False)
    defines = re.findall(r"#define\s+HWCAP(2?)_(\w+)\s+\(1U?L?\s*<<\s*(\d+)\)",
                         HWCAP_HEADER.read_text())
    assert len(defines) > 50
    for which, name, bit in defines:
        table = HWCAP2_BITS if which else HWCAP_BITS
        assert table[int(bit)] == name.lower().replace("_", ""), (which, name, bit)


def test_decode_hwcaps():
    assert decode_hwcaps(0b11, 0) == {"fp", "asimd"}
    assert decode_hwcaps(1 << 20 | 1 << 9 | 1 << 10, 1 << 13 | 1 << 14) == {
        "asimddp", "fphp", "asimdhp", "i8mm", "bf16"}
    assert decode_hwcaps(1 << 62 | 1 << 63, 0) == set()  # reserved for libc
    assert decode_hwcaps(1 << 61, 0) == {"hwcap_bit61"}


def test_required_hwcaps_from_mattr_and_mcpu():
    def target(**fields):
        return {"kind": "llvm", "mtriple": "aarch64-linux-gnu", **fields}

    assert required_hwcaps(target(mattr=["+neon"])) == {"fp", "asimd"}
    assert {"fphp", "asimdhp", "asimddp"} <= required_hwcaps(
        target(mattr=["+neon", "+fullfp16", "+dotprod"]))
    assert "asimddp" in required_hwcaps(target(mcpu="cortex-a55"))
    assert "asimddp" not in required_hwcaps(target(mcpu="cortex-a76", mattr=["-dotprod"]))
    assert required_hwcaps(target(mcpu="cortex-a53")) == {"fp", "asimd"}
    gpu = {"kind": "opencl", "host": target(mattr=["+neon", "+i8mm"])}
    assert required_hwcaps(gpu) == {"fp", "asimd", "i8mm"}


def test_missing_qemu_is_named(monkeypatch, tmp_path):
    monkeypatch.setattr(qemu, "which", lambda name: None)
    monkeypatch.setattr(aarch64_root, "which", lambda name: None)
    with pytest.raises(DwsepError, match="^qemu-aarch64-static not found: apt-get install "
                                         "qemu-user-static$"):
        qemu.find_qemu()
    with pytest.raises(DwsepError, match="qemu-aarch64-static not found"):
        ensure_aarch64_runtime(tmp_path)


def test_missing_debootstrap_is_named(monkeypatch, tmp_path):
    real_which = qemu.which
    monkeypatch.setattr(aarch64_root, "which",
                        lambda name: None if name == "debootstrap" else real_which(name))
    with pytest.raises(DwsepError, match="^debootstrap not found: apt-get install debootstrap$"):
        ensure_aarch64_runtime(tmp_path)


def test_a_half_built_runtime_is_never_used(monkeypatch, tmp_path):
    """Leftovers of a killed build (a .build-* directory, or a runtime directory without its
    READY marker) look complete otherwise: they must be rebuilt, never used, and a failed build
    must leave nothing behind."""
    final = aarch64_root.runtime_dir(tmp_path)
    killed = final.parent / f".build-{final.name}-killed"
    for directory in (final, killed):
        (directory / "root" / "usr" / "bin").mkdir(parents=True)
        (directory / "root" / "usr" / "bin" / "python3.11").write_bytes(b"")
        (directory / "site" / "tvm").mkdir(parents=True)
    assert aarch64_root.runtime_at(final) is None

    attempts = []

    def failing_build(build, mirror, tools):
        attempts.append(build)
        assert not killed.exists()  # cleared before a new build starts
        (build / "root").mkdir()
        raise DwsepError("debootstrap failed (exit 1): E: simulated")

    monkeypatch.setattr(aarch64_root, "check_build_tools", lambda: None)
    monkeypatch.setattr(aarch64_root, "build_root", failing_build)
    with pytest.raises(DwsepError, match="simulated"):
        ensure_aarch64_runtime(tmp_path)
    assert len(attempts) == 1 and not attempts[0].exists()
    assert not list(final.parent.glob(".build-*"))
    assert aarch64_root.runtime_at(final) is None

    (final / "READY.json").write_text("{}")
    assert aarch64_root.runtime_at(final) == qemu.Aarch64Runtime(
        root=final / "root", site=final / "site", python=final / "root/usr/bin/python3.11")
    assert ensure_aarch64_runtime(tmp_path) == aarch64_root.runtime_at(final)  # no build now
    assert len(attempts) == 1


def test_missing_library_is_a_dwsep_error(tmp_path):
    with pytest.raises(DwsepError, match="^library not found: .*nothing.so$"):
        run_aarch64(tmp_path / "nothing.so", [])


def test_debian_mirror_from_apt_sources(tmp_path, monkeypatch):
    monkeypatch.delenv("DWSEP_DEBIAN_MIRROR", raising=False)
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\nURIs: http://security.example/debian-security\n"
        "Suites: bookworm-security\nComponents: main\n\n"
        "# a comment\nTypes: deb deb-src\nURIs: http://mirror.example/debian/\n"
        "Suites: bookworm bookworm-updates\nComponents: main\n"
    )
    (tmp_path / "sources.list.d" / "old.list.disabled").write_text(
        "deb http://wrong.example/debian bookworm main\n")
    assert aarch64_root.debian_mirror(tmp_path) == "http://mirror.example/debian"
    (tmp_path / "sources.list").write_text(
        "# deb http://commented.example/debian bookworm main\n"
        "deb [arch=amd64 signed-by=/k.gpg] http://first.example/debian bookworm main\n"
    )
    assert aarch64_root.debian_mirror(tmp_path) == "http://first.example/debian"
    monkeypatch.setenv("DWSEP_DEBIAN_MIRROR", "http://override.example/debian/")
    assert aarch64_root.debian_mirror(tmp_path) == "http://override.example/debian"
    monkeypatch.delenv("DWSEP_DEBIAN_MIRROR")
    assert aarch64_root.debian_mirror(tmp_path / "nowhere") == aarch64_root.DEFAULT_MIRROR


def test_runner_input_order_and_random_specs():
    a, b = np.zeros(1), np.ones(1)

    def same(got, want):
        return len(got) == len(want) and all(g is w for g, w in zip(got, want, strict=True))

    assert same(order_inputs({"arg_1": b, "arg_0": a}, None), [a, b])
    assert same(order_inputs({"scale": b, "x": a}, ["x", "scale"]), [a, b])
    assert same(order_inputs({"p": a, "q": b}, ["x", "scale"]), [a, b])  # file order
    assert parse_random_spec("1x3x224x224") == ((1, 3, 224, 224), "float32")
    assert parse_random_spec("8:int8") == ((8,), "int8")
    with pytest.raises(Exception, match="bad --random spec"):
        parse_random_spec("1,3,224:float32")
