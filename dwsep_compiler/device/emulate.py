"""Run aarch64 TVM-compiled libraries on an x86_64 host under qemu-user, to check ARM artifacts.

What runs is real: the Debian arm64 `python3.11`, the aarch64 `apache-tvm` runtime wheel, and the
library exactly as it would be deployed, executed by `qemu-aarch64-static` with a pinned CPU model
(`-cpu cortex-a53`, `cortex-a76`, ...). A library compiled with features the pinned CPU lacks
(fp16 arithmetic, dot product) dies with SIGILL instead of silently passing.

The aarch64 userland is built once and cached (see `ensure_aarch64_runtime`); nothing needs root
inside it and binfmt_misc is not used: qemu is called directly with `-L ROOT`.

Host tools (Debian package names; `tests/install_test_deps.sh` installs them, this module never
does)::

    apt-get install gcc-aarch64-linux-gnu g++-aarch64-linux-gnu libc6-dev-arm64-cross \\
        qemu-user-static debootstrap            # + fakeroot when the build is not run as root

Command line: ``python -m dwsep_compiler.device.emulate --prepare`` builds (or finds) the cached root and
prints where it is and how long that took; ``--list-cpus`` and ``--features CPU`` help debugging.
``--rpc-server HOST:PORT [--key aarch64] [--qemu-cpu cortex-a53]`` serves TVM RPC as an emulated
aarch64 device registered at that tracker (`rpc_server.py` under qemu, see `popen_python`), for
``dwsep-run --rpc-tracker HOST:PORT --rpc-key aarch64``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from dwsep_compiler.device.runner import HWCAP2_BITS, HWCAP_BITS, decode_hwcaps
from dwsep_compiler.errors import DwsepError

__all__ = [
    "Aarch64Runtime",
    "EmulationError",
    "HWCAP_BITS",
    "HWCAP2_BITS",
    "MATTR_HWCAPS",
    "MCPU_MATTR",
    "REQUIRED_APT_PACKAGES",
    "RPC_SERVER_SCRIPT",
    "RUNNER_SCRIPT",
    "cpu_features",
    "debian_mirror",
    "decode_hwcaps",
    "default_cache_dir",
    "ensure_aarch64_runtime",
    "find_qemu",
    "popen_python",
    "qemu_cpu_models",
    "required_hwcaps",
    "run_aarch64",
    "run_python",
]

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

#: Debian release of the arm64 userland and the Python it ships (the TVM wheels must match it).
DEBIAN_SUITE = "bookworm"
TARGET_PYTHON = "3.11"
#: bookworm's glibc is 2.36: any manylinux wheel up to that runs. pip (23.x) does not expand a
#: PEP 600 tag to older ones by itself, so every accepted tag is passed explicitly.
_PIP_PLATFORMS = [f"manylinux_2_{minor}_aarch64" for minor in range(36, 16, -1)] + [
    "manylinux2014_aarch64"
]
DEFAULT_MIRROR = "http://deb.debian.org/debian"
#: Bump when the build recipe changes, so that old caches are not reused.
_RECIPE = 1

DEFAULT_QEMU_CPU = "cortex-a53"
DEFAULT_RUN_TIMEOUT_S = 600.0
_FEATURES_TIMEOUT_S = 120.0
_DEBOOTSTRAP_TIMEOUT_S = 1800.0
_PIP_TIMEOUT_S = 1800.0
_READY = "READY.json"
# Imports everything a `runner.py` run imports, so that the build leaves their .pyc files.
_SMOKE_TEST = (
    "import argparse, ctypes, json, re, numpy, tvm, tvm.runtime, tvm.runtime.vm; "
    "print(tvm.__version__)"
)
_BUILD_PREFIX = ".build-"


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


# ---------------------------------------------------------------------------------------------
# Host tools
# ---------------------------------------------------------------------------------------------


def _which(name: str) -> str | None:
    """`shutil.which`, also looking in the sbin directories a non-root PATH often lacks."""
    extra = os.pathsep.join(["/usr/local/sbin", "/usr/sbin", "/sbin"])
    return shutil.which(name) or shutil.which(name, path=extra)


def find_qemu() -> str:
    """Path of qemu-aarch64-static (or a dynamically linked qemu-aarch64), or a `DwsepError`."""
    qemu = _which("qemu-aarch64-static") or _which("qemu-aarch64")
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


def _check_qemu_cpu(qemu: str, qemu_cpu: str) -> None:
    models = _qemu_cpu_models(qemu)
    if qemu_cpu not in models:
        raise DwsepError(
            f"qemu-aarch64 has no CPU model '{qemu_cpu}' (available: {', '.join(models)})"
        )


# ---------------------------------------------------------------------------------------------
# Cache and Debian mirror
# ---------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """`$DWSEP_CACHE_DIR`, else `~/.cache/dwsep-compiler`."""
    env = os.environ.get("DWSEP_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "dwsep-compiler"


def _host_version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        raise DwsepError(f"{dist} is not installed on the host: pip install {dist}") from None


def _runtime_key() -> str:
    """Cache key: the guest must run the same TVM (runtime ABI) as the host compiles with."""
    tvm = _host_version("apache-tvm")
    ffi = _host_version("apache-tvm-ffi")
    return f"{DEBIAN_SUITE}-py{TARGET_PYTHON}-tvm{tvm}-ffi{ffi}-r{_RECIPE}"


def _apt_sources(apt_dir: Path) -> Iterator[tuple[str, list[str]]]:
    """(URI, suites) of every enabled binary (`deb`) source, in apt's reading order."""
    files = [apt_dir / "sources.list"]
    parts = apt_dir / "sources.list.d"
    if parts.is_dir():
        files += sorted(p for p in parts.iterdir() if p.suffix in (".list", ".sources"))
    for path in files:
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        if path.suffix == ".sources":
            yield from _deb822_sources(text)
        else:
            for line in text.splitlines():
                match = re.match(r"\s*deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+(\S+)", line)
                if match:
                    yield match.group(1), [match.group(2)]


