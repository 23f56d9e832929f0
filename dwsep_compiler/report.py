"""The report: what happened to every convolution, and the whole-model totals.

`report.json` is read by scripts; `format_table` is what the terminal shows.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field


@dataclass
class LayerReport:
    name: str
    status: str  # "factorized" | "skipped"
    reason: str | None
    in_channels: int | None
    out_channels: int | None
    kernel: list[int] | None
    stride: list[int] | None
    rank: int | None
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    weight_rel_error: float | None
    bn_folded: bool = False
    detail: str | None = None  # a human sentence for the reason, when skipped
    # On calibration data (None without): ||y - teacher||_F / ||teacher||_F of this layer's output,
    # the teacher being the original model's output of this conv (after BN when folded).
    output_rel_error: float | None = None  # with the distilled factors
    svd_output_rel_error: float | None = None  # with the data-free SVD factors, same input
    # The post-activation fit (a layer read only by a ReLU-like activation): the same relative
    # error measured after that activation, of the linear fit and of the refit that replaced it.
    activation: str | None = None
    linear_post_activation_rel_error: float | None = None
    post_activation_rel_error: float | None = None
    # With tuning records (None without): the best measured kernel time of this layer as it is
    # deployed (DW+PW, or the original conv when kept) and of its original conv, on the device.
    latency_ms: float | None = None
    original_latency_ms: float | None = None

    @property
    def factorized(self) -> bool:
        return self.status == "factorized"


@dataclass
class Report:
    model: str
    target: str | None
    rank_policy: str
    layers: list[LayerReport]
    model_macs_before: int
    model_macs_after: int
    notes: list[str] = field(default_factory=list)
    artifacts: dict[str, str] = field(default_factory=dict)
    verification: dict | None = None  # the library's outputs against onnxruntime, when run
    calibration: dict | None = None  # samples, teacher, method, time; None: data-free SVD only
    tuning: dict | None = None  # tuning run and records (dwsep_compiler.tuning); None: untuned
    input_shapes: dict[str, list[int]] | None = None  # the library's (fixed) input shapes
    # --macs-ratio / --max-error: what priced the ranks and each layer's error by rank
    rank_allocation: dict | None = None
    # the arithmetic inside the library ("fp32"; "fp16": --precision fp16, with what it costs)
    precision: dict | None = None
    # where the library runs: "cpu", or "opencl" (a GPU build: dwsep-run's default device)
    device: str | None = None

    @property
    def factorized_layers(self) -> list[LayerReport]:
        return [layer for layer in self.layers if layer.factorized]

    def totals(self) -> dict:
        conv_before = sum(layer.macs_before for layer in self.layers)
        conv_after = sum(layer.macs_after for layer in self.layers)
        params_before = sum(layer.params_before for layer in self.layers)
        params_after = sum(layer.params_after for layer in self.layers)
        return {
            "convs": len(self.layers),
            "factorized": len(self.factorized_layers),
            "skipped": len(self.layers) - len(self.factorized_layers),
            "conv_macs_before": conv_before,
            "conv_macs_after": conv_after,
            "conv_macs_ratio": _ratio(conv_after, conv_before),
            "model_macs_before": self.model_macs_before,
            "model_macs_after": self.model_macs_after,
            "model_macs_ratio": _ratio(self.model_macs_after, self.model_macs_before),
            "params_before": params_before,
            "params_after": params_after,
            "params_ratio": _ratio(params_after, params_before),
        }

    def to_dict(self) -> dict:
        layers = []
        for layer in self.layers:
            entry = asdict(layer)
            if entry["detail"] is None:
                del entry["detail"]
            layers.append(entry)
        return {
            "model": self.model,
            "target": self.target,
            "device": self.device,
            "input_shapes": self.input_shapes,
            "rank_policy": self.rank_policy,
            "layers": layers,
            "totals": self.totals(),
            "notes": list(self.notes),
            "artifacts": dict(self.artifacts),
            "verification": self.verification,
            "calibration": self.calibration,
            "rank_allocation": self.rank_allocation,
            "tuning": self.tuning,
            "precision": self.precision,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"


def _ratio(after: int, before: int) -> float:
    return float(after) / float(before) if before else 1.0


def _count(n: int) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def format_table(report: Report) -> str:
    """A fixed-width table: one row per conv, then the totals."""
    head = ["layer", "status", "MxN", "kernel", "stride", "rank", "MACs before", "MACs after",
            "params", "weight err"]
    calibrated = any(layer.output_rel_error is not None for layer in report.layers)
    if calibrated:
        head.append("out err svd->calib")
    timed = any(layer.original_latency_ms is not None for layer in report.layers)
    if timed:
        head.append("ms orig->now")
    rows = [head]
    for layer in report.layers:
        shape = (f"{layer.in_channels}x{layer.out_channels}"
                 if layer.in_channels is not None else "-")
        rows.append([
            layer.name if len(layer.name) <= 32 else "..." + layer.name[-29:],
            layer.status if layer.factorized else f"skip:{layer.reason}",
            shape,
            "x".join(map(str, layer.kernel)) if layer.kernel else "-",
            "x".join(map(str, layer.stride)) if layer.stride else "-",
            "-" if layer.rank is None else str(layer.rank),
            _count(layer.macs_before),
            _count(layer.macs_after),
            f"{_count(layer.params_before)}->{_count(layer.params_after)}",
            "-" if layer.weight_rel_error is None else f"{layer.weight_rel_error:.4f}",
        ] + ([] if not calibrated else [
            "-" if layer.output_rel_error is None
            else f"{layer.svd_output_rel_error:.4f}->{layer.output_rel_error:.4f}"])
           + ([] if not timed else [
            "-" if layer.original_latency_ms is None or layer.latency_ms is None
            else f"{layer.original_latency_ms:.4g}->{layer.latency_ms:.4g}"]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    t = report.totals()
    lines.append("")
    lines.append(
        f"convs: {t['factorized']} factorized, {t['skipped']} skipped of {t['convs']}  |  "
        f"conv MACs {_count(t['conv_macs_before'])} -> {_count(t['conv_macs_after'])} "
        f"({t['conv_macs_ratio']:.3f}x)  |  model MACs {_count(t['model_macs_before'])} -> "
        f"{_count(t['model_macs_after'])} ({t['model_macs_ratio']:.3f}x)  |  conv params "
        f"{_count(t['params_before'])} -> {_count(t['params_after'])}"
    )
    if report.calibration:
        c = report.calibration
        lines.append(f"calibration: {c['samples']} samples, teacher {c['teacher']}, "
                     f"{c['time_s']:.1f} s")
    if report.tuning:
        u = report.tuning
        if "trials_run" in u:
            lines.append(f"tuning: {u['trials_run']} trials ({u['trials_before']} in the records "
                         f"before) in {u['minutes']:.1f} min on {u['device']}, {u['stopped']}; "
                         f"conv kernels {u['untuned_kernels_ms']} -> {u['tuned_kernels_ms']} ms")
        if u.get("gated_layers"):
            lines.append(f"tuning: kept the original conv (faster on the device): "
                         f"{', '.join(u['gated_layers'])}")
        lines.append(f"tuning records: {u['records']}")
    for note in report.notes:
        lines.append(f"note: {note}")
    return "\n".join(lines)
