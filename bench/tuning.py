"""Tuning: our schedule spaces vs MetaSchedule's default space, same trial budget, one run.

    python bench/tuning.py                          # fashion + ddddocr backbone, rank 2, host
    python bench/tuning.py --models fashion --trials 128 --minutes 8

For each model (factorized at rank 2, the data-free SVD: weights do not change kernel times):

    ours        `dwsep_compiler.tuning.tune_module`: the untuned schedule of every task measured
                first, then MetaSchedule with `SpaceWalk` over our rules' spaces
    ms_default  MetaSchedule as TVM ships it: post-order-apply over the target's generic schedule
                rules, evolutionary search, XGBoost cost model

Both get the same tasks (the PrimFuncs our compiler legalizes the model into that a tunable rule
claims), the same builder (our persistent pool, same build config), the same local runner and
``--trials`` measurements at most, within ``--minutes`` each. Reported per method: the curve of
the kernel sum (sum over tasks of call count x best latency so far, from the moment every task
has one measurement), its final value, and the time at which it first came within 5% of the final
value. For ours also the whole model through the Relax VM, untuned vs tuned (median of
``--repeats`` calls, ``TVM_NUM_THREADS`` = all cores).

Writes ``bench/results/tuning-<host>-<date>.json`` and ``.md`` and prints the markdown.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import socket
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
os.environ.setdefault("TVM_NUM_THREADS", str(len(os.sched_getaffinity(0))))


def factorized_module(name: str, ocr_width: int):
    import speed  # bench/speed.py: the same model loading

    from dwsep_compiler.compile import import_onnx
    from dwsep_compiler.initialization.ranks import RankPolicy
    from dwsep_compiler.passes.rewrite.onnx_factorize import factorize_onnx

    spec = speed.model_specs([name], ocr_width)[0][0]
    model, shapes, _ = spec.load()
    result = factorize_onnx(model, shapes, RankPolicy(rank=2))
    inputs = {k: np.random.default_rng(0).standard_normal(v).astype(np.float32)
              for k, v in shapes.items()}
    return import_onnx(result.model, shapes), inputs


def within(curve, fraction=0.05):
    """Seconds at which the curve first came within ``fraction`` of its final value."""
    if not curve:
        return None
    final = curve[-1][1]
    return next(t for t, v in curve if v <= final * (1 + fraction))


def vm_ms(mod, preset, inputs, records, repeats: int) -> float:
    import tvm
    from tvm import relax

    from dwsep_compiler.compile import build

    vm = relax.VirtualMachine(build(mod, preset, records=records), tvm.cpu())
    args = [tvm.runtime.tensor(v) for v in inputs.values()]
    vm["main"](*args)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        vm["main"](*args)
        times.append((time.perf_counter() - start) * 1e3)
    return float(np.median(times))


def run_ms_default(tasks, target, trials: int, minutes: float, work: str):
    """MetaSchedule's default space over the same tasks; returns (curve, trials measured)."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir import meta_schedule as ms

    from dwsep_compiler.tuning import measure

    import tvm

    # The generic space's rules size their parallelism from the target's "num-cores".
    target = tvm.target.Target({**dict(target.export()),
                                "num-cores": len(os.sched_getaffinity(0))})
    started = time.monotonic()
    best = {i: None for i in range(len(tasks))}
    curve, done = [], [0]

    @derived_object
    class Curve(ms.measure_callback.PyMeasureCallback):
        def apply(self, scheduler, task_id, candidates, builder_results, runner_results):
            for ran in runner_results:
                done[0] += 1
                if ran.error_msg or not ran.run_secs:
                    continue
                seconds = float(np.mean([float(s) for s in ran.run_secs]))
                if seconds < 1e9 and (best[task_id] is None or seconds < best[task_id]):
                    best[task_id] = seconds
            if all(v is not None for v in best.values()):
                curve.append((time.monotonic() - started, sum(
                    tasks[i].weight * v for i, v in best.items()) * 1e3))
            if time.monotonic() - started > minutes * 60:
                for index in range(len(tasks)):
                    scheduler.terminate_task(index)

    contexts = [ms.TuneContext(mod=t.workload, target=target, space_generator="post-order-apply",
                               search_strategy="evolutionary", task_name=t.name,
                               num_threads=len(os.sched_getaffinity(0))) for t in tasks]
    ms.tune.tune_tasks(
        tasks=contexts, task_weights=[float(t.weight) for t in tasks], work_dir=work,
        max_trials_global=trials, num_trials_per_iter=16,
        builder=measure.builder(None, 2), runner=measure.runner(None),
        database=ms.database.MemoryDatabase(), cost_model="xgb",
        measure_callbacks=ms.measure_callback.MeasureCallback.create("default") + [Curve()])
    return curve, done[0], time.monotonic() - started


