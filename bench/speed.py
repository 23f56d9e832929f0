"""Speed that is real: onnxruntime, TVM's default build and our schedules, side by side.

    python bench/speed.py                     # full run (about 8-10 min on 2 cores)
    python bench/speed.py --quick             # smoke run: Fashion-MNIST CNN + light_vgg19 rank 1
    python bench/speed.py --models fashion,light_vgg19 --ranks 1,2 --repeats 5 --no-per-op

For every model and rank, in one process per model (``--no-isolate``: all in this one; see
``run_isolated``), five variants of the same network:

    ort_orig     onnxruntime on the original model
    ort_fact     onnxruntime on the factorized model (depthwise + pointwise)
    tvm_default  TVM 0.27's default build of the factorized model (schedule=False: CPU loops
                 left unscheduled; very slow, so by default 1 timed run when a call takes > 1 s)
    ours_fact    our schedules on the factorized model
    ours_orig    our schedules on the original model (rank-independent: built and timed once
                 per model, the same figure on each rank's row)

Timing: wall clock (time.perf_counter) around one inference call, the same for every variant
(``session.run`` for onnxruntime, ``vm["main"](*args)`` for the Relax VM, inputs prepared
beforehand). Warm-up first, then ``--repeats`` rounds; each round calls every variant of the
model once, round-robin, starting at a different variant each round, so that machine noise hits
them alike. Variants faster than ``--min-sample-ms`` are called several times per sample and the
mean of those calls is the sample; one untimed call of the same variant precedes each sample,
so that the previous variant's spinning worker threads do not steal the cores (see
``interleaved``). Medians, spreads and ratios come from these samples.

Threads: onnxruntime ``intra_op_num_threads=2`` (``--ort-threads``); TVM gets every core this
process may use (``TVM_NUM_THREADS`` set to that count unless already set or ``--tvm-threads``).
TVM's own default, with ``TVM_NUM_THREADS`` unset, is half of the logical CPUs on x86 (it assumes
hyper-threading): 1 thread on a 2-vCPU machine.

Per-op (``--per-op``, on by default; `kernels.py`): every PrimFunc of the factorized model as our schedules
leave it (``schedule_module``), built alone and timed with ``time_evaluator`` on random buffers;
MACs from the conv shapes, bytes = inputs + outputs once each; GFLOP/s and GB/s against this
machine's SGEMM peak (numpy float32 2048^3 matmul) and copy bandwidth (numpy copy of 256 MB,
read + write counted), both measured in the same run. Roofline of the factorized model: sum over
kernels (times their call count) of max(flops / peak, bytes / bandwidth).

Writes ``bench/results/speed-<host>-<date>.json`` and ``.md`` and prints the markdown.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import hashlib
import importlib.util
import json
import math
import os
import platform
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx

from kernels import best_limits, finish_per_op, machine_limits, scheduled_kernels, time_kernels
from speed_report import main_table, markdown

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
LIGHT_DIR = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light")
FASHION_MODEL = os.path.join(ROOT, "examples", "fashion_mnist", "fashion_cnn.onnx")

SLOW_CALL_S = 1.0  # tvm_default calls slower than this get 1 timed run (unless told otherwise)
QUICK_MODELS = "fashion,light_vgg19"


# --- models -------------------------------------------------------------------------------------

@dataclass
class ModelSpec:
    name: str
    load: Callable[[], tuple]  # -> (onnx.ModelProto, {input: shape}, note or None)
    default_ranks: tuple
    source: str = ""  # the --models entry it came from


def _light(name: str) -> ModelSpec:
    def load():
        from dwsep_compiler import zoo
        from dwsep_compiler.model import resolve_input_shapes

        # The wheel's weights are all 0.02 (every class 0.001 whatever the input): an error
        # column on them could not show a wrong kernel. Same architecture, random weights.
        model = zoo.light_model(name[len("light_"):], seed=0)
        return model, resolve_input_shapes(model), "random weights (dwsep_compiler.zoo, seed 0)"

    return ModelSpec(name, load, ("1", "2"))


def _onnx_file(path: str, name: str, ranks=("energy", "2"), note=None) -> ModelSpec:
    def load():
        from dwsep_compiler.model import load_model, resolve_input_shapes

        model = load_model(path)
        return model, resolve_input_shapes(model), note

    return ModelSpec(name, load, ranks)


def _ddddocr(width: int) -> ModelSpec:
    def load():
        sys.path.insert(0, HERE)
        import ddddocr_ocr  # bench/ddddocr_ocr.py: finds the model without importing ddddocr

        from dwsep_compiler.model import load_model, resolve_input_shapes, with_fixed_inputs

        full = load_model(ddddocr_ocr.model_path())
        cut = conv_backbone_output(full)
        shapes = resolve_input_shapes(full, {ddddocr_ocr.INPUT: (1, 1, 64, width)})
        # Extractor wants value_info for the cut: a shape-inferred model with the width fixed.
        inferred = onnx.shape_inference.infer_shapes(with_fixed_inputs(full, shapes))
        backbone = onnx.utils.Extractor(inferred).extract_model([ddddocr_ocr.INPUT], [cut])
        return backbone, shapes, f"common.onnx conv backbone (cut at '{cut}', before the LSTM)"

    return ModelSpec("ddddocr", load, ("energy", "2"))


_ELEMENTWISE = {"Add", "Mul", "Sigmoid", "Relu", "Clip", "LeakyRelu", "BatchNormalization",
                "HardSigmoid", "HardSwish", "Tanh"}


def conv_backbone_output(model: onnx.ModelProto) -> str:
    """The output of the last conv block before the first recurrent node: the last Conv's output,
    followed through the elementwise ops (residual add, SiLU) that only it feeds."""
    nodes = list(model.graph.node)
    stop = next((i for i, n in enumerate(nodes) if n.op_type in ("LSTM", "GRU", "RNN")), len(nodes))
    convs = [n for n in nodes[:stop] if n.op_type == "Conv"]
    if not convs:
        raise RuntimeError("no Conv before the recurrent head")
    consumers: dict[str, list] = {}
    for node in nodes:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    tensor = convs[-1].output[0]
    while True:
        readers = consumers.get(tensor, [])
        if len(readers) == 1 and readers[0].op_type in _ELEMENTWISE:
            tensor = readers[0].output[0]
        elif (len(readers) == 2 and {r.op_type for r in readers} == {"Sigmoid", "Mul"}
              and any(r.op_type == "Mul" and any(s.output[0] in r.input for s in readers)
                      for r in readers)):
            tensor = next(r for r in readers if r.op_type == "Mul").output[0]  # SiLU
        else:
            return tensor


def model_specs(names: list[str], ocr_width: int) -> tuple[list[ModelSpec], list[str]]:
    specs, notes = [], []
    for name in names:
        if name == "fashion":
            specs.append(_onnx_file(FASHION_MODEL, "fashion", ("energy", "2"),
                                    "Fashion-MNIST example CNN, batch 1"))
        elif name == "ddddocr":
            if importlib.util.find_spec("ddddocr") is None:
                notes.append("ddddocr skipped: not installed (pip install ddddocr==1.6.1 --no-deps)")
                continue
            specs.append(_ddddocr(ocr_width))
        elif name.endswith(".onnx"):
            specs.append(_onnx_file(name, os.path.splitext(os.path.basename(name))[0]))
        else:
            light = name if name.startswith("light_") else f"light_{name}"
            if not os.path.exists(os.path.join(LIGHT_DIR, f"{light}.onnx")):
                raise SystemExit(f"unknown model '{name}': fashion, ddddocr, light_<name> "
                                 f"(from {LIGHT_DIR}) or a path to an .onnx file")
            specs.append(_light(light))
        specs[-1].source = name
    return specs, notes


def runtime_ready(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy that runtimes treat fairly: weights listed as graph inputs (old IR versions) are
    dropped from the inputs, as the rewrite does for the factorized model, so that onnxruntime can
    constant-fold and prepack them in both; IR version within onnxruntime's range."""
    from dwsep_compiler.model import MAX_IR_VERSION, graph_inputs

    out = onnx.ModelProto()
    out.CopyFrom(model)
    real = {v.name for v in graph_inputs(model)}
    inputs = [v for v in out.graph.input if v.name in real]
    del out.graph.input[:]
    out.graph.input.extend(inputs)
    out.ir_version = min(max(out.ir_version, 4), MAX_IR_VERSION)
    return out


