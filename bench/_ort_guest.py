"""Run an ONNX model with onnxruntime inside the aarch64 guest (bench/arm.py): one thread, no
spinning, ``--runs`` inferences, then the process's /proc/self/maps (for the profiler).

    _ort_guest.py model.onnx inputs.npz --runs N --maps FILE
"""

import argparse

import numpy as np
import onnxruntime as ort


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("inputs")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--maps", required=True)
    args = parser.parse_args()
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    session = ort.InferenceSession(args.model, options, providers=["CPUExecutionProvider"])
    with np.load(args.inputs) as data:
        feed = {name: data[name] for name in data.files}
    for _ in range(args.runs):
        session.run(None, feed)
    with open("/proc/self/maps") as source, open(args.maps, "w") as out:
        out.write(source.read())


if __name__ == "__main__":
    main()
