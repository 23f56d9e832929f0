"""``dwsep-run``: run a compiled library on a device through TVM RPC, or here with ``--local``.
A thin shell over `dwsep_compiler.device.remote.run_library`.

    dwsep-run model.dwsep --rpc-tracker 10.0.0.5:9190 --rpc-key rk3399 --repeat 20
    dwsep-run model.dwsep --local --inputs inputs.npz --output outputs.npz
    dwsep-run model.dwsep --emulate --profile [--cpu cortex-a53]   # ARM, no board

Errors the user can act on (unreachable tracker, no server under the key, a server that dies
mid-run, bad --inputs) print one line on stderr and exit 2; anything unexpected prints one line
and exits 1 (set DWSEP_DEBUG=1 for the traceback).
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

from dwsep_compiler.cli import OneLineParser, count, positive

PROG = "dwsep-run"


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog=PROG,
        description="Run a dwsep-compile library on a device through a TVM RPC tracker (or on "
                    "this machine with --local): print the outputs and the median latency.")
    parser.add_argument("library", metavar="OUT_DIR_OR_LIBRARY",
                        help="a dwsep-compile output directory, or its model.so")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--rpc-tracker", metavar="HOST:PORT",
                       help="address of the TVM RPC tracker the device server registered with")
    where.add_argument("--local", action="store_true",
                       help="run on this machine instead (libraries built for it only)")
    where.add_argument("--emulate", action="store_true",
                       help="run an aarch64 library here under qemu on the emulated core of its "
                            "target (or --cpu)")
    parser.add_argument("--cpu", metavar="QEMU_CPU",
                        help="with --emulate: the emulated core (cortex-a53, cortex-a76, ...) "
                             "[default: the report's target's]")
    parser.add_argument("--profile", action="store_true",
                        help="with --emulate: print what the core executes per inference, per "
                             "kernel (instructions, loads/stores, modelled cache misses, MACs): "
                             "a proxy for speed, not a timing")
    parser.add_argument("--no-memory", action="store_true",
                        help="with --profile: count instructions only (several times faster)")
    parser.add_argument("--runs", type=count("runs"), default=11, metavar="N",
                        help="with --profile: inferences in the counted run; the count of one "
                             "is subtracted [11]")
    parser.add_argument("--json", metavar="FILE.json", help="with --profile: also write it here")
    parser.add_argument("--rpc-key", metavar="KEY",
                        help="device key the server registered under (with --rpc-tracker)")
    parser.add_argument("--session-timeout", type=positive("session timeout (seconds)"), default=60.0, metavar="S",
                        help="give up when the tracker grants no session within S seconds "
                             "[default: 60]")
    parser.add_argument("--inputs", metavar="FILE.npz",
                        help="input arrays keyed by input name [default: random, standard "
                             "normal, of the library's input shapes]")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs [0]")
    parser.add_argument("--repeat", type=count("repeat"), default=10, metavar="N",
                        help="time N runs after the first, print the median (0: no timing) [10]")
    parser.add_argument("--device", choices=("cpu", "opencl"),
                        help="device to run on [default: opencl for GPU builds (mali, adreno, OpenCL target "
                             "dicts), else cpu]")
    parser.add_argument("--output", metavar="FILE.npz",
                        help="save the outputs here, keyed by output name")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="report progress on stderr")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.local and not args.rpc_tracker and not args.emulate:
        print(f"{PROG}: error: say where to run: --rpc-tracker HOST:PORT --rpc-key KEY, "
              "--local, or --emulate", file=sys.stderr)
        return 2
    if (args.profile or args.cpu) and not args.emulate:
        print(f"{PROG}: error: --profile and --cpu go with --emulate", file=sys.stderr)
        return 2
    if args.emulate and args.rpc_key:
        print(f"{PROG}: error: --rpc-key goes with --rpc-tracker, not --emulate", file=sys.stderr)
        return 2
    if args.rpc_tracker and not args.rpc_key:
        print(f"{PROG}: error: --rpc-tracker needs --rpc-key", file=sys.stderr)
        return 2
    if args.local and args.rpc_key:
        print(f"{PROG}: error: --rpc-key goes with --rpc-tracker, not --local", file=sys.stderr)
        return 2
    # Imports after parsing: --help and argument errors stay instant.
    from dwsep_compiler.errors import DwsepError
    from dwsep_compiler.device.remote import run_library, save_outputs

    say = (lambda message: print(message, file=sys.stderr, flush=True)) if args.verbose else None
    try:
        if args.emulate:
            return _emulate(args)
        result = run_library(
            args.library, tracker=args.rpc_tracker, key=args.rpc_key, inputs=args.inputs,
            repeat=args.repeat, device=args.device, session_timeout=args.session_timeout,
            seed=args.seed, log=say)
        if args.output:
            save_outputs(result, args.output)
    except DwsepError as exc:
        return _exit(f"{PROG}: error: {exc}", exc.exit_code)
    except KeyboardInterrupt:
        return _exit(f"{PROG}: interrupted", 130)
    except Exception as exc:  # a bug of ours: still one line, unless asked for the traceback
        if os.environ.get("DWSEP_DEBUG"):
            traceback.print_exc()
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        return _exit(f"{PROG}: internal error: {type(exc).__name__}: {first} "
                     "(set DWSEP_DEBUG=1 for the traceback)", 1)
    print(result.summary())
    if args.output:
        print(f"wrote {args.output}")
    return 0


def _emulate(args) -> int:
    """``--emulate``: the outputs under qemu, or with ``--profile`` the per-kernel counts."""
    import json

    from dwsep_compiler.device import emulate, profile, qemu
    from dwsep_compiler.device.remote import find_artifact, load_inputs, random_inputs

    if args.profile:
        if args.runs < 2:
            return _exit(f"{PROG}: error: --runs must be at least 2 with --profile", 2)
        result = profile.profile_artifact(args.library, cpu=args.cpu,
                                          memory=not args.no_memory, runs=args.runs,
                                          inputs=args.inputs, seed=args.seed)
        print(result.table())
        if args.json:
            with open(args.json, "w") as handle:
                json.dump(result.as_dict(), handle, indent=1)
            print(f"wrote {args.json}")
        return 0
    artifact = find_artifact(args.library)
    specs = artifact.inputs or []
    arrays = load_inputs(args.inputs) if args.inputs else random_inputs(specs, args.seed)
    ordered = [arrays[s.name] for s in specs] if specs else list(arrays.values())
    from dwsep_compiler.targets import PRESETS

    preset = PRESETS.get(artifact.target or "")
    cpu = args.cpu or (preset.qemu_cpu if preset else None) or qemu.DEFAULT_QEMU_CPU
    outputs = emulate.run_aarch64(artifact.library, ordered, qemu_cpu=cpu)
    names = artifact.output_names or [f"output_{i}" for i in range(len(outputs))]
    print(f"ran {artifact.library} under qemu-aarch64 ({cpu})")
    for name, value in zip(names, outputs):
        print(f"output {name}: {value.dtype}{list(value.shape)}")
    if args.output:
        import numpy as np

        np.savez(args.output, **dict(zip(names, outputs)))
        print(f"wrote {args.output}")
    return 0


def _exit(message: str, code: int) -> int:
    print(message, file=sys.stderr, flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