def rank_policy(rank: str):
    from dwsep_compiler.initialization.ranks import RankPolicy

    if rank in ("energy", "e"):
        return RankPolicy()
    if rank.startswith("e"):
        return RankPolicy(energy=float(rank[1:]))
    if rank == "full":  # the exact rewrite never cuts MACs: force it, to measure it
        return RankPolicy(rank="full", force=True)
    return RankPolicy(rank=int(rank))


# --- timing -------------------------------------------------------------------------------------

@dataclass
class Variant:
    key: str
    rank: str | None
    call: Callable[[], object]
    output: Callable[[object], np.ndarray]  # the first model output as numpy
    repeats: int
    reference: str | None = None  # the variant whose output this one must match
    number: int = 1  # calls per sample
    warmup_s: list = field(default_factory=list)
    samples: list = field(default_factory=list)
    first_output: np.ndarray | None = None
    repeats_note: str | None = None
    settle: bool = True  # one untimed call before each sample (see interleaved)


def warm_up(variant: Variant, min_total_s: float = 0.3, max_calls: int = 20) -> None:
    """Call until ``min_total_s`` has been spent (at most ``max_calls``; one call if slow)."""
    while True:
        start = time.perf_counter()
        result = variant.call()
        variant.warmup_s.append(time.perf_counter() - start)
        if variant.first_output is None:
            variant.first_output = variant.output(result)
        if sum(variant.warmup_s) >= min_total_s or len(variant.warmup_s) >= max_calls:
            break


