"""qemu-user as the aarch64 machine: find it, check a CPU model, run a guest program.

A guest runs the Debian arm64 userland of `aarch64_root` (``qemu-aarch64 -L ROOT``, no root and
no binfmt_misc) with a pinned CPU model (``-cpu cortex-a53`` ...): code using features the model
lacks dies with SIGILL, reported by `EmulationError` as one line.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from dwsep_compiler.errors import DwsepError

logger = logging.getLogger(__name__)


DEFAULT_QEMU_CPU = "cortex-a53"


DEFAULT_RUN_TIMEOUT_S = 600.0


class EmulationError(DwsepError):
    """An aarch64 program failed under qemu: a signal (SIGILL, ...), a non-zero exit, a timeout.

    The message is one line; the guest's stderr is kept in `stderr` for debugging.
    """

    def __init__(
        self,
        message: str,
        *,
        returncode: int | None = None,
        signal_name: str | None = None,
        stderr: str = "",
    ) -> None:
        super().__init__(message)
        self.returncode = returncode
        self.signal_name = signal_name
        self.stderr = stderr


@dataclass(frozen=True)
class Aarch64Runtime:
    """A built arm64 userland: `root` (Debian bookworm minbase), `site` (aarch64 wheels) and
    `python` (the arm64 interpreter inside `root`, run via `qemu-aarch64-static -L root`)."""

    root: Path
    site: Path
    python: Path


def which(name: str) -> str | None:
    """`shutil.which`, also looking in the sbin directories a non-root PATH often lacks."""
    extra = os.pathsep.join(["/usr/local/sbin", "/usr/sbin", "/sbin"])
    return shutil.which(name) or shutil.which(name, path=extra)


def find_qemu() -> str:
    """Path of qemu-aarch64-static (or a dynamically linked qemu-aarch64), or a `DwsepError`."""
    qemu = which("qemu-aarch64-static") or which("qemu-aarch64")
    if qemu is None:
        raise DwsepError("qemu-aarch64-static not found: apt-get install qemu-user-static")
    return qemu


@cache
def _qemu_cpu_models(qemu: str) -> tuple[str, ...]:
    proc = subprocess.run(
        [qemu, "-cpu", "help"], capture_output=True, text=True, timeout=60, check=False
    )
    lines = proc.stdout.splitlines()
    models = [
        line.split()[0] for line in lines[1:] if line.startswith((" ", "\t")) and line.strip()
    ]
    if not models:  # (qemu 7.2 exits with status 1 after printing the list)
        raise DwsepError(f"could not list CPU models with '{qemu} -cpu help'")
    return tuple(models)


def qemu_cpu_models(qemu: str | None = None) -> list[str]:
    """CPU models this qemu-aarch64 emulates (`-cpu help`), e.g. cortex-a53, cortex-a76, max."""
    return list(_qemu_cpu_models(qemu or find_qemu()))


def check_qemu_cpu(qemu: str, qemu_cpu: str) -> None:
    models = _qemu_cpu_models(qemu)
    if qemu_cpu not in models:
        raise DwsepError(
            f"qemu-aarch64 has no CPU model '{qemu_cpu}' (available: {', '.join(models)})"
        )


def _guest_env(runtime: Aarch64Runtime, num_threads: int | None,
               python_path: Sequence[str] = ()) -> dict[str, str]:
    """Host environment minus what would leak into the guest (x86 preloads, host Python and TVM
    settings, stray QEMU_* options), plus the guest's own settings."""
    drop_prefixes = ("QEMU_", "PYTHON", "TVM_")
    drop = {"LD_PRELOAD", "LD_LIBRARY_PATH"}
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(drop_prefixes) and k not in drop
    }
    env["PYTHONPATH"] = os.pathsep.join([str(runtime.site), *map(str, python_path)])
    env["PYTHONNOUSERSITE"] = "1"
    env["TVM_USE_RUNTIME_LIB"] = "1"
    if num_threads is not None:
        env["TVM_NUM_THREADS"] = str(num_threads)
    return env