def _deb822_sources(text: str) -> Iterator[tuple[str, list[str]]]:
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    for stanza in re.split(r"\n\s*\n", "\n".join(lines)):
        fields: dict[str, str] = {}
        key = None
        for line in stanza.splitlines():
            if line[:1] in (" ", "\t") and key is not None:  # continuation line
                fields[key] += " " + line.strip()
            elif ":" in line:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                fields[key] = value.strip()
        if "deb" not in fields.get("types", "").split():
            continue
        if fields.get("enabled", "yes").lower() in ("no", "false", "0"):
            continue
        for uri in fields.get("uris", "").split():
            yield uri, fields.get("suites", "").split()


def debian_mirror(apt_dir: str | os.PathLike[str] = "/etc/apt") -> str:
    """The Debian mirror to bootstrap from: `$DWSEP_DEBIAN_MIRROR`, else the http(s) mirror apt
    already uses for the `bookworm` suite, else deb.debian.org."""
    env = os.environ.get("DWSEP_DEBIAN_MIRROR")
    if env:
        return env.rstrip("/")
    for uri, suites in _apt_sources(Path(apt_dir)):
        if DEBIAN_SUITE in suites and uri.startswith(("http://", "https://")):
            return uri.rstrip("/")
    return DEFAULT_MIRROR


# ---------------------------------------------------------------------------------------------
# Building the aarch64 userland
# ---------------------------------------------------------------------------------------------


def _runtime_dir(cache_dir: str | os.PathLike[str] | None) -> Path:
    base = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    return base / "aarch64" / _runtime_key()


def _runtime_at(path: Path) -> Aarch64Runtime | None:
    """The runtime in `path` if a build finished there (its READY marker is written last)."""
    python = path / "root" / "usr" / "bin" / f"python{TARGET_PYTHON}"
    if (path / _READY).is_file() and python.is_file() and (path / "site" / "tvm").is_dir():
        return Aarch64Runtime(root=path / "root", site=path / "site", python=python)
    return None


def find_aarch64_runtime(cache_dir: str | os.PathLike[str] | None = None) -> Aarch64Runtime | None:
    """The cached aarch64 runtime if one was built (`ensure_aarch64_runtime`), else None:
    never builds (for checks that run only where emulation is already set up)."""
    return _runtime_at(_runtime_dir(cache_dir))