def interleaved(variants: list[Variant], min_sample_s: float, gap_s: float) -> None:
    """Round-robin over warmed-up variants: round i times each variant that still needs samples
    once, starting at variant i mod k. A sample is the mean of ``number`` back-to-back calls,
    enough calls to last ``min_sample_s`` (by the warm-up's estimate).

    Each sample is preceded by one untimed call of the same variant (unless its calls take more
    than ``SLOW_CALL_S``): after a call returns, the runtime's worker threads keep spinning for a
    while (onnxruntime's intra-op pool by default, TVM's pool for TVM_THREAD_POOL_SPIN_COUNT
    iterations) and, on a 2-core machine, steal the cores from the next variant's first call.
    Measured here: one 512x28x28 pointwise conv took 2.2 ms in onnxruntime and 6.9 ms in TVM when
    each TVM call directly followed an onnxruntime call, and 2.1 vs 1.9 ms with onnxruntime's
    spinning off. A sleep between variants is no cure on a VM: an idle vCPU is descheduled and
    the next call pays the wake-up (a 50 ms gap made calls 2-4x slower). ``gap_s`` (default 0)
    still sleeps after each sample if asked."""
    for variant in variants:
        estimate = float(np.median(variant.warmup_s[-3:]))
        variant.number = max(1, min(1000, math.ceil(min_sample_s / max(estimate, 1e-7))))
        variant.settle = estimate <= SLOW_CALL_S
    rounds = max(v.repeats for v in variants)
    gc.collect()
    gc.disable()
    try:
        for i in range(rounds):
            active = [v for v in variants if len(v.samples) < v.repeats]
            shift = i % len(active)
            for variant in active[shift:] + active[:shift]:
                if variant.settle:
                    variant.call()  # absorbs the previous variant's spinning threads
                start = time.perf_counter()
                for _ in range(variant.number):
                    variant.call()
                variant.samples.append((time.perf_counter() - start) / variant.number)
                if gap_s:
                    time.sleep(gap_s)
    finally:
        gc.enable()


def stats(samples: list[float]) -> dict:
    ms = np.asarray(samples) * 1e3
    q25, median, q75 = np.percentile(ms, [25, 50, 75])
    return {"median_ms": float(median), "min_ms": float(ms.min()), "max_ms": float(ms.max()),
            "iqr_ms": float(q75 - q25), "spread_pct": float(100 * (q75 - q25) / median),
            "samples_ms": [round(float(v), 4) for v in ms]}


def rel_error(actual: np.ndarray, expected: np.ndarray) -> float:
    actual = np.asarray(actual, np.float64).reshape(-1)
    expected = np.asarray(expected, np.float64).reshape(-1)
    if actual.shape != expected.shape:
        return float("inf")
    scale = max(float(np.max(np.abs(expected))), 1e-30)
    return float(np.max(np.abs(actual - expected)) / scale)


