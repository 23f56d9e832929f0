"""Tuning (`dwsep_compiler.tuning`, `dwsep-compile --tune`): real MetaSchedule runs, real builds,
measured locally and through a real TVM RPC tracker with servers on 127.0.0.1 (two x86 servers
under one key, an aarch64 server under qemu-user, a server killed mid-run).

Nothing here asserts a time: measured latencies only decide which schedule is kept, and every
library built from records is checked against onnxruntime. The models are the small CNN of
`helpers.small_cnn` (16x16; 32x32 with wider convs where a run must end with a factorized layer
whatever latency gating measures), so a tuning run is tens of seconds.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest

from dwsep_compiler import compile_model
from dwsep_compiler.compile import import_onnx
from dwsep_compiler.errors import DwsepError
from dwsep_compiler.model import load_model, resolve_input_shapes
from dwsep_compiler.compile.cpu import schedule_module
from dwsep_compiler.targets import resolve_target
from dwsep_compiler.tuning import TuningRecords
from dwsep_compiler.tuning.tasks import extract_tasks

from helpers import rel_error, run_onnx, small_cnn
from rpc_env import (HOST, RpcEnv, aarch64_server, dwsep_run, free_port, opencl_server,
                     start_background, stock_server)

RECORD_FILE = "database_tuning_record.json"


def cli(*args, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dwsep_compiler.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)


def one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("dwsep-compile:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def record_lines(directory: Path) -> list[str]:
    path = directory / RECORD_FILE
    return [line for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def distinct_points(directory: Path) -> int:
    """Distinct (workload, trace) pairs: a resumed run must not measure a point twice."""
    return len({(json.loads(line)[0], json.dumps(json.loads(line)[1][0]))
                for line in record_lines(directory)})


@pytest.fixture(scope="module")
def wide_cnn(tmp_path_factory) -> Path:
    """`helpers.small_cnn` with 32 and 64 channels at 32x32: its 32 -> 64 conv is big enough
    (4.7 M MACs against 1.2 M factorized) that latency gating keeps it factorized whatever the
    machine's noise; with 8 -> 16 channels at 16x16 both versions take a few microseconds and
    gating kept both originals on some runs (the CLI then exits 2: nothing to rewrite)."""
    path = tmp_path_factory.mktemp("wide") / "wide_cnn.onnx"
    onnx.save(small_cnn(np.random.default_rng(0), channels=(3, 32, 64), hw=(32, 32)), path)
    return path


@pytest.fixture(scope="module")
def tuned(wide_cnn, tmp_path_factory):
    """One local tuning run through the CLI; later tests reuse its records."""
    work = tmp_path_factory.mktemp("tuned")
    proc = cli(wide_cnn, "--target", "host", "--rank", "2", "-o", work / "out", "--tune",
               "--tuning-records", work / "records", "--trials", "40")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return work, proc


def test_local_tuning_writes_records_and_a_tuned_correct_library(tuned, wide_cnn):
    work, proc = tuned
    report = json.loads((work / "out" / "report.json").read_text())
    tuning = report["tuning"]
    assert tuning["trials_run"] >= 10 and tuning["failed"] == 0
    assert len(record_lines(work / "records")) == tuning["trials_run"]
    assert distinct_points(work / "records") == tuning["trials_run"]
    assert "tuning [" in proc.stderr  # the progress line
    assert report["verification"]["max_rel_error"] < 1e-4
    for layer in report["layers"]:
        if layer["status"] == "factorized":
            assert layer["latency_ms"] > 0 and layer["original_latency_ms"] > 0
    # Every tunable kernel of the factorized model has a record: the build applies them all.
    preset = resolve_target("host")
    model = load_model(work / "out" / "model.onnx")
    mod = import_onnx(model, resolve_input_shapes(model, None))
    _, applied = schedule_module(mod, preset.tvm_target(), records=TuningRecords(work / "records"))
    tasks = extract_tasks([mod], preset.tvm_target())
    assert tasks and all(applied[t.name] == "tuned" for t in tasks), applied


def test_records_are_reused_without_tune(tuned, wide_cnn, tmp_path):
    work, _ = tuned
    before = record_lines(work / "records")
    proc = cli(wide_cnn, "--target", "host", "--rank", "2", "-o", tmp_path / "out",
               "--tuning-records", work / "records")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert record_lines(work / "records") == before  # applied, not appended
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["verification"]["max_rel_error"] < 1e-4
    assert "trials_run" not in report["tuning"] and report["tuning"]["records"]


def test_latency_gating_keeps_the_original_conv_that_the_device_runs_faster(cnn, tmp_path):
    """Records say every DW+PW kernel takes 5 ms, conv1's original conv 1 us and conv2's 1 s:
    conv1 keeps its original conv (named reason, both latencies in the report), conv2 stays
    factorized, and the library is still exact."""
    from dwsep_compiler.tuning.gating import digest, kernel_calls

    target = resolve_target("host").tvm_target()
    first = compile_model(str(cnn), "host", str(tmp_path / "first"), rank=2, verify=False)
    records = TuningRecords(tmp_path / "records")
    original = onnx.load(cnn)
    shapes = resolve_input_shapes(original, None)
    factorized_mod = import_onnx(onnx.load(first.model_path), shapes)
    original_mod = import_onnx(original, shapes)
    w1 = digest(onnx.numpy_helper.to_array(
        next(t for t in original.graph.initializer if t.name == "w1")))
    conv1_funcs = [func for func, weights in kernel_calls(original_mod, target) if w1 in weights]
    assert len(conv1_funcs) == 1
    for mod, seconds in ((factorized_mod, 5e-3), (original_mod, 1.0)):
        for task in extract_tasks([mod], target):
            fast = any(task.func.same_as(f) or str(task.func) == str(f) for f in conv1_funcs)
            records.commit(task.func, target, task.default.trace, [1e-6 if fast else seconds])
    result = compile_model(str(cnn), "host", str(tmp_path / "gated"), rank=2,
                           tuning_records=str(tmp_path / "records"))
    layers = {layer.name: layer for layer in result.report.layers}
    assert layers["conv1"].reason == "slower_than_original_on_device", layers["conv1"]
    assert layers["conv1"].original_latency_ms == pytest.approx(1e-3)
    assert layers["conv1"].latency_ms == pytest.approx(1e-3)  # what is deployed: the original
    assert layers["conv2"].factorized and layers["conv2"].original_latency_ms == pytest.approx(1e3)
    assert result.report.tuning["gated_layers"] == ["conv1"]
    assert result.report.verification["max_rel_error"] < 1e-5
    names = [node.name for node in onnx.load(result.model_path).graph.node]
    assert "conv1" in names and "conv1_dw" not in names and "conv2_dw" in names


def test_time_budget_stops_the_search(wide_cnn, tmp_path):
    """--tune-minutes: the untuned baseline is always measured, the search stops at the budget."""
    proc = cli(wide_cnn, "--target", "host", "--rank", "2", "-o", tmp_path / "out", "--tune",
               "--tuning-records", tmp_path / "records", "--trials", "400", "--tune-minutes",
               "0.01")
    assert proc.returncode == 0, proc.stderr[-3000:]
    tuning = json.loads((tmp_path / "out" / "report.json").read_text())["tuning"]
    assert tuning["stopped"] == "time budget", tuning
    assert 0 < tuning["trials_run"] < 400
    assert all(task["best_ms"] is not None for task in tuning["tasks"])


def test_torn_record_line_is_dropped_on_open(tuned, tmp_path):
    work, _ = tuned
    copy = tmp_path / "records"
    copy.mkdir()
    for name in os.listdir(work / "records"):
        (copy / name).write_bytes((work / "records" / name).read_bytes())
    good = record_lines(copy)
    with open(copy / RECORD_FILE, "a") as handle:
        handle.write(good[-1][: len(good[-1]) // 2])  # what a kill -9 mid-append leaves
    records = TuningRecords(copy)
    assert records.dropped == 1 and len(records) == len(good)
    assert record_lines(copy) == good


def test_kill_9_mid_tuning_then_resume(wide_cnn, tmp_path):
    records = tmp_path / "records"
    args = [sys.executable, "-m", "dwsep_compiler.cli", wide_cnn, "--target", "host", "--rank",
            "2", "-o", tmp_path / "out", "--tune", "--tuning-records", records, "--trials",
            "200"]
    victim = subprocess.Popen(list(map(str, args)), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while len(record_lines(records)) < 8 and time.monotonic() < deadline:
            assert victim.poll() is None, "the tuner finished before it could be killed"
            time.sleep(0.2)
        assert len(record_lines(records)) >= 8, "no records within 300 s"
    finally:
        os.killpg(victim.pid, signal.SIGKILL)
        victim.wait()
    killed_at = len(record_lines(records))
    proc = cli(*args[3:])
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["tuning"]["trials_before"] >= killed_at - 1  # a torn last line is dropped
    assert report["tuning"]["trials_run"] > 0
    assert distinct_points(records) == len(record_lines(records))  # nothing measured twice
    assert report["verification"]["max_rel_error"] < 1e-4


def test_bad_tuning_options_give_one_line(cnn, tmp_path):
    def run(*args):
        return cli(*args, "--rank", "2")  # a MAC-saving rank: the error must be the tuning one

    one_line_error(run(cnn, "--tune", "-o", tmp_path / "a"), "--tuning-records")
    one_line_error(run(cnn, "--rpc-tracker", "127.0.0.1:1", "-o", tmp_path / "b"), "--tune")
    (tmp_path / "file").write_text("x")
    one_line_error(run(cnn, "--tuning-records", tmp_path / "file", "-o", tmp_path / "c"),
                   "not a directory")
    one_line_error(run(cnn, "--tuning-records", tmp_path / "missing", "-o", tmp_path / "d"),
                   "no such directory")
    one_line_error(run(cnn, "--target", "arm", "--tune", "--tuning-records", tmp_path / "e",
                       "-o", tmp_path / "e_out"), "--rpc-tracker")
    # a phone's GPU is measured on the phone (its host code is aarch64)
    one_line_error(run(cnn, "--target", "mali", "--tune", "--tuning-records", tmp_path / "f",
                       "-o", tmp_path / "f_out"), "'mali'", "--rpc-tracker")
    port = free_port()
    one_line_error(run(cnn, "--tune", "--tuning-records", tmp_path / "g", "--rpc-tracker",
                       f"{HOST}:{port}", "--rpc-key", "x", "-o", tmp_path / "g_out"),
                   f"{HOST}:{port}")
    for out in "abcdefg":
        assert not (tmp_path / out).exists() and not (tmp_path / f"{out}_out").exists()


# ---------------------------------------------------------------------------------------------
# Through an RPC tracker
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def farm(tmp_path_factory, runtime):  # noqa: F811
    """A tracker; two x86 servers under key "farm"; one under "victim"; aarch64 under qemu;
    ours with our OpenCL runtime under "opencl" (PoCL)."""
    env = RpcEnv(tmp_path_factory.mktemp("tune-rpc-logs"))
    try:
        env.processes["tracker"] = start_background(
            "tracker", [sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", HOST, "--port",
                        str(env.port), "--port-end", str(env.port + 1)], env.logs)
        deadline = time.monotonic() + 150
        while True:
            try:
                from dwsep_compiler.device.tracker import tracker_summary

                tracker_summary(env.tracker, timeout=5)
                break
            except DwsepError:
                assert time.monotonic() < deadline, env.processes["tracker"].tail()
                time.sleep(0.3)
        env.processes["aarch64"] = aarch64_server(env, runtime)
        for name in ("farm-1", "farm-2"):
            server = stock_server(env, "farm")
            server.name = name
            env.processes[name] = server
        env.processes["victim"] = stock_server(env, "victim")
        env.processes["opencl"] = opencl_server(env)
        yield env
    finally:
        env.stop()


def _wait_servers(env: RpcEnv, key: str, count: int, timeout: float = 150) -> None:
    from dwsep_compiler.device.tracker import tracker_summary

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            free = tracker_summary(env.tracker, timeout=5).get("queue_info", {}).get(key, {})
        except DwsepError:
            free = {}
        if free.get("free", 0) >= count:
            return
        time.sleep(0.5)
    pytest.fail(f"{count} server(s) under '{key}' did not register in {timeout:g} s")


@pytest.mark.rpc
def test_two_servers_under_one_key_share_the_tuning(farm, wide_cnn, tmp_path):
    _wait_servers(farm, "farm", 2)
    proc = cli(wide_cnn, "--target", "host", "--rank", "2", "-o", tmp_path / "out", "--tune",
               "--tuning-records", tmp_path / "records", "--trials", "24", "--rpc-tracker",
               farm.tracker, "--rpc-key", "farm")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["tuning"]["trials_run"] >= 10 and report["tuning"]["failed"] == 0
    assert "farm" in report["tuning"]["device"]
    assert report["verification"]["max_rel_error"] < 1e-4
    for name in ("farm-1", "farm-2"):  # both servers measured candidates
        log = farm.processes[name].log.read_text(errors="replace")
        assert log.count("load_module") >= 1, f"{name} served nothing:\n{log[-2000:]}"


@pytest.mark.rpc
@pytest.mark.emulation
def test_aarch64_server_under_qemu_tunes_arm(farm, cnn, tmp_path):
    _wait_servers(farm, "aarch64", 1)
    proc = cli(cnn, "--target", "arm", "--rank", "2", "-o", tmp_path / "out", "--tune",
               "--tuning-records", tmp_path / "records", "--trials", "12", "--rpc-tracker",
               farm.tracker, "--rpc-key", "aarch64")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["tuning"]["trials_run"] >= 5 and report["tuning"]["failed"] == 0
    # The tuned library runs on the emulated device and matches onnxruntime.
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 3, 16, 16)).astype(np.float32)
    np.savez(tmp_path / "in.npz", x=x)
    run = dwsep_run(tmp_path / "out", "--rpc-tracker", farm.tracker, "--rpc-key", "aarch64",
                    "--inputs", tmp_path / "in.npz", "--output", tmp_path / "got.npz")
    assert run.returncode == 0, run.stderr[-3000:]
    got = np.load(tmp_path / "got.npz")
    expected = run_onnx(onnx.load(tmp_path / "out" / "model.onnx"), {"x": x})[0]
    assert rel_error(got[list(got.keys())[0]], expected) < 1e-4


# An OpenCL target whose host code is this machine's (the x86 server on PoCL measures it).
X86_OPENCL = {"kind": "opencl", "device": "mali", "max_num_threads": 256,
              "max_shared_memory_per_block": 16384, "host": {"kind": "llvm"}}


@pytest.mark.rpc
@pytest.mark.opencl
def test_opencl_server_tunes_the_gpu_rules_and_a_later_compile_applies_them(farm, cnn,
                                                                            tmp_path):
    """MetaSchedule over the GPU rules' spaces (work-group shape, tiles, local staging),
    measured on the OpenCL device of an RPC server; a compile given the records builds every
    tuned kernel from them, verified against onnxruntime, without measuring again."""
    from dwsep_compiler.compile import opencl
    from dwsep_compiler.schedules import gpu

    _wait_servers(farm, "opencl", 1)
    target = json.dumps(X86_OPENCL)
    records = tmp_path / "records"
    proc = cli(cnn, "--target", target, "--rank", "2", "-o", tmp_path / "out", "--tune",
               "--tuning-records", records, "--trials", "12", "--rpc-tracker", farm.tracker,
               "--rpc-key", "opencl")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    tuning = report["tuning"]
    assert tuning["trials_run"] >= 5 and tuning["failed"] == 0, tuning
    assert "'opencl'" in tuning["device"] and "not gated" in tuning["gating"]
    rules = {type(rule).__name__ for rule in gpu.rules()}
    assert tuning["tasks"] and all(task["rule"] in rules for task in tuning["tasks"]), tuning
    assert any(task["trials"] > 1 for task in tuning["tasks"]), tuning  # a space was searched
    assert report["verification"]["max_rel_error"] < 1e-4
    assert farm.processes["opencl"].log.read_text(errors="replace").count("load_module") >= 5

    before = record_lines(records)
    again = cli(cnn, "--target", target, "--rank", "2", "-o", tmp_path / "again",
                "--tuning-records", records)
    assert again.returncode == 0, again.stderr[-3000:]
    assert record_lines(records) == before  # applied, not measured again
    assert json.loads((tmp_path / "again" / "report.json").read_text())[
        "verification"]["max_rel_error"] < 1e-4
    model = load_model(tmp_path / "out" / "model.onnx")
    mod = import_onnx(model, resolve_input_shapes(model, None))
    full = opencl.full_target(X86_OPENCL)
    program = opencl.lower(mod, full, records=TuningRecords(records))
    tasks = extract_tasks([mod], full)
    assert tasks and all(program.schedules[t.name] == "tuned" for t in tasks), program.schedules


@pytest.mark.rpc
def test_server_killed_mid_tuning_keeps_records(farm, cnn, tmp_path):
    _wait_servers(farm, "victim", 1)
    records = tmp_path / "records"
    args = [cnn, "--target", "host", "--rank", "2", "-o", tmp_path / "out", "--tune",
            "--tuning-records", records, "--trials", "200", "--rpc-tracker", farm.tracker,
            "--rpc-key", "victim"]
    tuner = subprocess.Popen([sys.executable, "-m", "dwsep_compiler.cli", *map(str, args)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while len(record_lines(records)) < 4 and time.monotonic() < deadline:
        assert tuner.poll() is None, tuner.communicate()[1][-3000:]
        time.sleep(0.2)
    farm.processes["victim"].kill()
    out, err = tuner.communicate(timeout=600)
    kept = len(record_lines(records))
    proc = subprocess.CompletedProcess(tuner.args, tuner.returncode, out, err)
    line = one_line_error(proc, "victim", "went away", "rerun to resume")
    assert kept >= 4 and "record(s) kept" in line
    assert not (tmp_path / "out").exists()
    assert TuningRecords(records).dropped == 0


def test_candidates_that_never_ran_are_deleted_with_the_builder(cnn):
    """Every candidate library is written under its builder's directory, which closing the
    tuning session deletes: a build killed after writing its library, or a candidate that never
    ran (time budget, device lost), used to stay behind in /tmp as a dwsep-tune-* directory."""
    from tvm.s_tir import meta_schedule as ms

    from dwsep_compiler.tuning import measure

    target = resolve_target("host").tvm_target()
    model = load_model(cnn)
    task = extract_tasks([import_onnx(model, resolve_input_shapes(model, None))], target)[0]
    builder, runner = measure.builder(None, 1), measure.runner(None)
    try:
        built = builder.build([ms.builder.BuilderInput(task.default.mod, target)])
        assert built[0].error_msg is None, built[0].error_msg
        artifact = Path(built[0].artifact_path)
        assert artifact.is_file() and Path(builder.root) in artifact.parents
    finally:
        measure.close(builder, runner)
    assert not artifact.exists() and not Path(builder.root).exists()


@pytest.mark.rpc
def test_no_server_under_the_key_is_refused_before_any_work(farm, cnn, tmp_path):
    """A live tracker with nothing under the key: one line naming the keys it has, before the
    rewrite, calibration or any build (nothing else on stderr, nothing written)."""
    _wait_servers(farm, "farm", 1)
    calibration = tmp_path / "cal.npz"
    np.savez(calibration, x=np.random.default_rng(0).uniform(0, 1, (4, 3, 16, 16))
             .astype(np.float32))
    proc = cli(cnn, "--target", "host", "--rank", "2", "-o", tmp_path / "out", "--tune",
               "--tuning-records", tmp_path / "records", "--calibration", calibration,
               "--rpc-tracker", farm.tracker, "--rpc-key", "nobody")
    line = one_line_error(proc, "no RPC server registered", "farm")
    assert proc.stderr.strip() == line, proc.stderr  # no progress line: no work started
    assert not (tmp_path / "out").exists() and not (tmp_path / "records").exists()


def test_tasks_are_deduplicated_by_structure_across_layers_and_models():
    """Two identical convs in one model and the same model given twice: one task per distinct
    PrimFunc structure, naming every module it occurs in; a conv of another shape is its own
    task."""
    from onnx import helper, numpy_helper

    from helpers import make_model

    rng = np.random.default_rng(3)

    def weight(name, shape):
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)

    conv = dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    model = make_model(
        [helper.make_node("Conv", ["x", "w1"], ["c1"], **conv),
         helper.make_node("Relu", ["c1"], ["r1"]),
         helper.make_node("Conv", ["r1", "w2"], ["c2"], **conv),
         helper.make_node("Relu", ["c2"], ["r2"]),
         helper.make_node("Conv", ["r2", "w3"], ["y"], **conv)],
        [helper.make_tensor_value_info("x", 1, [1, 16, 12, 12])],
        [helper.make_tensor_value_info("y", 1, [1, 24, 12, 12])],
        [weight("w1", (16, 16, 3, 3)), weight("w2", (16, 16, 3, 3)), weight("w3", (24, 16, 3, 3))])
    mod = import_onnx(model, {"x": (1, 16, 12, 12)})
    # Six convs (three per model): the 16 -> 16 conv + ReLU is one kernel shape (the two
    # layers share one PrimFunc), the 16 -> 24 conv another; each task names both models.
    tasks = extract_tasks([mod, mod], resolve_target("host").tvm_target(), fuse=False)
    assert len(tasks) == 2, [task.names for task in tasks]
    for task in tasks:
        assert sorted(name.split(":")[0] for name in task.names) == ["0", "1"], task.names
    assert any("relu" in task.name for task in tasks)
