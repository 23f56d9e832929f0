"""Per-kernel figures for bench/speed.py: every PrimFunc of a model as our schedules leave it,
built alone and timed on random buffers, with its MACs and bytes, against this machine's SGEMM
peak and copy bandwidth measured in the same run (the roofline)."""

from __future__ import annotations

import math
import time

import numpy as np

from dwsep_compiler.errors import first_line

# The rule that scheduled a PrimFunc says what it computes.
RULE_KINDS = {
    "Depthwise": "dw", "Pointwise": "pw", "FusedDepthwisePointwise": "dw+pw",
    "Conv2D": "conv", "Dense": "dense",
}
FACTORIZED_KINDS = ("dw", "pw", "dw+pw")


def machine_limits(label: str, repeats: int = 5) -> dict:
    """SGEMM peak (numpy float32 2048^3) and copy bandwidth (numpy copy of 256 MB; read + write
    counted): the best of ``repeats``, with the medians."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((2048, 2048), dtype=np.float32)
    b = rng.standard_normal((2048, 2048), dtype=np.float32)
    a @ b
    gemm = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        gemm.append(time.perf_counter() - start)
    src = np.ones(64 * 1024 * 1024, np.float32)  # 256 MB
    dst = np.empty_like(src)
    np.copyto(dst, src)
    copy = []
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(dst, src)
        copy.append(time.perf_counter() - start)
    flops = 2 * 2048 ** 3
    moved = 2 * src.nbytes
    return {"when": label, "sgemm_gflops": flops / min(gemm) / 1e9,
            "sgemm_gflops_median": flops / float(np.median(gemm)) / 1e9,
            "copy_gbs": moved / min(copy) / 1e9,
            "copy_gbs_median": moved / float(np.median(copy)) / 1e9}


def best_limits(runs: list[dict]) -> dict:
    """The machine's limits: the best of the measurements taken during the run (a busy moment
    only lowers a measurement)."""
    return {"sgemm_gflops": max(r["sgemm_gflops"] for r in runs),
            "copy_gbs": max(r["copy_gbs"] for r in runs), "runs": runs}


def _shape(param) -> list[int]:
    return [int(d) for d in param.shape]


def _nbytes(param) -> int:
    import tvm

    return math.prod(_shape(param)) * tvm.runtime.DataType(str(param.dtype)).bits // 8


def conv_macs(func, kind: str) -> int | None:
    """MACs from the PrimFunc's params: data [N,C,H,W], weight [O,I,kh,kw] (fused: depthwise
    [M*r,1,kh,kw] then pointwise [O,M*r,1,1]), output [N,O,Ho,Wo] last."""
    shapes = [_shape(p) for p in func.params]
    if len(shapes) < 3 or any(len(s) != 4 for s in (shapes[0], shapes[1], shapes[-1])):
        return None
    out = shapes[-1]
    batch, pixels = out[0], out[2] * out[3]
    if kind == "dw+pw":
        dw, pw = shapes[1], shapes[2]
        return batch * pixels * (dw[0] * dw[2] * dw[3] + pw[0] * pw[1])
    o, i, kh, kw = shapes[1]
    if o != out[1]:
        return None
    return batch * pixels * o * i * kh * kw


def reduction_macs(func) -> int:
    """Sum over blocks with a reduction of their iteration-domain size (the MACs of conv and
    matmul blocks; loop transformations keep the domain size)."""
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    total = 0

    def walk(block):
        nonlocal total
        for child in sch.get_child_blocks(block):
            iters = sch.get(child).iter_vars
            if any(int(iv.iter_type) == 2 for iv in iters):
                total += math.prod(int(iv.dom.extent) for iv in iters)
            walk(child)

    walk(sch.get_sblock("root"))
    return total


def call_counts(mod) -> dict[str, int]:
    """How many times each PrimFunc is called from the Relax functions (identical layers share
    one PrimFunc)."""
    import tvm
    from tvm import relax

    counts: dict[str, int] = {}
    call_tir = tvm.ir.Op.get("relax.call_tir")

    def visit(expr):
        if isinstance(expr, relax.Call) and expr.op == call_tir:
            counts[expr.args[0].name_hint] = counts.get(expr.args[0].name_hint, 0) + 1

    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func.body, visit)
    return counts


def describe(func, kind: str) -> str:
    shapes = [_shape(p) for p in func.params]
    if kind not in RULE_KINDS.values() or len(shapes[0]) != 4 or len(shapes[-1]) != 4:
        return " ".join("x".join(map(str, s)) for s in shapes)
    x, w, out = shapes[0], shapes[1], shapes[-1]
    text = f"{x[1]}x{x[2]}x{x[3]} -> {out[1]}x{out[2]}x{out[3]}"
    if kind in ("dw", "dw+pw"):
        text += f" k{w[2]}x{w[3]} r{w[0] // x[1]}"
    elif kind == "conv":
        text += f" k{w[2]}x{w[3]}"
    return text


def scheduled_kernels(mod, target) -> tuple[list[dict], dict]:
    """Every PrimFunc of ``mod`` as our rules schedule it, with its kind, call count, MACs and
    bytes; plus the schedule_module mapping."""
    import tvm

    from dwsep_compiler.compile.cpu import schedule_module

    scheduled, applied = schedule_module(mod, target)
    counts = call_counts(scheduled)
    kernels = []
    for gvar, func in scheduled.functions_items():
        if not isinstance(func, tvm.tirx.PrimFunc):
            continue
        name = gvar.name_hint
        rule = applied.get(name)
        kind = RULE_KINDS.get(rule, "other")
        entry = {"name": name, "rule": rule, "kind": kind, "calls": counts.get(name, 0),
                 "params": [[*_shape(p), str(p.dtype)] for p in func.params]
                 if all(hasattr(p, "shape") for p in func.params) else None}
        if entry["params"] is None:
            entry["skip"] = "non-buffer params"
            kernels.append(entry)
            continue
        entry["bytes"] = sum(_nbytes(p) for p in func.params)
        entry["shape"] = describe(func, kind)
        macs = 0
        if kind in RULE_KINDS.values():
            by_domain = reduction_macs(func)
            by_params = conv_macs(func, kind) if kind != "dense" else None
            macs = by_params if by_params is not None else by_domain
            if by_params is not None and by_params != by_domain:
                entry["macs_note"] = f"params give {by_params}, block domains {by_domain}"
        entry["macs"] = int(macs)
        entry["_func"] = func
        kernels.append(entry)
    return kernels, applied


def time_kernels(kernels: list[dict], target, repeats: int) -> None:
    """Build each PrimFunc alone and time it on random buffers (``time_evaluator``)."""
    import tvm

    dev = tvm.cpu()
    rng = np.random.default_rng(0)
    for entry in kernels:
        func = entry.pop("_func", None)
        if func is None:
            continue
        if any(not str(p.dtype).startswith("float") for p in func.params):
            entry["skip"] = "non-float params (random values would be invalid)"
            continue
        try:
            started = time.perf_counter()
            lib = tvm.tirx.build(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}),
                                 target=target)
            entry["build_s"] = round(time.perf_counter() - started, 3)
            args = [tvm.runtime.tensor(rng.standard_normal(_shape(p)).astype(str(p.dtype)), dev)
                    for p in func.params]
            result = lib.time_evaluator("main", dev, number=1, repeat=repeats,
                                        min_repeat_ms=20)(*args)
        except Exception as exc:  # a kernel that does not build alone must not end the run
            entry["skip"] = f"{type(exc).__name__}: {first_line(exc)}"
            continue
        seconds = float(result.median)
        entry["time_us"] = seconds * 1e6
        entry["time_spread_pct"] = float(100 * (np.percentile(result.results, 75)
                                                - np.percentile(result.results, 25)) / seconds)


def kernel_figures(kernels: list[dict], limits: dict) -> None:
    """Achieved GFLOP/s and GB/s against the machine's limits; roofline time per kernel."""
    peak = limits["sgemm_gflops"] * 1e9
    bandwidth = limits["copy_gbs"] * 1e9
    for entry in kernels:
        if "bytes" not in entry:
            continue
        flops = 2 * entry["macs"]
        entry["roofline_us"] = 1e6 * max(flops / peak, entry["bytes"] / bandwidth)
        if "time_us" not in entry:
            continue
        seconds = entry["time_us"] / 1e6
        entry["gflops"] = flops / seconds / 1e9
        entry["gbs"] = entry["bytes"] / seconds / 1e9
        entry["peak_pct"] = 100 * flops / seconds / peak
        entry["bandwidth_pct"] = 100 * entry["bytes"] / seconds / bandwidth
        entry["roofline_efficiency"] = entry["roofline_us"] / entry["time_us"]