def ort_variant(key, rank, model: onnx.ModelProto, inputs: dict, threads: int, repeats: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    feed = dict(inputs)
    return Variant(key, rank, lambda: session.run(None, feed), lambda out: np.asarray(out[0]),
                   repeats)


def tvm_variant(key, rank, executable, inputs: dict, repeats: int, reference: str):
    import tvm
    from tvm import relax

    vm = relax.VirtualMachine(executable, tvm.cpu())
    main = vm["main"]
    args = [tvm.runtime.tensor(np.ascontiguousarray(x)) for x in inputs.values()]

    def first(out):
        while not hasattr(out, "numpy"):
            out = out[0]
        return out.numpy()

    return Variant(key, rank, lambda: main(*args), first, repeats, reference)


# --- machine limits -----------------------------------------------------------------------------


# --- per-op -------------------------------------------------------------------------------------


# --- one model ----------------------------------------------------------------------------------

def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return (lines[0] if lines else type(exc).__name__)[:300]


class Clock:
    """Wall time of named phases (for estimating run length)."""

    def __init__(self):
        self.phases: dict[str, float] = {}

    def add(self, name: str, seconds: float) -> None:
        self.phases[name] = round(self.phases.get(name, 0.0) + seconds, 3)


def bench_model(spec: ModelSpec, ranks: list[str], args, preset, limits: list, log) -> dict:
    """Every variant of one model at every rank; ``limits`` collects machine-limit runs."""
    from dwsep_compiler.compile import build, import_onnx
    from dwsep_compiler.passes.rewrite.onnx_factorize import factorize_onnx

    clock = Clock()
    started = time.perf_counter()
    model, shapes, note = spec.load()
    model = runtime_ready(model)
    rng = np.random.default_rng(0)
    inputs = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}
    clock.add("load", time.perf_counter() - started)
    result = {"model": spec.name, "note": note, "input_shapes": {k: list(v) for k, v in shapes.items()},
              "ranks": {}, "errors": []}
    variants: list[Variant] = []
    repeats = args.repeats

    def add(key, rank, make, phase):
        t0 = time.perf_counter()
        try:
            variant = make()
        except Exception as exc:
            message = f"{key}{'' if rank is None else f' rank {rank}'}: {_first_line(exc)}"
            result["errors"].append(message)
            log(f"  ! {message}")
            return None
        finally:
            clock.add(phase, time.perf_counter() - t0)
        variants.append(variant)
        return variant

    def compiled(tvm_model, schedule: bool, tag: str):
        """(executable, Relax module, import seconds, build seconds)."""
        t0 = time.perf_counter()
        mod = import_onnx(tvm_model, shapes)
        t1 = time.perf_counter()
        executable = build(mod, preset, schedule=schedule)
        t2 = time.perf_counter()
        log(f"  {tag}: import {t1 - t0:.1f} s, build {t2 - t1:.1f} s")
        return executable, mod, t1 - t0, t2 - t1

    add("ort_orig", None, lambda: ort_variant("ort_orig", None, model, inputs, args.ort_threads,
                                              repeats), "ort_session")
    ours_orig_compile = {}

    def make_ours_orig():
        executable, _, import_s, build_s = compiled(model, True, "ours orig")
        ours_orig_compile.update(import_s=import_s, build_s=build_s)
        return tvm_variant("ours_orig", None, executable, inputs, repeats, "ort_orig")

    add("ours_orig", None, make_ours_orig, "compile_ours")
    mods = {}
    for rank in ranks:
        t0 = time.perf_counter()
        factorized = factorize_onnx(model, shapes, rank_policy(rank))
        clock.add("factorize", time.perf_counter() - t0)
        fact_model = runtime_ready(factorized.model)
        layers = factorized.layers
        before = sum(layer.macs_before for layer in layers)
        after = sum(layer.macs_after for layer in layers)
        done = [layer for layer in layers if layer.factorized]
        entry = {"conv_macs_ratio": after / before if before else None,
                 "convs": len(layers), "factorized": len(done),
                 "layer_ranks": sorted({layer.rank for layer in done}),
                 "compile": {}, "variants": {}}
        result["ranks"][rank] = entry
        log(f"  rank {rank}: {len(done)}/{len(layers)} convs factorized, conv MACs "
            f"{entry['conv_macs_ratio']:.3f}x")
        add("ort_fact", rank, lambda: ort_variant("ort_fact", rank, fact_model, inputs,
                                                  args.ort_threads, repeats), "ort_session")
        if not args.skip_tvm_default:
            def make_default():
                executable, _, import_s, build_s = compiled(fact_model, False, "TVM default fact")
                entry["compile"]["tvm_default"] = {"import_s": import_s, "build_s": build_s}
                variant = tvm_variant("tvm_default", rank, executable, inputs, repeats, "ort_fact")
                variant.repeats = args.tvm_default_repeats or repeats
                return variant

            add("tvm_default", rank, make_default, "compile_tvm_default")

        def make_ours():
            executable, mod, import_s, build_s = compiled(fact_model, True, "ours fact")
            entry["compile"]["ours_fact"] = {"import_s": import_s, "build_s": build_s}
            mods[rank] = mod
            return tvm_variant("ours_fact", rank, executable, inputs, repeats, "ort_fact")

        add("ours_fact", rank, make_ours, "compile_ours")

    # Slow default builds: one timed run unless told otherwise (their warm-up says how slow).
    t0 = time.perf_counter()
    for variant in variants:
        warm_up(variant)
    for variant in variants:
        if (variant.key == "tvm_default" and not args.tvm_default_repeats
                and float(np.median(variant.warmup_s)) > SLOW_CALL_S):
            variant.repeats = 1
            variant.repeats_note = f"1 timed run (a call takes > {SLOW_CALL_S:g} s)"
    clock.add("warm_up", time.perf_counter() - t0)
    log(f"  timing {len(variants)} variants, {repeats} rounds, interleaved ...")
    t0 = time.perf_counter()
    interleaved(variants, args.min_sample_ms / 1e3, args.gap_ms / 1e3)
    clock.add("timing", time.perf_counter() - t0)

    references = {(v.key, v.rank): v for v in variants}
    for variant in variants:
        stat = stats(variant.samples)
        stat.update(repeats=len(variant.samples), calls_per_sample=variant.number,
                    warmup_calls=len(variant.warmup_s))
        if variant.repeats_note:
            stat["note"] = variant.repeats_note
        if variant.reference:
            reference = references.get((variant.reference, variant.rank))
            if reference is not None:
                stat["max_rel_error_vs_ort"] = rel_error(variant.first_output,
                                                         reference.first_output)
        if variant.key == "ort_fact":
            stat["max_rel_error_vs_original"] = rel_error(
                variant.first_output, references[("ort_orig", None)].first_output) \
                if ("ort_orig", None) in references else None
        if variant.rank is None:
            result.setdefault("original", {})[variant.key] = stat
        else:
            result["ranks"][variant.rank]["variants"][variant.key] = stat
    if ours_orig_compile:
        result.setdefault("original", {})["ours_orig_compile"] = ours_orig_compile
    for variant in variants:  # free executables and sessions before per-op
        variant.call = variant.output = None
    variants.clear()
    gc.collect()

    if args.per_op:
        target = preset.tvm_target()
        for rank, mod in mods.items():
            t0 = time.perf_counter()
            limits.append(machine_limits(f"before per-op {spec.name} rank {rank}"))
            try:
                kernels, _ = scheduled_kernels(mod, target)
                time_kernels(kernels, target, args.per_op_repeats)
            except Exception as exc:
                result["errors"].append(f"per-op rank {rank}: {_first_line(exc)}")
                log(f"  ! per-op rank {rank}: {_first_line(exc)}")
                continue
            finally:
                clock.add("per_op", time.perf_counter() - t0)
            for kernel in kernels:
                kernel.pop("_func", None)
            result["ranks"][rank]["kernels"] = kernels
            log(f"  per-op rank {rank}: {len(kernels)} kernels "
                f"({time.perf_counter() - t0:.0f} s)")
    mods.clear()
    result["phase_seconds"] = clock.phases
    result["wall_s"] = round(time.perf_counter() - started, 1)
    return result