def child_setup() -> None:
    """In the child, before exec: no core files (a SIGILL under qemu would write one), and
    die with the parent rather than linger when a test run is killed (Linux)."""
    import ctypes
    import resource

    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    with contextlib.suppress(Exception):
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def guest_command(
    runtime: Aarch64Runtime,
    qemu: str,
    qemu_cpu: str,
    python_args: Sequence[str],
    num_threads: int | None,
    qemu_args: Sequence[str] = (),
    python_path: Sequence[str] = (),
) -> tuple[list[str], dict[str, str]]:
    """The qemu command line and environment that run the arm64 python with `python_args`."""
    # -P: the script's directory (this package) must not shadow modules in the guest.
    cmd = [qemu, *qemu_args, "-L", str(runtime.root), "-cpu", qemu_cpu, str(runtime.python),
           "-P", "-X", "faulthandler", *python_args]
    env = _guest_env(runtime, num_threads, python_path)
    env["QEMU_CPU"] = qemu_cpu  # same as -cpu; set too so that child processes agree
    return cmd, env


def run_guest(
    runtime: Aarch64Runtime,
    qemu: str,
    qemu_cpu: str,
    python_args: Sequence[str],
    *,
    timeout: float | None,
    what: str,
    num_threads: int | None = 1,
    qemu_args: Sequence[str] = (),
    python_path: Sequence[str] = (),
) -> subprocess.CompletedProcess[str]:
    """Run the arm64 python with `python_args` under qemu on `qemu_cpu`; raise `EmulationError`
    on a signal, a non-zero exit or a timeout."""
    cmd, env = guest_command(runtime, qemu, qemu_cpu, python_args, num_threads, qemu_args,
                              python_path)
    try:
        proc = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            errors="replace",
            env=env,
            stdin=subprocess.DEVNULL,
            timeout=timeout,
            preexec_fn=child_setup,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise EmulationError(
            f"{what} on QEMU cpu {qemu_cpu} timed out after {timeout:g} s",
            stderr=_text(exc.stderr),
        ) from None
    if proc.returncode == 0:
        return proc
    signal_name = _signal_name(proc.returncode, proc.stderr)
    if signal_name is not None:
        raise EmulationError(
            f"{what} on QEMU cpu {qemu_cpu} died with {signal_name} ({_describe(signal_name)})",
            returncode=proc.returncode,
            signal_name=signal_name,
            stderr=proc.stderr,
        )
    lines = [line.strip() for line in proc.stderr.splitlines() if line.strip()]
    raise EmulationError(
        f"{what} on QEMU cpu {qemu_cpu} failed (exit {proc.returncode}): "
        f"{lines[-1] if lines else 'no error output'}",
        returncode=proc.returncode,
        stderr=proc.stderr,
    )


def _text(data: str | bytes | None) -> str:
    if data is None:
        return ""
    return data.decode(errors="replace") if isinstance(data, bytes) else data


def _signal_name(returncode: int, stderr: str) -> str | None:
    """The signal that ended the guest: qemu re-raises it on itself (negative return code) and
    prints `qemu: uncaught target signal N (...)`."""
    number = -returncode if returncode < 0 else None
    if number is None:
        match = re.search(r"uncaught target signal (\d+)", stderr)
        number = int(match.group(1)) if match else None
    if number is None:
        return None
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _describe(signal_name: str) -> str:
    if signal_name == "SIGILL":
        return (
            "illegal instruction: the library uses an instruction this CPU model does not "
            "implement; check the target's mattr against the CPU"
        )
    if signal_name == "SIGKILL":
        return "killed, possibly out of memory"
    try:
        return (signal.strsignal(signal.Signals[signal_name]) or signal_name).lower()
    except KeyError:
        return "unknown signal"
