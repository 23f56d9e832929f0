"""Tune a model's tasks: measure every task's untuned schedule, then let MetaSchedule search.

Order of work, so that an interrupted run is never wasted:
1. every task without a record on this target gets its untuned schedule measured and recorded
   (the baseline: the tuned schedule is never slower than it, and latency gating always has a
   number per layer);
2. MetaSchedule's task scheduler over the rules' spaces with `search.SpaceWalk` as its search
   strategy (every point once, nearest the best measured first), with the trial budget left
   after what the records already hold (a rerun resumes instead of starting over).
Each measurement is appended to the records as it arrives.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field

import tvm
from tvm.s_tir import meta_schedule as ms
from tvm.ir.utils import derived_object

from dwsep_compiler.errors import DwsepError
from dwsep_compiler.schedules.gpu.knobs import is_gpu
from dwsep_compiler.tuning import measure
from dwsep_compiler.tuning.records import FAILED, TuningRecords, mean
from dwsep_compiler.tuning.search import SpaceWalk
from dwsep_compiler.tuning.space import space_generator
from dwsep_compiler.tuning.tasks import Task, extract_tasks

TRIALS_PER_BATCH = 16
# A rule's space holds a few dozen points; SpaceWalk stops a task once none is left unmeasured.
MAX_TRIALS_PER_TASK = 256


@dataclass
class TuneOptions:
    records: str                     # the database directory (created, appended, reused)
    trials: int = 400                # measurements in all, across tasks (records count)
    minutes: float | None = None     # wall-clock budget for the search
    rpc_tracker: str | None = None   # HOST:PORT of a TVM RPC tracker fronting the devices
    rpc_key: str | None = None       # the devices' key at the tracker
    cross_compiler: str | None = None
    progress: bool = True            # a progress line on stderr


@dataclass
class TaskResult:
    name: str
    rule: str
    weight: int
    trials: int
    untuned_ms: float | None
    best_ms: float | None


@dataclass
class TuneSummary:
    tasks: list[TaskResult] = field(default_factory=list)
    trials_before: int = 0       # measurements the records already held for these tasks
    trials_run: int = 0          # measurements made by this run
    failed: int = 0              # candidates that failed to build or run
    minutes: float = 0.0
    stopped: str = "done"        # "done" | "trial budget" | "time budget"
    device: str = "local"
    # (seconds since start, sum over tasks of weight x best latency so far in ms), from the
    # first moment every task has a measurement: the tuning curve (bench/tuning.py plots it)
    curve: list[tuple[float, float]] = field(default_factory=list)

    def model_ms(self, which: str) -> float | None:
        """Sum over tasks of weight x latency (``which``: "untuned_ms" | "best_ms")."""
        values = [(t.weight, getattr(t, which)) for t in self.tasks]
        if any(v is None for _, v in values):
            return None
        return sum(w * v for w, v in values)

    def as_dict(self) -> dict:
        return {"device": self.device, "trials_before": self.trials_before,
                "trials_run": self.trials_run, "failed": self.failed,
                "minutes": round(self.minutes, 2), "stopped": self.stopped,
                "tuned_kernels_ms": _round(self.model_ms("best_ms")),
                "untuned_kernels_ms": _round(self.model_ms("untuned_ms")),
                "tasks": [vars(t) | {"untuned_ms": _round(t.untuned_ms),
                                     "best_ms": _round(t.best_ms)} for t in self.tasks]}


def tune_module(mods: list[tvm.IRModule], preset, options: TuneOptions, log=None) -> TuneSummary:
    """Tune the tasks of ``mods`` (Relax modules) for ``preset`` (CPU rules, or for an OpenCL
    target the GPU rules, measured on an OpenCL device); records go to ``options.records``.
    Raises `DwsepError` (records kept) when the devices go away."""
    log = log or (lambda message: None)
    started = time.monotonic()
    _check_options(options)
    target = tuning_target(preset)
    device, servers = _device(options, preset)
    records = TuningRecords(options.records)
    if records.dropped:
        log(f"tuning records: dropped {records.dropped} torn line(s) left by an interrupted run")
    tasks = extract_tasks(mods, target)
    summary = TuneSummary(device=device.describe() if device else "local")
    if not tasks:
        return summary
    cross = preset.cross_compiled and _cross_compiler(options)
    workers = max(1, min(2, os.cpu_count() or 1))
    builder = measure.builder(cross or None, workers)
    runner = measure.runner(device, servers, opencl=preset.is_gpu)
    summary.trials_before = sum(records.trials(t.func, target) for t in tasks)
    log(f"tuning {len(tasks)} task(s) on {summary.device}; records: {options.records} "
        f"({summary.trials_before} measurement(s) of these tasks already there)")

    progress = Progress(tasks, options, target, records, started, device,
                        summary.trials_before)
    try:
        if device is not None:
            runner = measure.GuardedRunner(runner, progress.devices_gone)
        untuned = [t for t in tasks if records.trials(t.func, target) == 0]
        if untuned:
            progress.stage = "untuned baseline"
            _measure_defaults(untuned, target, builder, runner, records, progress)
            if device is not None and progress.failed and progress.devices_gone():
                progress.device_lost()
        progress.raise_if_failed()
        budget = options.trials - summary.trials_before - progress.done
        if budget > 0 and not progress.out_of_time():
            progress.stage = "search"
            _search(tasks, target, builder, runner, records, progress, budget)
        progress.finish()
        progress.raise_if_failed()
    finally:
        measure.close(builder, runner)
    summary.curve = progress.curve
    summary.trials_run = progress.done
    summary.failed = progress.failed
    summary.minutes = (time.monotonic() - started) / 60
    summary.stopped = progress.stopped or ("trial budget" if budget <= 0 else "done")
    for task in tasks:
        summary.tasks.append(TaskResult(
            task.name, type(task.rule).__name__, task.weight, records.trials(task.func, target),
            progress.untuned_ms.get(task.name, _ms(_default_latency(records, task, target))),
            _ms(records.latency(task.func, target))))
    return summary


def check(options: TuneOptions | None, records: str | None, preset) -> None:
    """Fail fast, before any work, on what would stop tuning or applying records later."""
    if options is None and records is None:
        return
    path = options.records if options is not None else records
    if os.path.exists(path) and not os.path.isdir(path):
        raise DwsepError(f"tuning records: {path} is not a directory")
    if options is None:
        if not os.path.isdir(path):
            raise DwsepError(f"tuning records: no such directory: {path}")
        return
    _check_options(options)
    missing = [name for name in ("cloudpickle", "psutil") if importlib.util.find_spec(name) is None]
    if missing:
        raise DwsepError(f"--tune needs {', '.join(missing)} (core dependencies of "
                         "dwsep-compiler): reinstall it, e.g. pip install -e .")
    _device(options, preset)


def tuning_target(preset) -> tvm.target.Target:
    """The target records are keyed by: the preset's, and for OpenCL with its host, as the
    build sees it (`compile.opencl.full_target`)."""
    if preset.is_gpu:
        from dwsep_compiler.compile import opencl

        return opencl.full_target(preset)
    return preset.tvm_target()


def _check_options(options: TuneOptions) -> None:
    if not isinstance(options.trials, int) or options.trials < 1:
        raise DwsepError(f"trials must be an integer >= 1, got {options.trials!r}")
    if options.minutes is not None and not options.minutes > 0:
        raise DwsepError(f"tune minutes must be > 0, got {options.minutes!r}")
    if bool(options.rpc_tracker) != bool(options.rpc_key):
        raise DwsepError("--rpc-tracker and --rpc-key go together")


def _device(options: TuneOptions, preset):
    """The RPC device and how many servers it has, or (None, 0) for this machine."""
    from dwsep_compiler.device import tracker

    if not options.rpc_tracker:
        if preset.cross_compiled:
            raise DwsepError(f"tuning for '{preset.name}' measures on that kind of device: pass "
                             "--rpc-tracker HOST:PORT and --rpc-key KEY")
        if preset.is_gpu:  # measured here: the local OpenCL device must exist
            from dwsep_compiler.device import opencl_runtime

            opencl_runtime.opencl_device()
        return None, 0
    try:
        address = tracker.parse_address(options.rpc_tracker)
        keys = tracker.registered_keys(tracker.tracker_summary(address))
    except tracker.RemoteError as exc:
        raise DwsepError(str(exc)) from None
    device = measure.RpcDevice(address, options.rpc_key)
    if not keys.get(options.rpc_key):
        known = ", ".join(sorted(keys)) or "none"
        raise DwsepError(f"no RPC server registered under {device.describe()} (registered keys: "
                         f"{known})")
    return device, keys[options.rpc_key]


def _cross_compiler(options: TuneOptions) -> str:
    from dwsep_compiler.targets import find_cross_compiler

    command = find_cross_compiler(options.cross_compiler)
    if command is None:
        raise DwsepError("tuning for an aarch64 device needs an aarch64 cross compiler here "
                         "(apt-get install g++-aarch64-linux-gnu, or pass --cross-compiler)")
    return command


def _default_latency(records: TuningRecords, task: Task, target) -> float | None:
    """The recorded latency of the untuned schedule (the record whose trace samples nothing)."""
    for record in records.records(task.func, target):
        if not any(inst.kind.name.startswith("Sample") for inst in record.trace.insts):
            return mean(record.run_secs)
    return None


def _measure_defaults(tasks: list[Task], target, builder, runner, records, progress) -> None:
    built = builder.build([ms.builder.BuilderInput(t.default.mod, target) for t in tasks])
    inputs, pending = [], []
    for task, result in zip(tasks, built):
        if result.error_msg:
            progress.count(task.name, None, f"build: {result.error_msg}")
            continue
        inputs.append(ms.runner.RunnerInput(result.artifact_path,
                                            "opencl" if is_gpu(target) else "cpu",
                                            ms.arg_info.ArgInfo.from_prim_func(task.func)))
        pending.append((task, result.artifact_path))
    for (task, artifact), future in zip(pending, runner.run(inputs)):
        result = future.result()
        shutil.rmtree(os.path.dirname(artifact), ignore_errors=True)
        if result.error_msg:
            progress.count(task.name, None, f"run: {result.error_msg}")
            continue
        records.commit(task.func, target, task.default.trace, result.run_secs)
        seconds = mean(result.run_secs)
        progress.untuned_ms[task.name] = seconds * 1e3
        progress.count(task.name, seconds, None)


def _search(tasks, target, builder, runner, records, progress, budget: int) -> None:
    contexts = [ms.TuneContext(mod=t.workload, target=target,
                               space_generator=space_generator(t.rule, target),
                               search_strategy=SpaceWalk(),
                               task_name=t.name, num_threads=max(1, os.cpu_count() or 1))
                for t in tasks]
    callbacks = ms.measure_callback.MeasureCallback.create("default") + [progress.callback()]
    work_dir = tempfile.mkdtemp(prefix="search-", dir=builder.root)
    try:
        ms.tune.tune_tasks(
            tasks=contexts, task_weights=[float(t.weight) for t in tasks], work_dir=work_dir,
            max_trials_global=budget, max_trials_per_task=MAX_TRIALS_PER_TASK,
            num_trials_per_iter=TRIALS_PER_BATCH, builder=builder, runner=runner,
            database=records.database, measure_callbacks=callbacks, task_scheduler="gradient",
            cost_model="random")  # unused: SpaceWalk orders the points itself
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)


class Progress:
    """Counts measurements, prints a progress line, enforces the time budget and notices when
    the devices are gone (a whole batch failing to run while the tracker lists no server)."""

    def __init__(self, tasks, options: TuneOptions, target, records, started: float, device,
                 trials_before: int):
        self.tasks = tasks
        self.options = options
        self.target = target
        self.records = records
        self.started = started
        self.device = device
        self.done = 0
        self.failed = 0
        self.stage = ""
        self.stopped: str | None = None
        self.error: str | None = None
        self.untuned_ms: dict[str, float] = {}
        self.best_s: dict[str, float] = {t.name: records.latency(t.func, target) or 0.0
                                         for t in tasks}
        self.total = max(1, options.trials - trials_before)
        self.tty = sys.stderr.isatty()
        self._last_print = 0.0
        self._gone_at = (-1e9, False)
        self.curve: list[tuple[float, float]] = []

    def out_of_time(self) -> bool:
        limit = self.options.minutes
        if limit is not None and time.monotonic() - self.started >= limit * 60:
            self.stopped = "time budget"
            return True
        return False

    def count(self, task: str, seconds: float | None, error: str | None) -> None:
        self.done += 1
        if error is not None:
            self.failed += 1
            self.last_error = error
        elif seconds is not None and (not self.best_s.get(task) or seconds < self.best_s[task]):
            self.best_s[task] = seconds
            if all(self.best_s.values()):
                weights = {t.name: t.weight for t in self.tasks}
                self.curve.append((time.monotonic() - self.started, sum(
                    weights[n] * s for n, s in self.best_s.items()) * 1e3))
        self._print()

    def _model_ms(self) -> str:
        weights = {t.name: t.weight for t in self.tasks}
        if not all(self.best_s.values()):
            return "-"
        return f"{sum(weights[n] * s for n, s in self.best_s.items()) * 1e3:.3f} ms"

    def _print(self, final: bool = False) -> None:
        if not self.options.progress:
            return
        now = time.monotonic()
        if not (final or self.tty or now - self._last_print >= 10):
            return
        self._last_print = now
        elapsed = now - self.started
        done = min(self.done, self.total)
        width = 24
        bar = "#" * int(width * done / self.total) + "." * (width - int(width * done / self.total))
        left = (f"~{_clock(elapsed / done * (self.total - done))} left" if done and not final
                else "")
        if self.options.minutes:
            left += f" (budget {_clock(self.options.minutes * 60)})"
        line = (f"tuning [{bar}] {self.done}/{self.total} trials, {len(self.tasks)} tasks, "
                f"{self.stage}, kernels {self._model_ms()}, {_clock(elapsed)} {left}".rstrip())
        end = "\n" if final or not self.tty else ""
        print(("\r" if self.tty else "") + line + ("\x1b[K" if self.tty else ""), end=end,
              file=sys.stderr, flush=True)

    def finish(self) -> None:
        self._print(final=True)

    def raise_if_failed(self) -> None:
        if self.error:
            raise DwsepError(self.error)

    def device_lost(self) -> None:
        self.error = (f"the RPC server(s) under {self.device.describe()} went away mid-tuning; "
                      f"{len(self.records)} record(s) kept in {self.options.records}: rerun to "
                      "resume")

    def devices_gone(self) -> bool:
        """No server left under the key (the tracker asked at most every 2 s)."""
        from dwsep_compiler.device import tracker

        now = time.monotonic()
        if now - self._gone_at[0] < 2.0:
            return self._gone_at[1]
        try:
            keys = tracker.registered_keys(tracker.tracker_summary(self.device.tracker, 5.0))
            gone = not keys.get(self.device.key)
        except tracker.RemoteError:
            gone = True
        self._gone_at = (time.monotonic(), gone)
        return gone

    def callback(self):
        progress = self

        @derived_object
        class _Callback(ms.measure_callback.PyMeasureCallback):
            def apply(self, task_scheduler, task_id, candidates, builder_results,
                      runner_results):
                name = progress.tasks[task_id].name
                batch_failed = 0
                for built, ran in zip(builder_results, runner_results):
                    error = built.error_msg or ran.error_msg
                    seconds = None
                    if not error and ran.run_secs:
                        seconds = mean(ran.run_secs)
                        if seconds >= FAILED:
                            error, seconds = "failed", None
                    batch_failed += error is not None
                    progress.count(name, seconds, error)
                stop = progress.out_of_time()
                if (progress.device is not None and runner_results
                        and batch_failed == len(runner_results) and progress.devices_gone()):
                    progress.device_lost()
                    stop = True
                if stop:
                    for index in range(len(progress.tasks)):
                        task_scheduler.terminate_task(index)

        return _Callback()


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1e3


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60}:{seconds % 60:02d}"