def finish_per_op(model: dict, machine: dict) -> None:
    """Per-kernel figures and the roofline summary, once the machine's limits are known."""
    for entry in model["ranks"].values():
        if "kernels" not in entry:
            continue
        kernel_figures(entry["kernels"], machine)
        entry["roofline"] = summary = kernel_summary(entry["kernels"])
        ours = entry["variants"].get("ours_fact")
        if ours:
            summary["ours_fact_ms"] = ours["median_ms"]
            summary["ours_over_roofline"] = ours["median_ms"] / summary["roofline_ms"]


def kernel_summary(kernels: list[dict]) -> dict:
    """Totals per kind (weighted by call count) and the model's roofline."""
    by_kind: dict[str, dict] = {}
    for entry in kernels:
        if "roofline_us" not in entry:
            continue
        calls = entry["calls"] or 0
        total = by_kind.setdefault(entry["kind"], {"kernels": 0, "calls": 0, "macs": 0, "bytes": 0,
                                                    "roofline_ms": 0.0, "time_ms": 0.0,
                                                    "untimed": 0})
        total["kernels"] += 1
        total["calls"] += calls
        total["macs"] += calls * entry["macs"]
        total["bytes"] += calls * entry["bytes"]
        total["roofline_ms"] += calls * entry["roofline_us"] / 1e3
        if "time_us" in entry:
            total["time_ms"] += calls * entry["time_us"] / 1e3
        else:
            total["untimed"] += 1
    roofline = sum(t["roofline_ms"] for t in by_kind.values())
    timed = sum(t["time_ms"] for t in by_kind.values())
    return {"by_kind": by_kind, "roofline_ms": roofline, "kernel_time_sum_ms": timed,
            "untimed_kernels": sum(t["untimed"] for t in by_kind.values())}
