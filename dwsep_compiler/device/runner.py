#!/usr/bin/env python3
"""Run a TVM-compiled model library with the TVM *runtime* only: the deploy script for a device.

This file is self-contained (standard library, numpy and the `apache-tvm` wheel; it never imports
`dwsep_compiler`), so it can be copied next to a compiled library on an ARM board and run there::

    python3 runner.py model.so --inputs inputs.npz --output outputs.npz
    python3 runner.py model.so --random 1x3x224x224:float32 --bench 20
    python3 runner.py --features        # the CPU's Linux hwcaps (fp16? dotprod? i8mm?)

`dwsep_compiler.device.emulate` runs this same script under qemu-aarch64 to check ARM artifacts on an
x86_64 machine, so what the tests exercise is exactly what a user deploys.

Inputs (`--inputs`): an .npz whose arrays are passed to the entry function positionally. Keys
`arg_0`, `arg_1`, ... give the order explicitly; otherwise keys equal to the function's parameter
names are matched by name; otherwise the order inside the file is used.
Outputs (`--output`): an .npz with keys `output_0`, `output_1`, ... (tuples are flattened in order);
with several `--inputs` files, `sample_0_output_0`, ... (the library is loaded once).

The runtime-only library is used (`TVM_USE_RUNTIME_LIB=1` unless already set): on a device with
the full wheel installed this skips loading the ~240 MB compiler library.

Exit status: 0 on success, 2 with a one-line `error: ...` on stderr for a bad argument or input.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import re
import sys
from collections.abc import Sequence
from typing import Any

# ---------------------------------------------------------------------------------------------
# CPU features: Linux arm64 hwcaps
# ---------------------------------------------------------------------------------------------

#: getauxval(3) keys (include/uapi/linux/auxvec.h).
AT_HWCAP = 16
AT_HWCAP2 = 26

#: AT_HWCAP bits, from linux arch/arm64/include/uapi/asm/hwcap.h (Linux 6.16). Names are the
#: ones /proc/cpuinfo prints under "Features" (the macro suffix, lower case, without '_').
HWCAP_BITS: dict[int, str] = {
    0: "fp",
    1: "asimd",
    2: "evtstrm",
    3: "aes",
    4: "pmull",
    5: "sha1",
    6: "sha2",
    7: "crc32",
    8: "atomics",
    9: "fphp",
    10: "asimdhp",
    11: "cpuid",
    12: "asimdrdm",
    13: "jscvt",
    14: "fcma",
    15: "lrcpc",
    16: "dcpop",
    17: "sha3",
    18: "sm3",
    19: "sm4",
    20: "asimddp",
    21: "sha512",
    22: "sve",
    23: "asimdfhm",
    24: "dit",
    25: "uscat",
    26: "ilrcpc",
    27: "flagm",
    28: "ssbs",
    29: "sb",
    30: "paca",
    31: "pacg",
    32: "gcs",
    33: "cmpbr",
    34: "fprcvt",
    35: "f8mm8",
    36: "f8mm4",
    37: "svef16mm",
    38: "sveeltperm",
    39: "sveaes2",
    40: "svebfscale",
    41: "sve2p2",
    42: "sme2p2",
    43: "smesbitperm",
    44: "smeaes",
    45: "smesfexpa",
    46: "smestmop",
    47: "smesmop4",
}

#: AT_HWCAP2 bits, same header.
HWCAP2_BITS: dict[int, str] = {
    0: "dcpodp",
    1: "sve2",
    2: "sveaes",
    3: "svepmull",
    4: "svebitperm",
    5: "svesha3",
    6: "svesm4",
    7: "flagm2",
    8: "frint",
    9: "svei8mm",
    10: "svef32mm",
    11: "svef64mm",
    12: "svebf16",
    13: "i8mm",
    14: "bf16",
    15: "dgh",
    16: "rng",
    17: "bti",
    18: "mte",
    19: "ecv",
    20: "afp",
    21: "rpres",
    22: "mte3",
    23: "sme",
    24: "smei16i64",
    25: "smef64f64",
    26: "smei8i32",
    27: "smef16f32",
    28: "smeb16f32",
    29: "smef32f32",
    30: "smefa64",
    31: "wfxt",
    32: "ebf16",
    33: "sveebf16",
    34: "cssc",
    35: "rprfm",
    36: "sve2p1",
    37: "sme2",
    38: "sme2p1",
    39: "smei16i32",
    40: "smebi32i32",
    41: "smeb16b16",
    42: "smef16f16",
    43: "mops",
    44: "hbc",
    45: "sveb16b16",
    46: "lrcpc3",
    47: "lse128",
    48: "fpmr",
    49: "lut",
    50: "faminmax",
    51: "f8cvt",
    52: "f8fma",
    53: "f8dp4",
    54: "f8dp2",
    55: "f8e4m3",
    56: "f8e5m2",
    57: "smelutv2",
    58: "smef8f16",
    59: "smef8f32",
    60: "smesf8fma",
    61: "smesf8dp4",
    62: "smesf8dp2",
    63: "poe",
}

# Bits 62 and 63 of AT_HWCAP are reserved for libc; they are not CPU features.
_HWCAP_LIBC_RESERVED = (1 << 62) | (1 << 63)


def read_hwcaps() -> tuple[int, int]:
    """(AT_HWCAP, AT_HWCAP2) of the running process, via getauxval(3)."""
    libc = ctypes.CDLL(None)
    getauxval = libc.getauxval
    getauxval.restype = ctypes.c_ulong
    getauxval.argtypes = [ctypes.c_ulong]
    return int(getauxval(AT_HWCAP)), int(getauxval(AT_HWCAP2))


def decode_hwcaps(hwcap: int, hwcap2: int) -> set[str]:
    """Feature names for the set bits; a bit this table does not know is named `hwcap[2]_bitN`."""
    features: set[str] = set()
    for value, table, prefix in (
        (hwcap & ~_HWCAP_LIBC_RESERVED, HWCAP_BITS, "hwcap"),
        (hwcap2, HWCAP2_BITS, "hwcap2"),
    ):
        for bit in range(64):
            if value >> bit & 1:
                features.add(table.get(bit, f"{prefix}_bit{bit}"))
    return features


# ---------------------------------------------------------------------------------------------
# Running a library
# ---------------------------------------------------------------------------------------------


class RunnerError(Exception):
    """A bad argument or input: reported as one `error: ...` line, exit status 2."""


_DTYPES = (
    "float16",
    "float32",
    "float64",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
    "bool",
)


def parse_random_spec(spec: str) -> tuple[tuple[int, ...], str]:
    """`1x3x224x224[:float32]` -> ((1, 3, 224, 224), "float32")."""
    shape_text, _, dtype = spec.partition(":")
    dtype = dtype or "float32"
    if not re.fullmatch(r"\d+(x\d+)*", shape_text) or dtype not in _DTYPES:
        raise RunnerError(
            f"bad --random spec {spec!r}: expected SHAPE[:DTYPE] like 1x3x224x224:float32 "
            f"(DTYPE one of {', '.join(_DTYPES)})"
        )
    return tuple(int(d) for d in shape_text.split("x")), dtype


def _param_names(vm: Any, function: str) -> list[str] | None:
    """The entry function's parameter names, where this TVM version exposes them."""
    try:
        arity = int(vm.module["get_function_arity"](function))
        return [str(vm.module["get_function_param_name"](function, i)) for i in range(arity)]
    except Exception:  # a VM function older runtimes may lack; positional order is the fallback
        return None


