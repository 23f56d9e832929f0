"""Two or more builds of the same model, timed on this machine interleaved: which is faster.

Each argument is a dwsep output directory for the host (``model.so`` + ``model.onnx``), e.g.
the same model compiled by two commits of this project (a worktree on ``PYTHONPATH``). The
libraries are loaded into one process and called round by round, every build once per round,
so that this VM's drifts (its speed moved by 2x within minutes) fall on all of them alike;
the medians of the rounds are compared to the first build. Times, not counts: for ARM use
`arm.py` (instructions under qemu).

    python bench/ab.py OLD.dwsep NEW.dwsep [--rounds 15] [--number 200]
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from dwsep_compiler.model import load_model, resolve_input_shapes  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("builds", nargs="+", help="dwsep output directories (host builds)")
    parser.add_argument("--rounds", type=int, default=15, help="rounds (each build once per round)")
    parser.add_argument("--number", type=int, default=200, help="calls per measurement")
    args = parser.parse_args(argv)

    import tvm
    from tvm import relax

    dev = tvm.cpu()
    model = load_model(os.path.join(args.builds[0], "model.onnx"))
    rng = np.random.default_rng(0)
    inputs = [tvm.runtime.tensor(rng.standard_normal(shape).astype(np.float32), dev)
              for shape in resolve_input_shapes(model).values()]
    timers = {}
    for build in args.builds:
        vm = relax.VirtualMachine(tvm.runtime.load_module(os.path.join(build, "model.so")), dev)
        timers[build] = vm.time_evaluator("main", dev, number=args.number, repeat=1)
    samples = {build: [] for build in args.builds}
    for _ in range(args.rounds):
        for build, timer in timers.items():
            samples[build].append(timer(*inputs).mean * 1e6)
    first = float(np.median(samples[args.builds[0]]))
    for build, times in samples.items():
        median = float(np.median(times))
        print(f"{build}: median {median:.1f} us (min {min(times):.1f}, max {max(times):.1f}), "
              f"{median / first:.2f}x the first")
    return 0


if __name__ == "__main__":
    sys.exit(main())
