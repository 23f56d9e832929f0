"""Accuracy vs conv-MAC ratio: data-free SVD, layer-wise distillation, and end-to-end.

    python bench/accuracy.py                      # Fashion-MNIST example, writes bench/results/
    python bench/accuracy.py --model ddddocr      # ddddocr's OCR model (see bench/ddddocr_ocr.py)
    python bench/accuracy.py --model ddddocr --calibration-size 256 --tag cal256
    python bench/accuracy.py --model fashion --calibration-size 256 --tag cal256  # training images
    python bench/accuracy.py --model ddddocr-det  # ddddocr's detector: box F1 vs the original

For each target ratio F the ranks are allocated by ``--macs-ratio F`` (greedy per layer; on the
SVD weight error without calibration, on the calibration output error with it), the model is
rewritten with `compile_model(..., compile=False)` and its accuracy measured with onnxruntime.
Writes ``accuracy_<model>[-<tag>].json`` (+ ``.png`` when matplotlib is installed) under
``--out``. The end-to-end stage runs each model whole (ddddocr's BiLSTM head included), see
`initialization.finetune`. Also records the uniform-rank points (``--rank r`` for every layer)
for reference.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(ROOT, "examples", "fashion_mnist"))

from dwsep_compiler.pipeline import compile_model  # noqa: E402


def fashion_task(limit: int, calibration_size: int | None = None):
    """``calibration_size``: that many training images (seeded draw) instead of the example's
    bundled 64."""
    import data  # examples/fashion_mnist/data.py

    def accuracy(path: str) -> float:
        return data.evaluate_onnx(path, limit=limit, threads=2)

    calibration = str(data.DEFAULT_CALIBRATION)
    if calibration_size is not None:
        images = data.preprocess(data.load_fashion_mnist("train")[0])
        chosen = np.random.default_rng(0).choice(len(images), calibration_size, replace=False)
        calibration = os.path.join(tempfile.mkdtemp(prefix="dwsep-bench-"), "calibration.npz")
        with np.load(data.DEFAULT_CALIBRATION) as bundled:
            np.savez(calibration, **{bundled.files[0]: images[chosen]})
    return {"model": str(data.DEFAULT_MODEL), "calibration": calibration,
            "calibration_size": calibration_size or len(data.calibration_images()),
            "input_shapes": None,
            "accuracy": accuracy,
            "metric": f"top-1 accuracy, first {limit} Fashion-MNIST test images"}


def ddddocr_task(limit: int, calibration_size: int):
    import ddddocr_ocr as ocr

    texts = ocr.random_texts(limit, seed=1)
    images = ocr.render(texts)
    # Calibration strings: another seed, and none of the evaluation strings.
    evaluated = {text.lower() for text in texts}
    pool = [t for t in ocr.random_texts(2 * calibration_size, seed=2) if t.lower() not in evaluated]
    assert len(pool) >= calibration_size, "too many calibration strings are evaluation strings"
    calibration = os.path.join(tempfile.mkdtemp(prefix="dwsep-bench-"), "ocr_calibration.npz")
    np.savez(calibration, **{ocr.INPUT: ocr.render(pool[:calibration_size])})
    return {"model": ocr.model_path(), "calibration": calibration,
            "calibration_size": calibration_size,
            "input_shapes": {ocr.INPUT: (1, 1, ocr.HEIGHT, ocr.WIDTH)},
            "accuracy": lambda path: ocr.accuracy(path, texts, images),
            "metric": f"exact string (case-insensitive), {limit} rendered 4-7 char strings"}


# Each method: compile_model's calibration options. "linear": the pre-activation fit with ranks
# priced by the layer's own error; "layerwise": compile_model's defaults.
def detector_task(limit: int, calibration_size: int):
    import ddddocr_det as det

    images = det.render(limit, seed=1)
    reference = det.boxes_of(det.model_path(), images)
    calibration = os.path.join(tempfile.mkdtemp(prefix="dwsep-bench-"), "det_calibration.npz")
    np.savez(calibration, **{det.INPUT: det.render(calibration_size, seed=2)})
    return {"model": det.model_path(), "calibration": calibration,
            "calibration_size": calibration_size, "input_shapes": None,
            "accuracy": lambda path: det.f1(det.boxes_of(path, images), reference),
            "metric": f"box F1 at IoU 0.5 against the original model's boxes, {limit} rendered "
                      "416x416 scenes"}


METHODS = {
    "svd": None,
    "linear": {"fit": "linear", "sensitivity": "layer"},
    "post-activation": {"fit": "post-activation", "sensitivity": "layer"},
    "sensitivity": {"fit": "linear", "sensitivity": "model-output"},
    "layerwise": {"fit": "post-activation", "sensitivity": "model-output"},
    "end-to-end": {"fit": "post-activation", "sensitivity": "model-output", "finetune": True},
}
DEFAULT_METHODS = ("svd", "linear", "post-activation", "sensitivity", "layerwise", "end-to-end")


def run_point(task, out_dir: str, method: str, finetune_steps: int, **ranks) -> dict:
    options = dict(METHODS[method] or {})
    calibrated = METHODS[method] is not None
    finetune = options.pop("finetune", False)
    started = time.perf_counter()
    result = compile_model(task["model"], compile=False, output_dir=out_dir,
                           input_shapes=task["input_shapes"],
                           calibration=task["calibration"] if calibrated else None,
                           finetune_steps=finetune_steps if finetune else 0,
                           **options, **ranks)
    seconds = time.perf_counter() - started
    totals = result.report.totals()
    return {"method": method, "calibrated": calibrated, **ranks,
            "conv_macs_ratio": totals["conv_macs_ratio"],
            "accuracy": task["accuracy"](result.model_path), "rewrite_time_s": round(seconds, 2),
            "ranks": {layer.name: layer.rank for layer in result.report.factorized_layers}}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("fashion", "ddddocr", "ddddocr-det"),
                        default="fashion")
    parser.add_argument("--ratios", default="0.15,0.2,0.3,0.4,0.5")
    parser.add_argument("--ranks", default="1,2,3,4")
    parser.add_argument("--limit", type=int, default=None,
                        help="test images (fashion: 2000) or strings (ddddocr: 200)")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                        help=f"comma list of {', '.join(METHODS)} (end-to-end needs torch)")
    parser.add_argument("--finetune-steps", type=int, default=150,
                        help="steps of the end-to-end stage (after layer-wise distillation)")
    parser.add_argument("--calibration-size", type=int, default=None,
                        help="ddddocr: rendered calibration strings, none of them an evaluation "
                             "string (default 64); ddddocr-det: rendered scenes (default 32); "
                             "fashion: training images instead of the bundled 64")
    parser.add_argument("--tag", default="",
                        help="results go to accuracy_<model>[-<tag>].json/.png")
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    args = parser.parse_args(argv)
    if args.calibration_size is not None and args.calibration_size < 1:
        parser.error("--calibration-size: a positive count")
    methods = [m for m in args.methods.split(",") if m]
    unknown = set(methods) - set(METHODS)
    if unknown:
        parser.error(f"unknown methods: {', '.join(sorted(unknown))}")
    if args.model == "fashion":
        task = fashion_task(args.limit or 2000, args.calibration_size)
    elif args.model == "ddddocr":
        task = ddddocr_task(args.limit or 200, args.calibration_size or 64)
    else:
        task = detector_task(args.limit or 100, args.calibration_size or 32)
    os.makedirs(args.out, exist_ok=True)
    work = tempfile.mkdtemp(prefix="dwsep-bench-")
    baseline = task["accuracy"](task["model"])
    print(f"{args.model}: original {baseline:.4f} ({task['metric']})", flush=True)
    points = []
    settings = ([{"macs_ratio": float(f)} for f in args.ratios.split(",") if f]
                + [{"rank": int(r)} for r in args.ranks.split(",") if r])
    for index, ranks in enumerate(settings):
        for method in methods:
            try:
                point = run_point(task, os.path.join(work, f"p{index}-{method}"), method,
                                  args.finetune_steps, **ranks)
            except Exception as exc:  # e.g. a ratio below rank 1 everywhere
                print(f"  {ranks} {method}: {exc}", flush=True)
                continue
            points.append(point)
            print(f"  {ranks} {method:10s}: conv MACs "
                  f"{point['conv_macs_ratio']:.3f}x accuracy {point['accuracy']:.4f} "
                  f"({point['rewrite_time_s']:.1f} s)", flush=True)
    result = {"model": task["model"], "metric": task["metric"], "original_accuracy": baseline,
              "calibration": task["calibration"],
              "calibration_size": task["calibration_size"],
              "finetune_steps": args.finetune_steps, "points": points}
    stem = f"accuracy_{args.model}" + (f"-{args.tag}" if args.tag else "")
    path = os.path.join(args.out, f"{stem}.json")
    with open(path, "w") as handle:
        json.dump(result, handle, indent=2)
    print(f"wrote {path}")
    _plot(result, path[:-5] + ".png")


def _plot(result: dict, path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    labels = {"svd": "data-free SVD", "layerwise": "layer-wise distillation",
              "end-to-end": f"+ end-to-end ({result.get('finetune_steps')} steps)"}
    for method, label in labels.items():
        pts = sorted((p["conv_macs_ratio"], p["accuracy"]) for p in result["points"]
                     if p.get("method", "layerwise" if p["calibrated"] else "svd") == method
                     and "macs_ratio" in p)
        if pts:
            ax.plot(*zip(*pts), marker="o", label=label)
    ax.axhline(result["original_accuracy"], color="gray", linestyle="--", label="original")
    ax.set_xlabel("conv MACs / original")
    ax.set_ylabel("accuracy")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