def order_inputs(arrays: dict[str, Any], param_names: Sequence[str] | None) -> list[Any]:
    """Put named .npz arrays into call order (see the module docstring for the rules)."""
    keys = list(arrays)
    positional = [f"arg_{i}" for i in range(len(keys))]
    if sorted(keys) == sorted(positional):
        return [arrays[k] for k in positional]
    if param_names is not None and sorted(keys) == sorted(param_names):
        return [arrays[k] for k in param_names]
    return [arrays[k] for k in keys]


def flatten_outputs(value: Any) -> list[Any]:
    """VM results (a tensor, or nested tuples of them) -> a flat list of numpy arrays."""
    import numpy as np

    if hasattr(value, "numpy"):
        return [value.numpy()]
    if isinstance(value, (list, tuple)) or type(value).__name__ in ("Array", "List", "Tuple"):
        flat: list[Any] = []
        for item in value:
            flat.extend(flatten_outputs(item))
        return flat
    return [np.asarray(value)]


def run_library(
    library: str,
    inputs: list[Any] | dict[str, Any],
    function: str = "main",
    bench: int = 0,
) -> tuple[list[Any], float | None]:
    """Load `library` with the runtime, call `function`: (outputs, median seconds or None)."""
    results, median = run_samples(library, [inputs], function, bench)
    return results[0], median