#: onnxruntime's aarch64 wheel that runs under QEMU 7.2 (1.31.1's segfaults at import); it
#: takes models of IR version 9 at most.
AARCH64_ONNXRUNTIME = "1.19.2"


def ensure_aarch64_onnxruntime(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """A directory holding onnxruntime's aarch64 wheel (`AARCH64_ONNXRUNTIME`, no
    dependencies: the runtime's numpy serves it), installed with pip on first use; for
    `run_python(..., python_path=[...])`. The reference the ARM benchmark compares with."""
    base = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    target = base / "aarch64" / f"onnxruntime-{AARCH64_ONNXRUNTIME}"
    if (target / "onnxruntime" / "__init__.py").is_file():
        return target
    tmp = target.with_name(target.name + f".{os.getpid()}.tmp")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--only-binary=:all:",
         "--platform", "manylinux_2_28_aarch64", "--python-version", TARGET_PYTHON,
         "--implementation", "cp", "--target", str(tmp),
         f"onnxruntime=={AARCH64_ONNXRUNTIME}"], capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        _rmtree(tmp)
        lines = proc.stderr.strip().splitlines()
        raise DwsepError(f"pip could not fetch onnxruntime {AARCH64_ONNXRUNTIME} for aarch64: "
                         f"{lines[-1] if lines else 'no output'}")
    os.replace(tmp, target)
    return target


