"""Run aarch64 TVM-compiled libraries on an x86_64 host under qemu-user, to check ARM artifacts.

What runs is real: the Debian arm64 `python3.11`, the aarch64 `apache-tvm` runtime wheel, and the
library exactly as it would be deployed, executed by `qemu-aarch64-static` with a pinned CPU model
(`-cpu cortex-a53`, `cortex-a76`, ...). A library compiled with features the pinned CPU lacks
(fp16 arithmetic, dot product) dies with SIGILL instead of silently passing.

The aarch64 userland is built once and cached (`aarch64_root`); qemu runs it directly
(`qemu`).

Command line: ``python -m dwsep_compiler.device.emulate --prepare`` builds (or finds) the cached root and
prints where it is and how long that took; ``--list-cpus`` and ``--features CPU`` help debugging.
``--rpc-server HOST:PORT [--key aarch64] [--qemu-cpu cortex-a53]`` serves TVM RPC as an emulated
aarch64 device registered at that tracker (`rpc_server.py` under qemu, see `popen_python`), for
``dwsep-run --rpc-tracker HOST:PORT --rpc-key aarch64``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dwsep_compiler.device.aarch64_root import (READY_MARKER, ensure_aarch64_runtime, runtime_at,
                                                runtime_dir)
from dwsep_compiler.device.qemu import (DEFAULT_QEMU_CPU, DEFAULT_RUN_TIMEOUT_S, Aarch64Runtime,
                                        check_qemu_cpu, child_setup, find_qemu, guest_command,
                                        qemu_cpu_models, run_guest)
from dwsep_compiler.device.runner import decode_hwcaps
from dwsep_compiler.errors import DwsepError

logger = logging.getLogger(__name__)


#: Debian packages the emulation path needs on the host (cross compiler for export_library,
#: qemu-user, debootstrap for the arm64 userland).
REQUIRED_APT_PACKAGES = (
    "gcc-aarch64-linux-gnu",
    "g++-aarch64-linux-gnu",
    "libc6-dev-arm64-cross",
    "qemu-user-static",
    "debootstrap",
)


#: The deploy script run under emulation (and on real devices).
RUNNER_SCRIPT = Path(__file__).with_name("runner.py")


#: The RPC server run under emulation (and on real devices) for `dwsep-run --rpc-tracker`.
RPC_SERVER_SCRIPT = Path(__file__).with_name("rpc_server.py")


_FEATURES_TIMEOUT_S = 120.0


def run_python(
    python_args: Sequence[str],
    qemu_cpu: str = DEFAULT_QEMU_CPU,
    runtime: Aarch64Runtime | None = None,
    timeout: float | None = DEFAULT_RUN_TIMEOUT_S,
    *,
    num_threads: int | None = 1,
    qemu: str | None = None,
    qemu_args: Sequence[str] = (),
    what: str = "aarch64 python",
    python_path: Sequence[str] = (),
) -> subprocess.CompletedProcess[str]:
    """Run the arm64 `python3.11 -P <python_args>` (a script and its arguments, or `-c CODE`)
    under qemu on `qemu_cpu`, with the aarch64 TVM runtime on its path; return the finished
    process (text stdout/stderr). Raises `EmulationError` on a signal, non-zero exit or timeout.
    ``qemu``: another qemu-aarch64 binary (the dynamic one loads TCG plugins), ``qemu_args``
    options it gets before the guest's (``-plugin ...``); ``python_path``: more aarch64
    package directories for the guest (`ensure_aarch64_onnxruntime`)."""
    runtime = runtime or ensure_aarch64_runtime()
    qemu = qemu or find_qemu()
    check_qemu_cpu(qemu, qemu_cpu)
    return run_guest(
        runtime,
        qemu,
        qemu_cpu,
        python_args,
        timeout=timeout,
        what=what,
        num_threads=num_threads,
        qemu_args=qemu_args,
        python_path=python_path,
    )


def popen_python(
    python_args: Sequence[str],
    qemu_cpu: str = DEFAULT_QEMU_CPU,
    runtime: Aarch64Runtime | None = None,
    *,
    num_threads: int | None = 1,
    **popen_kwargs: Any,
) -> subprocess.Popen:
    """Start the arm64 `python3.11 -P <python_args>` under qemu on `qemu_cpu` in the background
    (a long-running guest, such as an RPC server) and return the `subprocess.Popen`.

    Same guest as `run_python` (environment, aarch64 TVM runtime on the path, no core files, dies
    with its parent). `popen_kwargs` go to `Popen` (stdout, stderr, text, start_new_session, ...;
    stdin defaults to /dev/null); `env` entries are added to the guest's environment. The caller
    owns the process: wait for it, or terminate it."""
    runtime = runtime or ensure_aarch64_runtime()
    qemu = find_qemu()
    check_qemu_cpu(qemu, qemu_cpu)
    cmd, env = guest_command(runtime, qemu, qemu_cpu, python_args, num_threads)
    env.update(popen_kwargs.pop("env", None) or {})
    popen_kwargs.setdefault("stdin", subprocess.DEVNULL)
    return subprocess.Popen(cmd, env=env, preexec_fn=child_setup, **popen_kwargs)


def run_aarch64(
    library_path: str | os.PathLike[str],
    inputs: Sequence[np.ndarray],
    qemu_cpu: str = DEFAULT_QEMU_CPU,
    runtime: Aarch64Runtime | None = None,
    timeout: float | None = DEFAULT_RUN_TIMEOUT_S,
    *,
    function: str = "main",
    num_threads: int | None = 1,
) -> list[np.ndarray]:
    """Run an aarch64 library (from `export_library`) on an emulated `qemu_cpu`; return outputs.

    The inputs are passed to `function` positionally; tuple results come back flattened, in
    order. The run goes through `runner.py`, the same script used on real devices.
    `num_threads` sets `TVM_NUM_THREADS` in the guest (1 keeps emulated runs cheap and stable;
    None leaves TVM's default). Raises `EmulationError` (a `DwsepError`) on SIGILL or any other
    failure, `DwsepError` for a missing library or host tool.
    """
    return run_aarch64_samples(library_path, [inputs], qemu_cpu, runtime, timeout,
                               function=function, num_threads=num_threads)[0]


def run_aarch64_samples(
    library_path: str | os.PathLike[str],
    samples: Sequence[Sequence[np.ndarray]],
    qemu_cpu: str = DEFAULT_QEMU_CPU,
    runtime: Aarch64Runtime | None = None,
    timeout: float | None = DEFAULT_RUN_TIMEOUT_S,
    *,
    function: str = "main",
    num_threads: int | None = 1,
) -> list[list[np.ndarray]]:
    """`run_aarch64` on several input sets in one guest (one emulated start-up and library
    load, which cost more than a small model's run); outputs per sample, in order."""
    library = Path(library_path).resolve()
    if not library.is_file():
        raise DwsepError(f"library not found: {library}")
    runtime = runtime or ensure_aarch64_runtime()
    qemu = find_qemu()
    check_qemu_cpu(qemu, qemu_cpu)
    with tempfile.TemporaryDirectory(prefix="dwsep-aarch64-") as tmp:
        outputs_npz = Path(tmp) / "outputs.npz"
        args = [str(RUNNER_SCRIPT), str(library)]
        for k, inputs in enumerate(samples):
            inputs_npz = Path(tmp) / f"inputs_{k}.npz"
            np.savez(inputs_npz, **{f"arg_{i}": np.ascontiguousarray(x)
                                    for i, x in enumerate(inputs)})
            args += ["--inputs", str(inputs_npz)]
        run_guest(
            runtime,
            qemu,
            qemu_cpu,
            args + ["--output", str(outputs_npz), "--function", function],
            timeout=timeout,
            what=f"aarch64 run of {library.name}",
            num_threads=num_threads,
        )
        with np.load(outputs_npz, allow_pickle=False) as data:
            if len(samples) == 1:
                return [[data[f"output_{i}"] for i in range(len(data.files))]]
            return [[data[key] for key in sorted(
                (k for k in data.files if k.startswith(f"sample_{s}_")),
                key=lambda k: int(k.rsplit("_", 1)[1]))] for s in range(len(samples))]


def cpu_features(qemu_cpu: str, runtime: Aarch64Runtime | None = None) -> set[str]:
    """Linux hwcap names (`fp`, `asimd`, `fphp`, `asimdhp`, `asimddp`, `i8mm`, `sve`, ...) that
    an aarch64 process sees on QEMU's `qemu_cpu` model, read with getauxval(AT_HWCAP/AT_HWCAP2)."""
    runtime = runtime or ensure_aarch64_runtime()
    qemu = find_qemu()
    check_qemu_cpu(qemu, qemu_cpu)
    proc = run_guest(
        runtime,
        qemu,
        qemu_cpu,
        [str(RUNNER_SCRIPT), "--features"],
        timeout=_FEATURES_TIMEOUT_S,
        what="hwcap probe",
    )
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    return decode_hwcaps(int(report["hwcap"]), int(report["hwcap2"]))


#: Linux hwcaps that code generated with an LLVM AArch64 feature needs at run time. Features that
#: only matter for intrinsics TVM never emits (crypto, ...) are left out.
MATTR_HWCAPS: dict[str, frozenset[str]] = {
    "+fp-armv8": frozenset({"fp"}),
    "+neon": frozenset({"fp", "asimd"}),
    "+fullfp16": frozenset({"fphp", "asimdhp"}),
    "+fp16fml": frozenset({"asimdfhm"}),
    "+dotprod": frozenset({"asimddp"}),
    "+i8mm": frozenset({"i8mm"}),
    "+bf16": frozenset({"bf16"}),
    "+sve": frozenset({"sve"}),
    "+sve2": frozenset({"sve2"}),
    "+lse": frozenset({"atomics"}),
    "+rdm": frozenset({"asimdrdm"}),
    "+rcpc": frozenset({"lrcpc"}),
    "+jsconv": frozenset({"jscvt"}),
    "+complxnum": frozenset({"fcma"}),
}


_V80 = ("+neon",)


_V82 = ("+neon", "+fullfp16", "+dotprod", "+lse", "+rdm", "+rcpc")


#: What LLVM enables for `-mcpu=<core>` (of the features above), for the cores we deploy to.
MCPU_MATTR: dict[str, tuple[str, ...]] = {
    "generic": _V80,
    "cortex-a35": _V80,
    "cortex-a53": _V80,
    "cortex-a57": _V80,
    "cortex-a72": _V80,
    "cortex-a73": _V80,
    "cortex-a55": _V82,
    "cortex-a75": _V82,
    "cortex-a76": _V82,
    "cortex-a77": _V82,
    "cortex-a78": _V82,
    "neoverse-n1": _V82,
}


def required_hwcaps(target: dict) -> set[str]:
    """Hwcaps an aarch64 TVM target dict (`{"kind": "llvm", "mattr": [...], "mcpu": ...}`, or a
    GPU target whose `host` is one) needs on the CPU it runs on. Features and cores not in
    `MATTR_HWCAPS` / `MCPU_MATTR` contribute nothing; `-feature` entries remove a feature."""
    if target.get("kind") != "llvm" and isinstance(target.get("host"), dict):
        target = target["host"]
    mattr = target.get("mattr", [])
    if isinstance(mattr, str):
        mattr = mattr.split(",")
    enabled = set(MCPU_MATTR.get(str(target.get("mcpu", "generic")), ()))
    for feature in mattr:
        feature = feature.strip()
        if feature.startswith("-"):
            enabled.discard("+" + feature[1:])
        elif feature:
            enabled.add(feature if feature.startswith("+") else "+" + feature)
    return set().union(*(MATTR_HWCAPS.get(feature, frozenset()) for feature in enabled))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dwsep_compiler.device.emulate",
        description="Prepare and inspect the qemu-aarch64 emulation used to test ARM builds.",
    )
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument(
        "--prepare", action="store_true", help="build (or find) the cached aarch64 runtime"
    )
    action.add_argument(
        "--list-cpus", action="store_true", help="list the CPU models qemu-aarch64 emulates"
    )
    action.add_argument(
        "--features", metavar="QEMU_CPU", help="print the hwcaps a QEMU CPU model reports"
    )
    action.add_argument(
        "--rpc-server",
        metavar="TRACKER",
        help="serve TVM RPC as an emulated aarch64 device registered at TRACKER (HOST:PORT), "
        "for dwsep-run --rpc-tracker TRACKER --rpc-key KEY",
    )
    parser.add_argument("--key", default="aarch64", help="--rpc-server: device key [aarch64]")
    parser.add_argument(
        "--qemu-cpu", default=DEFAULT_QEMU_CPU, help=f"--rpc-server: CPU model [{DEFAULT_QEMU_CPU}]"
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="--rpc-server: address to listen on [127.0.0.1]"
    )
    parser.add_argument("--port", type=int, default=9090, help="--rpc-server: first port [9090]")
    parser.add_argument(
        "--cache-dir", help="cache directory (default $DWSEP_CACHE_DIR or ~/.cache/dwsep-compiler)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        if args.list_cpus:
            print("\n".join(qemu_cpu_models()))
        elif args.features:
            runtime = ensure_aarch64_runtime(args.cache_dir)
            print(" ".join(sorted(cpu_features(args.features, runtime))))
        elif args.rpc_server:
            runtime = ensure_aarch64_runtime(args.cache_dir)
            server = popen_python(
                [str(RPC_SERVER_SCRIPT), "--tracker", args.rpc_server, "--key", args.key,
                 "--host", args.host, "--port", str(args.port), "--port-end",
                 str(args.port + 100)],
                args.qemu_cpu,
                runtime,
                num_threads=None,
            )
            try:
                return server.wait()
            except KeyboardInterrupt:
                server.terminate()
                server.wait()
                return 130
        else:
            cached = runtime_at(runtime_dir(args.cache_dir)) is not None
            started = time.monotonic()
            runtime = ensure_aarch64_runtime(args.cache_dir)
            elapsed = time.monotonic() - started
            manifest = json.loads((runtime.root.parent / READY_MARKER).read_text())
            how = (
                f"already built, in {manifest.get('build_seconds', '?')} s"
                if cached
                else f"built in {elapsed:.1f} s"
            )
            print(f"aarch64 runtime ready at {runtime.root.parent} ({how})")
            print(f"  root:   {runtime.root}")
            print(f"  site:   {runtime.site}")
            print(f"  python: {runtime.python}")
    except DwsepError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