# --- report -------------------------------------------------------------------------------------


# --- environment --------------------------------------------------------------------------------

def _git() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                              capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True,
                               text=True, timeout=10).stdout.strip()
        return head + (" (dirty)" if dirty else "") if head else "unknown"
    except Exception:
        return "unknown"


def _schedules_hash() -> str:
    """Which kernels were measured: a hash of schedules/ and the passes the CPU pipeline runs."""
    digest = hashlib.sha256()
    for folder in ("schedules", "passes"):
        for base, _, files in sorted(os.walk(os.path.join(ROOT, folder))):
            for name in sorted(files):
                if name.endswith(".py"):
                    with open(os.path.join(base, name), "rb") as handle:
                        digest.update(name.encode() + handle.read())
    return digest.hexdigest()[:12]


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(args) -> dict:
    import onnxruntime
    import tvm

    return {"host": socket.gethostname(), "cpu": _cpu_name(),
            "cpus": len(os.sched_getaffinity(0)), "platform": platform.platform(),
            "python": platform.python_version(), "tvm": tvm.__version__,
            "onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__,
            "numpy": np.__version__,
            "tvm_threads": int(tvm.get_global_func("runtime.NumThreads")()),
            "tvm_num_threads_env": os.environ.get("TVM_NUM_THREADS"),
            "git": _git(), "schedules_hash": _schedules_hash(),
            "load_before": [round(v, 2) for v in os.getloadavg()]}


