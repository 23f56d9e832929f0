"""ARM without a board: instructions per inference on emulated cores, ours against onnxruntime.

    python bench/arm.py                                   # every model, cortex-a53 and a76
    python bench/arm.py --models fashion --cpus cortex-a76 --memory

Per model and core, in one run: our library of the factorized model and of the original
(`--target arm-a53` / `arm-a76`), onnxruntime's aarch64 build (1.19.2, the newest that runs
under QEMU 7.2) on the same factorized and original ONNX files, and the NEON floor (MACs / 4:
one 4-lane FMLA per 4 multiply-accumulates); on cores with fp16 arithmetic (A76) also our
library of the factorized model with ``--precision fp16`` (floor: MACs / 8). Counted with the profiler
(`dwsep_compiler.device.profile`): instructions inside the inference libraries (ours: model.so, the TVM
runtime, libc/libm/libstdc++; onnxruntime: its extension and the same system libraries), one
thread, the difference of a run of ``--runs`` inferences and a run of one. Deterministic,
unlike timings on this VM; a proxy for speed (no stalls, no memory latency). Writes
``bench/results/arm-<stamp>.json`` and ``.md`` (with the per-kernel table of ours).

Models: the Fashion example (``--macs-ratio 0.4`` with its calibration set), ddddocr's conv
backbone (rank 2), light_resnet50 and light_vgg19 with random weights at 64x64 (rank 1; at
224x224 one emulated VGG-19 inference is ~10 G instructions); light_squeezenet the same way on
request.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import onnx

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from dwsep_compiler import zoo  # noqa: E402
from dwsep_compiler.device import aarch64_root, profile  # noqa: E402
from dwsep_compiler.compile import build, export_library, import_onnx  # noqa: E402
from dwsep_compiler.compile.precision import has_fp16  # noqa: E402
from dwsep_compiler.macs import model_macs  # noqa: E402
from dwsep_compiler.model import resolve_input_shapes, view_model  # noqa: E402
from dwsep_compiler.pipeline import compile_model  # noqa: E402
from dwsep_compiler.targets import resolve_target  # noqa: E402

FASHION = os.path.join(ROOT, "examples", "fashion_mnist")
TARGETS = {"cortex-a53": "arm-a53", "cortex-a76": "arm-a76"}
# The C/C++ libraries both runtimes call: profile's runtime libraries less TVM's own and the
# dynamic loader (left out of both sides since the first runs, so that figures stay comparable).
SYSTEM_LIBRARIES = tuple(lib for lib in profile.RUNTIME_LIBRARIES
                         if not lib.startswith(("libtvm", "ld-linux")))
LIGHT_HW = 64


def models(names):
    """(name, original model path, compile options, note)."""
    out = []
    work = tempfile.mkdtemp(prefix="dwsep-arm-models-")
    for name in names:
        if name == "fashion":
            out.append((name, os.path.join(FASHION, "fashion_cnn.onnx"),
                        {"calibration": os.path.join(FASHION, "calibration.npz"),
                         "macs_ratio": 0.4}, "--macs-ratio 0.4, calibrated"))
        elif name == "ddddocr":
            import speed  # bench/speed.py: the backbone cut

            model, shapes, note = speed.model_specs(["ddddocr"], 160)[0][0].load()
            path = os.path.join(work, "ddddocr_backbone.onnx")
            onnx.save(model, path)
            out.append((name, path, {"rank": 2, "input_shapes": shapes}, f"rank 2; {note}"))
        elif name in ("light_resnet50", "light_vgg19", "light_squeezenet"):
            path = os.path.join(work, f"{name}.onnx")
            onnx.save(zoo.light_model(name[len("light_"):], input_hw=(LIGHT_HW, LIGHT_HW)), path)
            out.append((name, path, {"rank": 1},
                        f"rank 1, random weights, {LIGHT_HW}x{LIGHT_HW}"))
        else:
            raise SystemExit(f"unknown model {name}: fashion, ddddocr, light_resnet50, light_vgg19, "
                             "light_squeezenet")
    return out


def inference_instructions(regions, own: tuple[str, ...]) -> float:
    """Instructions in the libraries that do the inference (``own``) and the system ones."""
    return sum(c.instructions for (lib, _), c in regions.items()
               if os.path.basename(lib).startswith(own + SYSTEM_LIBRARIES))


def ort_profile(path, inputs: dict, cpu, runtime, ort_dir, runs, memory):
    model = onnx.load(path)
    model.ir_version = min(model.ir_version, 9)  # onnxruntime 1.19.2 reads IR <= 9
    with tempfile.TemporaryDirectory(prefix="dwsep-arm-ort-") as tmp:
        model_path, inputs_path = os.path.join(tmp, "model.onnx"), os.path.join(tmp, "in.npz")
        onnx.save(model, model_path)
        np.savez(inputs_path, **inputs)

        def command(n, maps):
            return [os.path.join(HERE, "_ort_guest.py"), model_path, inputs_path, "--runs",
                    str(n), "--maps", str(maps)]

        return profile.profile_command(command, cpu, runtime, memory, runs,
                                       python_path=[str(ort_dir)], what="onnxruntime")


def measure(name, path, options, note, cpu, runtime, ort_dir, runs, memory, work):
    preset = resolve_target(TARGETS[cpu])
    original = onnx.load(path)
    shapes = resolve_input_shapes(original, options.get("input_shapes"))
    options = {k: v for k, v in options.items() if k != "input_shapes"}
    result = compile_model(path, target=preset, output_dir=os.path.join(work, f"{name}-{cpu}"),
                           input_shapes=shapes, **options)
    factorized = onnx.load(result.model_path)
    rng = np.random.default_rng(0)
    inputs = {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}
    row = {"model": name, "cpu": cpu, "note": note,
           "conv_macs_ratio": result.report.totals()["conv_macs_ratio"]}
    for variant, model in (("factorized", factorized), ("original", original)):
        macs = model_macs(view_model(model, shapes))
        ours = profile_ours(import_onnx(model, shapes), preset,
                            os.path.join(work, f"{name}-{cpu}-{variant}"), inputs, cpu, runtime,
                            memory, runs, macs, profile.NEON_FP32_LANES)
        theirs = ort_profile(path if variant == "original" else result.model_path, inputs,
                             cpu, runtime, ort_dir, runs, memory)
        row[variant] = {
            "macs": macs, "floor": macs / profile.NEON_FP32_LANES,
            "ours": inference_instructions(ours.regions, ("model.so", "libtvm")),
            "ours_model_so": ours.total(ours.library).instructions,
            "onnxruntime": inference_instructions(theirs, ("onnxruntime",)),
            "ours_whole_process": ours.total().instructions,
            "onnxruntime_whole_process": sum(c.instructions for c in theirs.values()),
            "kernels": ours.as_dict()["kernels"][:12],
        }
        row[variant]["ours_conv_kernels"] = conv_kernel_instructions(ours)
        if memory:
            row[variant]["ours_l1_misses"] = ours.total(ours.library).l1_misses
        print(f"{name} {cpu} {variant}: ours {row[variant]['ours']:.4g}, onnxruntime "
              f"{row[variant]['onnxruntime']:.4g}, floor {row[variant]['floor']:.4g}",
              flush=True)
    if has_fp16(preset):  # --precision fp16: the factorized model in float16 on the same core
        macs = row["factorized"]["macs"]
        ours = profile_ours(import_onnx(factorized, shapes, "float16"), preset,
                            os.path.join(work, f"{name}-{cpu}-fp16"), inputs, cpu, runtime,
                            memory, runs, macs, profile.NEON_FP16_LANES)
        row["fp16"] = {"macs": macs, "floor": macs / profile.NEON_FP16_LANES,
                       "ours": inference_instructions(ours.regions, ("model.so", "libtvm")),
                       "ours_conv_kernels": conv_kernel_instructions(ours),
                       "kernels": ours.as_dict()["kernels"][:12]}
        print(f"{name} {cpu} fp16: ours {row['fp16']['ours']:.4g} (fp32 "
              f"{row['factorized']['ours']:.4g}), conv kernels {row['fp16']['ours_conv_kernels']:.4g}"
              f" (fp32 {row['factorized']['ours_conv_kernels']:.4g})", flush=True)
    return row


def profile_ours(mod, preset, directory, inputs, cpu, runtime, memory, runs, macs, lanes):
    """Build ``mod`` for ``preset`` with our pipeline and profile one inference."""
    os.makedirs(directory, exist_ok=True)
    library = export_library(build(mod, preset), preset, directory)
    return profile.profile_library(library.path, list(inputs.values()), cpu, runtime, memory,
                                   runs, macs=macs,
                                   kernel_macs=profile.kernel_macs(mod, preset.tvm_target()),
                                   lanes=lanes)


def conv_kernel_instructions(ours) -> float:
    """Instructions of the kernels that do multiply-accumulates (convs, matmuls)."""
    return sum(c.instructions for name, c in ours.kernels() if ours.kernel_macs.get(name))


def markdown(rows, command) -> str:
    lines = [f"Instructions per inference, emulated (QEMU 7.2 TCG plugin), one thread. `{command}`",
             "", "| model | core | conv MACs | ours fact. | ORT fact. | ours / ORT | ours / floor "
             "| ours orig. | ORT orig. | ours fact. vs ORT orig. |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        f, o = r["factorized"], r["original"]
        lines.append(f"| {r['model']} | {r['cpu']} | {r['conv_macs_ratio']:.3f}x | {f['ours']:.3g} "
                     f"| {f['onnxruntime']:.3g} | {f['ours'] / f['onnxruntime']:.2f}x "
                     f"| {f['ours'] / f['floor']:.2f}x | {o['ours']:.3g} | {o['onnxruntime']:.3g} "
                     f"| {o['onnxruntime'] / f['ours']:.2f}x fewer |")
    fp16 = [r for r in rows if "fp16" in r]
    if fp16:
        lines += ["", "`--precision fp16` (float16 inside the library), the factorized model, ours:",
                  "", "| model | core | fp32 | fp16 | fp16 / fp32 | conv kernels fp32 | conv kernels "
                  "fp16 | conv fp16 / fp32 | fp16 / fp16 floor |", "|---|---|---|---|---|---|---|---|---|"]
        for r in fp16:
            f, h = r["factorized"], r["fp16"]
            lines.append(f"| {r['model']} | {r['cpu']} | {f['ours']:.3g} | {h['ours']:.3g} | "
                         f"{h['ours'] / f['ours']:.2f}x | {f['ours_conv_kernels']:.3g} | "
                         f"{h['ours_conv_kernels']:.3g} | "
                         f"{h['ours_conv_kernels'] / f['ours_conv_kernels']:.2f}x | "
                         f"{h['ours'] / h['floor']:.2f}x |")
    for r in rows:
        lines += ["", f"{r['model']} on {r['cpu']}, ours factorized, top kernels:", "",
                  "| kernel | instructions | MACs | x floor |", "|---|---|---|---|"]
        for k in r["factorized"]["kernels"]:
            floor = (f"{k['instructions'] / (k['macs'] / 4):.2f}" if k.get("macs") else "")
            lines.append(f"| {k['name']} | {k['instructions']:.4g} | {k.get('macs') or ''} | "
                         f"{floor} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="fashion,ddddocr,light_resnet50,light_vgg19")
    parser.add_argument("--cpus", default="cortex-a53,cortex-a76")
    parser.add_argument("--runs", type=int, default=3, help="inferences in the counted run [3]")
    parser.add_argument("--memory", action="store_true",
                        help="also trace loads/stores and the cache model (several times slower)")
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    args = parser.parse_args()
    runtime = aarch64_root.ensure_aarch64_runtime()
    ort_dir = aarch64_root.ensure_aarch64_onnxruntime()
    work = tempfile.mkdtemp(prefix="dwsep-arm-")
    rows = []
    started = time.time()
    for name, path, options, note in models(args.models.split(",")):
        for cpu in args.cpus.split(","):
            rows.append(measure(name, path, options, note, cpu, runtime, ort_dir, args.runs,
                                args.memory, work))
    stamp = time.strftime("%Y%m%d-%H%M")
    os.makedirs(args.out, exist_ok=True)
    command = "python bench/arm.py " + " ".join(sys.argv[1:])
    base = os.path.join(args.out, f"arm-{stamp}")
    with open(base + ".json", "w") as handle:
        json.dump({"command": command, "seconds": round(time.time() - started), "rows": rows},
                  handle, indent=1)
    with open(base + ".md", "w") as handle:
        handle.write(markdown(rows, command))
    print(markdown(rows, command))
    print(f"wrote {base}.json and .md")


if __name__ == "__main__":
    main()