def bench_model(name: str, args) -> dict:
    from dwsep_compiler.targets import resolve_target
    from dwsep_compiler.tuning import TuneOptions, TuningRecords, tune_module
    from dwsep_compiler.tuning.tasks import extract_tasks

    preset = resolve_target("host")
    target = preset.tvm_target()
    mod, inputs = factorized_module(name, args.ocr_width)
    tasks = extract_tasks([mod], target)
    work = tempfile.mkdtemp(prefix="dwsep-bench-tune-")
    try:
        untuned = vm_ms(mod, preset, inputs, None, args.repeats)
        started = time.monotonic()
        summary = tune_module([mod], preset, TuneOptions(
            records=os.path.join(work, "records"), trials=args.trials, minutes=args.minutes,
            progress=False))
        ours_s = time.monotonic() - started
        tuned = vm_ms(mod, preset, inputs, TuningRecords(os.path.join(work, "records")),
                      args.repeats)
        ms_curve, ms_trials, ms_s = run_ms_default(tasks, target, args.trials, args.minutes,
                                                   os.path.join(work, "ms"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {
        "model": name, "tasks": len(tasks), "trial_budget": args.trials,
        "ours": {"trials": summary.trials_run, "seconds": round(ours_s, 1),
                 "kernels_ms_untuned": summary.model_ms("untuned_ms"),
                 "kernels_ms": summary.curve[-1][1] if summary.curve else None,
                 "to_5pct_s": within(summary.curve), "curve": summary.curve,
                 "model_ms_untuned": untuned, "model_ms_tuned": tuned},
        "ms_default": {"trials": ms_trials, "seconds": round(ms_s, 1),
                       "kernels_ms": ms_curve[-1][1] if ms_curve else None,
                       "to_5pct_s": within(ms_curve), "curve": ms_curve},
    }


def markdown(results: list[dict], machine: str) -> str:
    def f(value, digits=3):
        return "-" if value is None else f"{value:.{digits}f}"

    lines = [f"Tuning, host target ({machine}), factorized rank 2, same trial budget:", "",
             "| model | tasks | method | trials | minutes | kernel sum ms (untuned -> best) "
             "| to within 5% | whole model ms untuned -> tuned |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        o, m = r["ours"], r["ms_default"]
        lines.append(f"| {r['model']} | {r['tasks']} | ours | {o['trials']} | "
                     f"{o['seconds'] / 60:.1f} | {f(o['kernels_ms_untuned'])} -> "
                     f"{f(o['kernels_ms'])} | {f(o['to_5pct_s'], 0)} s | "
                     f"{f(o['model_ms_untuned'])} -> {f(o['model_ms_tuned'])} |")
        lines.append(f"| {r['model']} | {r['tasks']} | MetaSchedule default | {m['trials']} | "
                     f"{m['seconds'] / 60:.1f} | {f(m['kernels_ms'])} | "
                     f"{f(m['to_5pct_s'], 0)} s | - |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="fashion,ddddocr")
    parser.add_argument("--trials", type=int, default=256)
    parser.add_argument("--minutes", type=float, default=10.0, help="per method and model")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--ocr-width", type=int, default=160)
    args = parser.parse_args()
    results = [bench_model(name, args) for name in args.models.split(",") if name]
    machine = f"{socket.gethostname()}, {len(os.sched_getaffinity(0))} cores"
    text = markdown(results, machine)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M")
    out = os.path.join(HERE, "results", f"tuning-{socket.gethostname()}-{stamp}")
    with open(out + ".json", "w") as handle:
        json.dump({"machine": machine, "args": vars(args), "results": results}, handle, indent=1)
    with open(out + ".md", "w") as handle:
        handle.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
