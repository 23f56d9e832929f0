"""The markdown of a bench/speed.py run: the main table (medians, ratios), per-model details and
the per-kernel tables."""

from __future__ import annotations

from kernels import FACTORIZED_KINDS

VARIANTS = ("ort_orig", "ort_fact", "tvm_default", "ours_fact", "ours_orig")
VARIANT_TITLES = {
    "ort_orig": "ORT orig", "ort_fact": "ORT fact", "tvm_default": "TVM default",
    "ours_fact": "ours fact", "ours_orig": "ours orig",
}


def _ms(stat: dict | None) -> str:
    if not stat:
        return "-"
    value = stat["median_ms"]
    text = f"{value:.3f}" if value < 1 else f"{value:.2f}" if value < 100 else f"{value:.0f}"
    if stat.get("repeats", 0) < 3:
        text += f" ({stat['repeats']} run{'s' if stat['repeats'] > 1 else ''})"
    if stat.get("max_rel_error_vs_ort", 0) > 1e-3:
        text += " (!)"
    return text


def _ratio(numerator: dict | None, denominator: dict | None) -> str:
    if not numerator or not denominator:
        return "-"
    return f"{numerator['median_ms'] / denominator['median_ms']:.2f}"


def markdown(report: dict) -> str:
    env = report["environment"]
    quick = " (--quick smoke run)" if report["settings"]["quick"] else ""
    lines = [f"# Speed: {env['host']}, {report['date']}{quick}", "",
             f"{env['cpu']}, {env['cpus']} CPUs usable; load average {env['load_before']} before, "
             f"{env['load_after']} after. onnxruntime {env['onnxruntime']} with "
             f"{report['settings']['ort_threads']} intra-op threads; TVM {env['tvm']} with "
             f"{env['tvm_threads']} threads (TVM_NUM_THREADS={env['tvm_num_threads_env']}). "
             f"Git {env['git']}, schedules hash {env['schedules_hash']}.", "",
             f"Wall clock around one inference call (perf_counter), medians of "
             f"{report['settings']['repeats']} interleaved rounds after warm-up. "
             "Speedups: reference ms / ours-fact ms (> 1: ours is faster). `(1 run)`: timed once; "
             "`(!)`: output differs from onnxruntime on the same model by > 1e-3 (relative). "
             "`ours orig` is rank-independent (one build, one measurement per model).", "",
             "| model | rank | conv MAC ratio | ORT orig ms | ORT fact ms | TVM default ms | "
             "ours fact ms | ours orig ms | ours-fact vs ORT-fact (x) | ours-fact vs ORT-orig (x) "
             "| ours compile s (fact / orig) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for model in report["models"]:
        original = model.get("original", {})
        orig_compile = original.get("ours_orig_compile")
        for rank, entry in model["ranks"].items():
            v = entry["variants"]
            fact_compile = entry["compile"].get("ours_fact")
            compile_text = (f"{sum(fact_compile.values()):.1f}" if fact_compile else "-") + " / " + (
                f"{sum(orig_compile.values()):.1f}" if orig_compile else "-")
            tvm_default = ("skipped" if report["settings"]["skip_tvm_default"]
                           else _ms(v.get("tvm_default")))
            ratio = entry["conv_macs_ratio"]
            lines.append(
                f"| {model['model']} | {rank} | {'-' if ratio is None else f'{ratio:.3f}'} | "
                f"{_ms(original.get('ort_orig'))} | {_ms(v.get('ort_fact'))} | {tvm_default} | "
                f"{_ms(v.get('ours_fact'))} | {_ms(original.get('ours_orig'))} | "
                f"{_ratio(v.get('ort_fact'), v.get('ours_fact'))} | "
                f"{_ratio(original.get('ort_orig'), v.get('ours_fact'))} | {compile_text} |")
    machine = report["machine"]
    runs = machine["runs"]
    lines += ["", f"Machine (same run, best of {len(runs)} measurements spread over the run): SGEMM "
              f"peak {machine['sgemm_gflops']:.1f} GFLOP/s (numpy float32 2048^3; measurements "
              f"{', '.join(str(round(r['sgemm_gflops'])) for r in runs)}), copy bandwidth "
              f"{machine['copy_gbs']:.1f} GB/s (numpy copy of 256 MB, read + write counted; "
              f"{', '.join(str(round(r['copy_gbs'], 1)) for r in runs)}).", "",
              "## Spread", "",
              "| model | rank | variant | median ms | min | max | IQR % | samples x calls | "
              "rel. error vs ORT |", "|---|---|---|---|---|---|---|---|---|"]
    for model in report["models"]:
        rows = [(None, k, s) for k, s in model.get("original", {}).items() if k in VARIANTS]
        rows += [(r, k, s) for r, e in model["ranks"].items() for k, s in e["variants"].items()]
        for rank, key, s in rows:
            error = s.get("max_rel_error_vs_ort")
            lines.append(f"| {model['model']} | {rank or 'orig'} | {VARIANT_TITLES[key]} | "
                         f"{s['median_ms']:.3f} | {s['min_ms']:.3f} | {s['max_ms']:.3f} | "
                         f"{s['spread_pct']:.1f} | {s['repeats']} x {s['calls_per_sample']} | "
                         f"{'-' if error is None else f'{error:.1e}'} |")
    roofline_rows = [(m, r, e) for m in report["models"] for r, e in m["ranks"].items()
                     if "roofline" in e]
    if roofline_rows:
        lines += ["", "## Roofline of the factorized model (ours)", "",
                  "Per kernel max(2*MACs / SGEMM peak, bytes / copy bandwidth), times its call "
                  "count, summed. `kernel sum`: the standalone kernel times (random buffers, "
                  "warm caches) summed the same way; ours fact: the whole model in the VM.", "",
                  "| model | rank | roofline ms | kernel sum ms | ours fact ms | ours / roofline "
                  "| dw ms (roofline) | pw ms (roofline) | dw+pw ms (roofline) | conv ms (roofline) "
                  "| dense ms (roofline) | other ms (roofline) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for model, rank, entry in roofline_rows:
            roof = entry["roofline"]
            kinds = roof["by_kind"]

            def cell(kind_names):
                chosen = [kinds[k] for k in kind_names if k in kinds]
                if not chosen:
                    return "-"
                return (f"{sum(c['time_ms'] for c in chosen):.2f} "
                        f"({sum(c['roofline_ms'] for c in chosen):.2f})")

            other = [k for k in kinds if k not in ("dw", "pw", "dw+pw", "conv", "dense")]
            ratio = roof.get("ours_over_roofline")
            lines.append(f"| {model['model']} | {rank} | {roof['roofline_ms']:.2f} | "
                         f"{roof['kernel_time_sum_ms']:.2f} | "
                         f"{roof.get('ours_fact_ms', float('nan')):.2f} | "
                         f"{'-' if ratio is None else f'{ratio:.1f}'} | {cell(['dw'])} | "
                         f"{cell(['pw'])} | {cell(['dw+pw'])} | {cell(['conv'])} | "
                         f"{cell(['dense'])} | {cell(other)} |")
        lines += ["", "## Per-op: depthwise and pointwise kernels (ours, factorized model)", "",
                  "Each scheduled PrimFunc built alone, `time_evaluator` median on random buffers "
                  "(warm caches). GFLOP/s = 2*MACs/time; GB/s = (inputs + outputs bytes)/time; "
                  "% of the SGEMM peak and copy bandwidth above; eff. = roofline time / time.", ""]
        for model, rank, entry in roofline_rows:
            rows = [k for k in entry["kernels"] if k["kind"] in FACTORIZED_KINDS + ("conv",)]
            if not rows:
                continue
            lines += [f"### {model['model']} rank {rank}", "",
                      "| kernel | kind | shape (C x H x W -> O x Ho x Wo) | calls | MMACs | us | "
                      "GFLOP/s | % peak | GB/s | % bw | roofline us | eff. |",
                      "|---|---|---|---|---|---|---|---|---|---|---|---|"]
            for k in rows:
                if "time_us" not in k:
                    lines.append(f"| {k['name']} | {k['kind']} | {k.get('shape', '')} | "
                                 f"{k['calls']} | {k.get('macs', 0) / 1e6:.2f} | "
                                 f"{k.get('skip', 'untimed')} | | | | | | |")
                    continue
                lines.append(
                    f"| {k['name']} | {k['kind']} | {k['shape']} | {k['calls']} | "
                    f"{k['macs'] / 1e6:.2f} | {k['time_us']:.1f} | {k['gflops']:.1f} | "
                    f"{k['peak_pct']:.0f} | {k['gbs']:.1f} | {k['bandwidth_pct']:.0f} | "
                    f"{k['roofline_us']:.1f} | {k['roofline_efficiency']:.2f} |")
            lines.append("")
    notes = report.get("notes", []) + [f"{m['model']}: {e}" for m in report["models"]
                                       for e in m["errors"]]
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines).rstrip() + "\n"


def main_table(text: str) -> str:
    """The markdown up to the spread section (what the terminal shows)."""
    return text.split("\n## Spread")[0]