def run_samples(
    library: str,
    samples: Sequence[list[Any] | dict[str, Any]],
    function: str = "main",
    bench: int = 0,
    runs: int = 1,
) -> tuple[list[list[Any]], float | None]:
    """Load `library` once and call `function` on each sample (the first `runs` times):
    (outputs per sample, median seconds of the first sample's `bench` timed runs, or None)."""
    os.environ.setdefault("TVM_USE_RUNTIME_LIB", "1")
    import tvm
    import tvm.runtime
    import tvm.runtime.vm

    if not os.path.isfile(library):
        raise RunnerError(f"library not found: {library}")
    lib = tvm.runtime.load_module(library)
    dev = tvm.cpu(0)
    vm = tvm.runtime.vm.VirtualMachine(lib, dev)
    results, median = [], None
    for k, inputs in enumerate(samples):
        if isinstance(inputs, dict):
            inputs = order_inputs(inputs, _param_names(vm, function))
        args = [tvm.runtime.tensor(x, dev) for x in inputs]
        for _ in range(runs - 1 if k == 0 else 0):
            vm[function](*args)
        results.append(flatten_outputs(vm[function](*args)))
        if bench > 0 and k == 0:
            timer = vm.time_evaluator(function, dev, number=1, repeat=bench)
            median = float(timer(*args).median)
    return results, median


def _load_npz(path: str) -> dict[str, Any]:
    import numpy as np

    if not os.path.isfile(path):
        raise RunnerError(f"inputs file not found: {path}")
    with np.load(path, allow_pickle=False) as data:
        return {key: data[key] for key in data.files}


def _random_inputs(specs: Sequence[str], seed: int) -> list[Any]:
    import numpy as np

    rng = np.random.default_rng(seed)
    arrays = []
    for spec in specs:
        shape, dtype = parse_random_spec(spec)
        if dtype.startswith("float"):
            arrays.append(rng.standard_normal(shape).astype(dtype))
        elif dtype == "bool":
            arrays.append(rng.integers(0, 2, shape).astype(bool))
        else:
            info = np.iinfo(dtype)
            arrays.append(rng.integers(max(info.min, -128), min(info.max, 127) + 1, shape, dtype))
    return arrays


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="runner.py",
        description="Run a TVM-compiled model library with the TVM runtime only.",
    )
    parser.add_argument("library", nargs="?", help="compiled library (.so) from export_library")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--inputs", metavar="NPZ", action="append",
                        help="input arrays (.npz); repeat to run several samples in one load")
    source.add_argument(
        "--random",
        metavar="SHAPE[:DTYPE]",
        action="append",
        help="a random input, e.g. 1x3x224x224:float32 (repeat once per input, in order)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for --random (default 0)")
    parser.add_argument("--output", metavar="NPZ", help="write outputs here (output_0, ...)")
    parser.add_argument("--function", default="main", help="entry function (default main)")
    parser.add_argument(
        "--bench", type=int, default=0, metavar="N", help="also time N runs, print the median"
    )
    parser.add_argument(
        "--runs", type=int, default=1, metavar="N",
        help="call the function N times on the first sample (instruction counting: the "
        "difference of two run counts is N-1 inferences)",
    )
    parser.add_argument(
        "--maps", metavar="FILE", help="write /proc/self/maps here at the end (profiling)"
    )
    parser.add_argument(
        "--features", action="store_true", help="print this CPU's hwcaps as JSON and exit"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    try:
        if args.features:
            machine = platform.machine()
            if machine not in ("aarch64", "arm64"):
                raise RunnerError(f"--features reads arm64 hwcaps; this machine is {machine}")
            hwcap, hwcap2 = read_hwcaps()
            print(
                json.dumps(
                    {
                        "hwcap": hwcap,
                        "hwcap2": hwcap2,
                        "features": sorted(decode_hwcaps(hwcap, hwcap2)),
                    }
                )
            )
            return 0
        if not args.library:
            raise RunnerError("no library given (or use --features)")
        if args.bench < 0:
            raise RunnerError("--bench must be >= 0")
        if args.inputs:
            samples: list[list[Any] | dict[str, Any]] = [_load_npz(p) for p in args.inputs]
        elif args.random:
            samples = [_random_inputs(args.random, args.seed)]
        else:
            raise RunnerError("no inputs: pass --inputs FILE.npz or --random SHAPE[:DTYPE]")
        if args.runs < 1:
            raise RunnerError("--runs must be >= 1")
        results, median = run_samples(args.library, samples, args.function, args.bench,
                                      args.runs)
        if args.maps:
            with open("/proc/self/maps") as source, open(args.maps, "w") as handle:
                handle.write(source.read())
    except RunnerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # One sample: output_0, output_1, ...; several: sample_0_output_0, ...
    prefixes = [""] if len(results) == 1 else [f"sample_{k}_" for k in range(len(results))]
    named = {f"{prefix}output_{i}": out
             for prefix, outputs in zip(prefixes, results) for i, out in enumerate(outputs)}
    if args.output:
        import numpy as np

        with open(args.output, "wb") as handle:  # a file object: numpy adds no ".npz" suffix
            np.savez(handle, **named)
    for key, out in named.items():
        print(f"{key}: {out.dtype}{list(out.shape)}")
    if median is not None:
        print(f"median latency over {args.bench} runs: {median * 1e3:.3f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