# --- main ---------------------------------------------------------------------------------------

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="light_vgg19,light_resnet50,fashion,ddddocr",
                        help="comma list: light_<name> (onnx wheel), fashion, ddddocr, or an .onnx "
                             "path (default: %(default)s)")
    parser.add_argument("--ranks", default=None,
                        help="comma list of ranks for every model: integers, 'full', 'energy' "
                             "(the default --energy 0.95) or e<E>. Default per model: light "
                             "models 1,2; fashion and ddddocr energy,2")
    parser.add_argument("--repeats", type=int, default=10, help="timed rounds (min 3)")
    parser.add_argument("--skip-tvm-default", action="store_true",
                        help="do not build or time TVM's default (unscheduled) build")
    parser.add_argument("--tvm-default-repeats", type=int, default=None,
                        help=f"timed runs of TVM default (default: --repeats, or 1 when a call "
                             f"takes > {SLOW_CALL_S:g} s)")
    parser.add_argument("--per-op", action=argparse.BooleanOptionalAction, default=True,
                        help="time each kernel of the factorized model alone; roofline")
    parser.add_argument("--per-op-repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke run: {QUICK_MODELS} (vgg19 at rank 1 only), 3 repeats")
    parser.add_argument("--ort-threads", type=int, default=2)
    parser.add_argument("--tvm-threads", type=int, default=None,
                        help="TVM_NUM_THREADS (default: every CPU this process may use)")
    parser.add_argument("--min-sample-ms", type=float, default=20.0,
                        help="faster variants are called several times per sample")
    parser.add_argument("--gap-ms", type=float, default=0.0,
                        help="pause after each sample (default none: see interleaved())")
    parser.add_argument("--ocr-width", type=int, default=192, help="ddddocr input width")
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    parser.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=True,
                        help="each model in a fresh process (default; see run_isolated)")
    parser.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        if args.models == parser.get_default("models"):
            args.models = QUICK_MODELS
        if args.repeats == parser.get_default("repeats"):
            args.repeats = 3
    if args.repeats < 3:
        parser.error("--repeats must be at least 3")
    return args


def model_ranks(spec: ModelSpec, args) -> list[str]:
    ranks = ([r.strip() for r in args.ranks.split(",") if r.strip()] if args.ranks
             else list(spec.default_ranks))
    if args.quick and spec.name.startswith("light_") and not args.ranks:
        ranks = ranks[:1]
    return ranks


