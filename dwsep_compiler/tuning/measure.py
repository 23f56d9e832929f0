"""Where candidates are built and measured: a local builder with this project's build config,
and a local runner or MetaSchedule's RPC runner behind a TVM tracker (a device farm: every
server registered under the key takes candidates)."""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
import time
from dataclasses import dataclass

import tvm
from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms
from tvm.s_tir.meta_schedule.builder import local_builder
from tvm.support.popen_pool import PopenPoolExecutor, StatusKind

# A candidate is one small PrimFunc: it builds in ~1 s here. 120 s only catches a hung build
# (MetaSchedule's 30 s default killed every build on this 2-core machine: its worker imports
# tensor intrinsics, ~30-60 s, inside the timeout).
BUILD_TIMEOUT_S = 120
# Batches a builder worker serves before it is replaced (MetaSchedule's LocalBuilder replaces
# it every batch against a slow leak; a worker start costs 5-10 s here, since `import tvm`
# imports torch when it is installed, which made tuning 12 small tasks take minutes).
BATCHES_PER_POOL = 25
# Per candidate on the device, including upload; qemu-emulated devices run ~10-50x slower.
RUN_TIMEOUT_S = 60
# Runs per measurement: the mean of ``number`` calls, repeated until at least min_repeat_ms.
EVALUATOR = ms.runner.EvaluatorConfig(number=3, repeat=3, min_repeat_ms=40,
                                      enable_cpu_cache_flush=False)


def build_candidate(mod: tvm.IRModule, target: tvm.target.Target, _params) -> tvm.runtime.Module:
    """Build one candidate as the compiler builds the model (the same PassContext and TIR
    pipeline: the CPU build's, or for OpenCL the default ones `compile.opencl.build` uses)."""
    from dwsep_compiler.compile import cpu as cpu_build

    if target.kind.name == "opencl":
        return tvm.tirx.build(mod, target=target)
    with tvm.transform.PassContext(opt_level=3, config=cpu_build.PASS_CONFIG):
        return tvm.tirx.build(mod, target=target, pipeline=cpu_build.TIR_PIPELINE)


def export_candidate(rt_mod: tvm.runtime.Module, cross_compiler: str | None = None,
                     root: str | None = None) -> str:
    """A shared library of the candidate, linked for the device, in a new directory under
    ``root`` (MetaSchedule removes that directory once the candidate ran)."""
    path = os.path.join(tempfile.mkdtemp(prefix="candidate-", dir=root), "candidate.so")
    if cross_compiler is None:
        rt_mod.export_library(path)
    else:
        from tvm.support import cc

        program, *options = cross_compiler.split()
        rt_mod.export_library(path, fcompile=cc.cross_compiler(program, options=options))
    return path


@dataclass(frozen=True)
class RpcDevice:
    tracker: tuple[str, int]
    key: str

    def describe(self) -> str:
        return f"key '{self.key}' at tracker {self.tracker[0]}:{self.tracker[1]}"


@derived_object
class Builder(ms.builder.PyBuilder):
    """MetaSchedule's LocalBuilder (same worker function, same results), with a worker pool
    that outlives a batch: see BATCHES_PER_POOL. A build past BUILD_TIMEOUT_S is killed and
    reported as that candidate's error; the pool replaces the worker.

    Candidates are written under one directory of this builder (``root``), removed by `close`:
    a build killed between writing its library and reporting it, or a candidate that never
    ran, leaves nothing behind in the system's temporary directory."""

    def __init__(self, cross_compiler: str | None, workers: int) -> None:
        super().__init__()
        self.workers = workers
        self.root = tempfile.mkdtemp(prefix="dwsep-tune-")
        self.f_export = functools.partial(export_candidate, cross_compiler=cross_compiler,
                                          root=self.root)
        self.pool: PopenPoolExecutor | None = None
        self.batches = 0

    def build(self, build_inputs):
        if self.pool is None or self.batches >= BATCHES_PER_POOL:
            self.close()
            self.pool = PopenPoolExecutor(max_workers=self.workers, timeout=BUILD_TIMEOUT_S)
        self.batches += 1
        jobs = [(build_candidate, self.f_export, item.mod, item.target,
                 local_builder._serialize_params(item.params)) for item in build_inputs]
        results = []
        for done in self.pool.map_with_error_catching(lambda job: local_builder._worker_func(*job),
                                                      jobs):
            if done.status == StatusKind.COMPLETE:
                results.append(ms.builder.BuilderResult(done.value, None))
            elif done.status == StatusKind.TIMEOUT:
                results.append(ms.builder.BuilderResult(
                    None, f"build timed out after {BUILD_TIMEOUT_S} s (killed)"))
            else:
                results.append(ms.builder.BuilderResult(None, f"build failed: {done.value}"))
        return results

    def close(self) -> None:
        """Stop the worker pool (a later `build` starts a new one)."""
        if self.pool is not None:
            self.pool.shutdown()
            self.pool = None
            self.batches = 0

    def remove_files(self) -> None:
        """Close, then delete every candidate this builder wrote."""
        self.close()
        shutil.rmtree(self.root, ignore_errors=True)