def ensure_aarch64_runtime(cache_dir: str | os.PathLike[str] | None = None) -> Aarch64Runtime:
    """Return the cached aarch64 runtime, building it first if needed (about a minute, network).

    Layout: `<cache_dir>/aarch64/<key>/{root,site,READY.json}` with `cache_dir` defaulting to
    `default_cache_dir()` and `key` naming the Debian suite, Python and host TVM versions.
    Building happens in a `.build-*` sibling that is renamed into place only once complete and
    smoke-tested, under a file lock; leftovers of killed builds are removed by the next build.
    Raises `DwsepError` naming the missing tool when the host cannot build it.
    """
    final = _runtime_dir(cache_dir)
    base = final.parent
    runtime = _runtime_at(final)
    if runtime is not None:
        return runtime
    tools = _check_build_tools()
    try:
        base.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DwsepError(f"cannot create cache directory {base}: {exc.strerror}") from None
    with _locked(base / ".lock"):
        runtime = _runtime_at(final)  # another process may have built it while we waited
        if runtime is not None:
            return runtime
        for stale in base.glob(_BUILD_PREFIX + "*"):  # we hold the lock: nobody is building
            logger.info("removing leftover of an interrupted build: %s", stale)
            try:
                _rmtree(stale)
            except OSError as exc:  # best effort: a .build-* directory is never used anyway
                logger.warning("could not remove %s: %s", stale, exc)
        build = Path(tempfile.mkdtemp(prefix=f"{_BUILD_PREFIX}{final.name}-", dir=base))
        try:
            build.chmod(0o755)  # mkdtemp makes it private; the runtime is for every user
            started = time.monotonic()
            mirror = debian_mirror()
            _build(build, mirror, tools)
            manifest = {
                "key": final.name,
                "debian_suite": DEBIAN_SUITE,
                "mirror": mirror,
                "python": TARGET_PYTHON,
                "apache-tvm": _host_version("apache-tvm"),
                "apache-tvm-ffi": _host_version("apache-tvm-ffi"),
                "build_seconds": round(time.monotonic() - started, 1),
                "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
            (build / _READY).write_text(json.dumps(manifest, indent=2) + "\n")
            if final.exists():  # a directory without READY: not ours, not complete
                _rmtree(final)
            os.rename(build, final)
        except BaseException:
            _rmtree(build)
            raise
    runtime = _runtime_at(final)
    assert runtime is not None
    logger.info("aarch64 runtime ready in %s", final)
    return runtime


@dataclass(frozen=True)
class _BuildTools:
    debootstrap: list[str]  # the command prefix (with fakeroot when not root)
    dpkg_deb: str
    qemu: str


def _check_build_tools() -> _BuildTools:
    qemu = find_qemu()
    debootstrap = _which("debootstrap")
    if debootstrap is None:
        raise DwsepError("debootstrap not found: apt-get install debootstrap")
    dpkg_deb = _which("dpkg-deb")
    if dpkg_deb is None:
        raise DwsepError("dpkg-deb not found: apt-get install dpkg")
    prefix: list[str] = []
    if os.geteuid() != 0:
        fakeroot = _which("fakeroot")
        if fakeroot is None:
            raise DwsepError(
                "building the aarch64 root needs root or fakeroot: apt-get install fakeroot"
            )
        prefix = [fakeroot]
    if subprocess.run(
        [sys.executable, "-m", "pip", "--version"], capture_output=True, check=False
    ).returncode:
        raise DwsepError(f"pip is not available for {sys.executable}: python -m ensurepip")
    return _BuildTools(debootstrap=[*prefix, debootstrap], dpkg_deb=dpkg_deb, qemu=qemu)


def _build(build: Path, mirror: str, tools: _BuildTools) -> None:
    root, site = build / "root", build / "site"
    step = _Stopwatch()
    logger.info("debootstrap %s (arm64, minbase + python3) from %s", DEBIAN_SUITE, mirror)
    _tool(
        [
            *tools.debootstrap,
            "--foreign",
            "--arch=arm64",
            "--variant=minbase",
            "--include=python3",
            DEBIAN_SUITE,
            str(root),
            mirror,
        ],
        what="debootstrap",
        timeout=_DEBOOTSTRAP_TIMEOUT_S,
    )
    # The first stage only unpacked the essential packages; unpack the rest (python3 among them)
    # without running any arm64 maintainer script.
    archives = root / "var" / "cache" / "apt" / "archives"
    debs = sorted(archives.glob("*.deb"))
    logger.info("  %.1f s; unpacking %d packages", step.lap(), len(debs))
    for deb in debs:
        _tool([tools.dpkg_deb, "-x", str(deb), str(root)], what=f"dpkg-deb -x {deb.name}")
    python = root / "usr" / "bin" / f"python{TARGET_PYTHON}"
    if not python.is_file():
        found = sorted(p.name for p in (root / "usr" / "bin").glob("python3*"))
        raise DwsepError(
            f"Debian {DEBIAN_SUITE} arm64 root has no python{TARGET_PYTHON} "
            f"(found: {', '.join(found) or 'none'})"
        )
    for deb in debs:
        deb.unlink()
    for junk in ("debootstrap", "usr/share/doc", "usr/share/man", "usr/share/info",
                 "usr/share/locale"):
        _rmtree(root / junk)

    tvm, ffi = _host_version("apache-tvm"), _host_version("apache-tvm-ffi")
    logger.info("  %.1f s; pip: aarch64 apache-tvm==%s, ffi==%s, numpy", step.lap(), tvm, ffi)
    platforms = [arg for tag in _PIP_PLATFORMS for arg in ("--platform", tag)]
    pip_env = {
        k: v for k, v in os.environ.items() if k not in ("PIP_USER", "PIP_TARGET", "PIP_PREFIX")
    }
    _tool(
        [
            sys.executable, "-m", "pip", "install", "--target", str(site), *platforms,
            "--python-version", TARGET_PYTHON, "--implementation", "cp",
            "--abi", "cp" + TARGET_PYTHON.replace(".", ""), "--only-binary=:all:",
            "--no-input", "--disable-pip-version-check", "--no-warn-script-location",
            f"apache-tvm=={tvm}", f"apache-tvm-ffi=={ffi}", "numpy",
        ],
        what="pip install (aarch64 wheels)",
        timeout=_PIP_TIMEOUT_S,
        env=pip_env,
    )
    # The guest only ever loads the runtime: drop the ~240 MB compiler library (tvm falls back to
    # runtime-only mode without it) and the x86 console scripts.
    for junk in ("tvm/lib/libtvm_compiler.so", "bin"):
        _rmtree(site / junk)

    # Smoke test, which also writes the .pyc files of everything a run imports (cold imports
    # under emulation cost seconds per run otherwise).
    logger.info("  %.1f s; smoke test under qemu", step.lap())
    runtime = Aarch64Runtime(root=root, site=site, python=python)
    proc = _run_guest(
        runtime,
        tools.qemu,
        DEFAULT_QEMU_CPU,
        ["-c", _SMOKE_TEST],
        timeout=600,
        what="aarch64 python smoke test",
    )
    if proc.stdout.split()[-1:] != [tvm]:
        raise DwsepError(f"aarch64 smoke test printed {proc.stdout.strip()!r}, expected {tvm}")
    logger.info("  %.1f s", step.lap())


class _Stopwatch:
    def __init__(self) -> None:
        self._last = time.monotonic()

    def lap(self) -> float:
        """Seconds since the previous lap (or creation)."""
        now = time.monotonic()
        elapsed, self._last = now - self._last, now
        return elapsed


def _tool(
    cmd: Sequence[str],
    *,
    what: str,
    timeout: float | None = None,
    env: dict[str, str] | None = None,
) -> str:
    """Run a host build tool; on failure raise a `DwsepError` with its most telling line."""
    try:
        proc = subprocess.run(
            list(cmd),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            errors="replace",
            timeout=timeout,
            env=env,
            preexec_fn=_child_setup,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise DwsepError(f"{what} timed out after {timeout:g} s") from None
    if proc.returncode != 0:
        lines = [line.strip() for line in proc.stdout.splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith(("E:", "ERROR:", "error:"))]
        detail = (errors or lines or ["no output"])[-1]
        raise DwsepError(f"{what} failed (exit {proc.returncode}): {detail}")
    return proc.stdout


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive `flock` on `path` (released if the process dies)."""
    import fcntl  # POSIX only; keep the module importable elsewhere

    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _rmtree(path: Path) -> None:
    """Remove a file or tree, including read-only directories a non-root build leaves."""
    if path.is_symlink() or path.is_file():
        path.unlink()
        return
    if not path.exists():
        return

    def make_writable(func, target, _exc_info):  # type: ignore[no-untyped-def]
        os.chmod(os.path.dirname(target), 0o755)
        with contextlib.suppress(FileNotFoundError):
            func(target)

    shutil.rmtree(path, onerror=make_writable)


# ---------------------------------------------------------------------------------------------
# Running under qemu
# ---------------------------------------------------------------------------------------------


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


def _child_setup() -> None:
    """In the child, before exec: no core files (a SIGILL under qemu would write one), and
    die with the parent rather than linger when a test run is killed (Linux)."""
    import ctypes
    import resource

    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    with contextlib.suppress(Exception):
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _guest_command(
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


def _run_guest(
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
    cmd, env = _guest_command(runtime, qemu, qemu_cpu, python_args, num_threads, qemu_args,
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
            preexec_fn=_child_setup,
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
    _check_qemu_cpu(qemu, qemu_cpu)
    return _run_guest(
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
    _check_qemu_cpu(qemu, qemu_cpu)
    cmd, env = _guest_command(runtime, qemu, qemu_cpu, python_args, num_threads)
    env.update(popen_kwargs.pop("env", None) or {})
    popen_kwargs.setdefault("stdin", subprocess.DEVNULL)
    return subprocess.Popen(cmd, env=env, preexec_fn=_child_setup, **popen_kwargs)


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
    _check_qemu_cpu(qemu, qemu_cpu)
    with tempfile.TemporaryDirectory(prefix="dwsep-aarch64-") as tmp:
        outputs_npz = Path(tmp) / "outputs.npz"
        args = [str(RUNNER_SCRIPT), str(library)]
        for k, inputs in enumerate(samples):
            inputs_npz = Path(tmp) / f"inputs_{k}.npz"
            np.savez(inputs_npz, **{f"arg_{i}": np.ascontiguousarray(x)
                                    for i, x in enumerate(inputs)})
            args += ["--inputs", str(inputs_npz)]
        _run_guest(
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
    _check_qemu_cpu(qemu, qemu_cpu)
    proc = _run_guest(
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


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


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
            cached = _runtime_at(_runtime_dir(args.cache_dir)) is not None
            started = time.monotonic()
            runtime = ensure_aarch64_runtime(args.cache_dir)
            elapsed = time.monotonic() - started
            manifest = json.loads((runtime.root.parent / _READY).read_text())
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