def run_isolated(spec: ModelSpec, argv, limits: list, notes: list, log) -> dict | None:
    """Benchmark one model in a fresh Python process (this script with ``--models`` set to it
    and ``--child-out``); its result, machine-limit runs and notes join this run's.

    A model benchmarked after others in the same process ran slower, every variant, by
    different factors: the Fashion-MNIST CNN at rank 2 took 0.183 ms (ours) / 0.284 (ORT on
    the factorized model) / 0.285 (ORT on the original) alone, and 0.272 / 0.656 / 0.422 after
    light_resnet50 (0.409 / 0.489 / 0.363 after the whole list), which turned its ratios
    around."""
    import tempfile

    argv = list(sys.argv[1:] if argv is None else argv)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "model.json")
        command = [sys.executable, os.path.abspath(__file__), *argv,
                   "--models", spec.source or spec.name, "--child-out", out]
        code = subprocess.run(command, stdout=subprocess.DEVNULL).returncode
        if code != 0 or not os.path.exists(out):
            notes.append(f"{spec.name} failed: its benchmark process exited with {code}")
            log(f"  ! {spec.name} failed: its benchmark process exited with {code}")
            return None
        with open(out) as handle:
            child = json.load(handle)
    limits.extend(child["limits"])
    notes.extend(child["notes"])
    return child["model"]


def run_child(specs: list[ModelSpec], args, preset, log) -> int:
    """The ``--child-out`` side of `run_isolated`: one model, its result as JSON."""
    (spec,) = specs
    limits, notes = [], []
    log(f"{spec.name}: ranks {', '.join(model_ranks(spec, args))} (own process)")
    try:
        model = bench_model(spec, model_ranks(spec, args), args, preset, limits, log)
    except Exception as exc:
        model = None
        notes.append(f"{spec.name} failed: {_first_line(exc)}")
        log(f"  ! {spec.name} failed: {_first_line(exc)}")
    with open(args.child_out, "w") as handle:
        json.dump({"model": model, "limits": limits, "notes": notes}, handle)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.tvm_threads:
        os.environ["TVM_NUM_THREADS"] = str(args.tvm_threads)
    else:  # TVM's own default is half the logical CPUs on x86
        os.environ.setdefault("TVM_NUM_THREADS", str(len(os.sched_getaffinity(0))))
    from dwsep_compiler.targets import resolve_target

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    started = time.perf_counter()
    now = datetime.datetime.now()
    env = environment(args)
    preset = resolve_target("host")
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    specs, notes = model_specs(names, args.ocr_width)
    if args.child_out:
        return run_child(specs, args, preset, log)
    log("machine limits ...")
    limits = [machine_limits("start")]
    log(f"  SGEMM {limits[0]['sgemm_gflops']:.1f} GFLOP/s, copy {limits[0]['copy_gbs']:.1f} GB/s; "
        f"TVM threads {env['tvm_threads']}, onnxruntime threads {args.ort_threads}")
    models = []
    for spec in specs:
        if args.isolate:
            model = run_isolated(spec, argv, limits, notes, log)
            if model is not None:
                models.append(model)
        else:
            try:
                models.append(bench_model(spec, model_ranks(spec, args), args, preset, limits,
                                          log))
            except Exception as exc:
                notes.append(f"{spec.name} failed: {_first_line(exc)}")
                log(f"  ! {spec.name} failed: {_first_line(exc)}")
        log(f"  {spec.name} done ({time.perf_counter() - started:.0f} s so far)")
    limits.append(machine_limits("end"))
    machine = best_limits(limits)
    for model in models:
        finish_per_op(model, machine)
    env["load_after"] = [round(v, 2) for v in os.getloadavg()]
    settings = {k: getattr(args, k) for k in ("models", "ranks", "repeats", "skip_tvm_default",
                                              "tvm_default_repeats", "per_op", "per_op_repeats",
                                              "quick", "ort_threads", "min_sample_ms", "gap_ms",
                                              "ocr_width")}
    settings["timing"] = ("wall clock (time.perf_counter) around one call: session.run / "
                          "vm['main'](*args); interleaved round-robin after warm-up")
    report = {"date": now.isoformat(timespec="seconds"), "environment": env, "settings": settings,
              "machine": machine, "models": models, "notes": notes,
              "wall_s": round(time.perf_counter() - started, 1)}
    text = markdown(report)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"speed-{env['host']}-{now:%Y%m%d-%H%M}"
                        + ("-quick" if args.quick else ""))
    with open(stem + ".json", "w") as handle:
        json.dump(report, handle, indent=1)
    with open(stem + ".md", "w") as handle:
        handle.write(text)
    print(main_table(text))
    log(f"wrote {stem}.json and {stem}.md ({report['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