def builder(cross_compiler: str | None, workers: int) -> Builder:
    return Builder(cross_compiler, workers)


def runner(device: RpcDevice | None, servers: int = 1, opencl: bool = False) -> ms.runner.Runner:
    """Local runner, or an RPC runner with one request in flight per server under the key.
    ``opencl``: the local runner's workers load our OpenCL runtime first (an RPC server must
    have loaded it itself: ``rpc_server.py --load-library libdwsep_opencl.so``)."""
    if device is None:
        from dwsep_compiler.device import opencl_runtime

        return ms.runner.LocalRunner(timeout_sec=RUN_TIMEOUT_S, evaluator_config=EVALUATOR,
                                     initializer=opencl_runtime.load_runtime if opencl else None)
    config = ms.runner.RPCConfig(tracker_host=device.tracker[0], tracker_port=device.tracker[1],
                                 tracker_key=device.key, session_timeout_sec=RUN_TIMEOUT_S)
    return ms.runner.RPCRunner(rpc_config=config, evaluator_config=EVALUATOR,
                               max_workers=max(1, servers))


@derived_object
class _GuardedFuture(ms.runner.PyRunnerFuture):
    def __init__(self, inner, gone) -> None:
        super().__init__()
        self.inner = inner
        self.gone = gone

    def done(self) -> bool:
        return bool(self.inner.done()) or self.gone()

    def result(self):
        while not self.inner.done():
            if self.gone():
                future = getattr(getattr(self.inner, "_inst", None), "future", None)
                if future is not None:
                    future.cancel()  # a queued measurement: never sent
                return ms.runner.RunnerResult(None, "the device went away")
            time.sleep(0.2)
        return self.inner.result()


@derived_object
class GuardedRunner(ms.runner.PyRunner):
    """A runner whose pending measurements fail at once when ``gone()`` says the devices left.

    Without it a dead RPC device costs a session timeout per queued candidate (a batch of 16
    waited 16 minutes): the tracker queues requests for a key with no server instead of
    refusing them."""

    def __init__(self, inner, gone) -> None:
        super().__init__()
        self.inner = inner
        self.gone = gone

    def run(self, runner_inputs):
        return [_GuardedFuture(future, self.gone) for future in self.inner.run(runner_inputs)]


def close(builder: Builder, runner) -> None:
    """Stop the builder's and the runner's worker processes now.

    MetaSchedule's runners keep a pool whose threads the interpreter joins at exit; after a
    device went away those threads wait on tracker requests that never complete (the tracker
    queues requests for a key without servers), so the process would hang at exit. Queued
    measurements are cancelled and the workers killed (private attributes of TVM's
    PopenPoolExecutor: there is no public way to cancel). The builder's candidates are deleted."""
    builder.remove_files()
    inner = getattr(runner, "_inst", runner)
    inner = getattr(inner, "inner", inner)
    pool = getattr(getattr(inner, "_inst", inner), "pool", None)
    if pool is None:
        return
    pool._threadpool.shutdown(wait=False, cancel_futures=True)
    with pool._lock:
        for worker in pool._worker_map.values():
            process = getattr(worker, "_proc", None)
            if process is not None:  # not worker.kill(): it closes a pipe that a pool thread
                process.kill()       # is reading, which deadlocks; a dead child gives it EOF
    pool._shutdown = True  # done: its __del__ would shut the killed workers down again, noisily
