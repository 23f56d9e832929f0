"""The aarch64 Python root: Debian arm64 (debootstrap, minbase) with python3.11, the OpenCL ICD
loader (``ocl-icd-libopencl1``: the aarch64 build of our OpenCL runtime links and loads against
it) and the aarch64 ``apache-tvm`` runtime wheel, built once per (suite, Python, TVM, recipe) and cached under
``DWSEP_CACHE_DIR`` (default ``./.cache``). A build goes into a ``.build-*`` sibling and is
renamed into place only complete (`READY_MARKER`), under a lock, so that a killed or concurrent
build never leaves a half-built root in use.

Host tools (Debian package names; ``tests/run.sh`` installs them, this module never does)::

    apt-get install gcc-aarch64-linux-gnu g++-aarch64-linux-gnu libc6-dev-arm64-cross \\
        qemu-user-static debootstrap            # + fakeroot when the build is not run as root
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from dwsep_compiler.device.qemu import (DEFAULT_QEMU_CPU, Aarch64Runtime, child_setup, find_qemu,
                                        run_guest, which)
from dwsep_compiler.errors import DwsepError

logger = logging.getLogger(__name__)


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
_RECIPE = 2


_DEBOOTSTRAP_TIMEOUT_S = 1800.0


_PIP_TIMEOUT_S = 1800.0


READY_MARKER = "READY.json"


# Imports everything a `runner.py` run imports, so that the build leaves their .pyc files.
_SMOKE_TEST = (
    "import argparse, ctypes, json, re, numpy, tvm, tvm.runtime, tvm.runtime.vm; "
    "print(tvm.__version__)"
)


_BUILD_PREFIX = ".build-"


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


def runtime_dir(cache_dir: str | os.PathLike[str] | None) -> Path:
    base = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    return base / "aarch64" / _runtime_key()


def runtime_at(path: Path) -> Aarch64Runtime | None:
    """The runtime in `path` if a build finished there (its READY marker is written last)."""
    python = path / "root" / "usr" / "bin" / f"python{TARGET_PYTHON}"
    if (path / READY_MARKER).is_file() and python.is_file() and (path / "site" / "tvm").is_dir():
        return Aarch64Runtime(root=path / "root", site=path / "site", python=python)
    return None


def find_aarch64_runtime(cache_dir: str | os.PathLike[str] | None = None) -> Aarch64Runtime | None:
    """The cached aarch64 runtime if one was built (`ensure_aarch64_runtime`), else None:
    never builds (for checks that run only where emulation is already set up)."""
    return runtime_at(runtime_dir(cache_dir))


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
    final = runtime_dir(cache_dir)
    base = final.parent
    runtime = runtime_at(final)
    if runtime is not None:
        return runtime
    tools = check_build_tools()
    try:
        base.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DwsepError(f"cannot create cache directory {base}: {exc.strerror}") from None
    with _locked(base / ".lock"):
        runtime = runtime_at(final)  # another process may have built it while we waited
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
            build_root(build, mirror, tools)
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
            (build / READY_MARKER).write_text(json.dumps(manifest, indent=2) + "\n")
            if final.exists():  # a directory without READY: not ours, not complete
                _rmtree(final)
            os.rename(build, final)
        except BaseException:
            _rmtree(build)
            raise
    runtime = runtime_at(final)
    assert runtime is not None
    logger.info("aarch64 runtime ready in %s", final)
    return runtime


@dataclass(frozen=True)
class BuildTools:
    """The host tools a root build runs, found (or named as missing) before anything starts."""

    debootstrap: list[str]  # the command prefix (with fakeroot when not root)
    dpkg_deb: str
    qemu: str


def check_build_tools() -> BuildTools:
    """The tools `build_root` needs, or a `DwsepError` naming the apt package of the first
    missing one (checked before any download)."""
    qemu = find_qemu()
    debootstrap = which("debootstrap")
    if debootstrap is None:
        raise DwsepError("debootstrap not found: apt-get install debootstrap")
    dpkg_deb = which("dpkg-deb")
    if dpkg_deb is None:
        raise DwsepError("dpkg-deb not found: apt-get install dpkg")
    prefix: list[str] = []
    if os.geteuid() != 0:
        fakeroot = which("fakeroot")
        if fakeroot is None:
            raise DwsepError(
                "building the aarch64 root needs root or fakeroot: apt-get install fakeroot"
            )
        prefix = [fakeroot]
    if subprocess.run(
        [sys.executable, "-m", "pip", "--version"], capture_output=True, check=False
    ).returncode:
        raise DwsepError(f"pip is not available for {sys.executable}: python -m ensurepip")
    return BuildTools(debootstrap=[*prefix, debootstrap], dpkg_deb=dpkg_deb, qemu=qemu)


def build_root(build: Path, mirror: str, tools: BuildTools) -> None:
    """Debootstrap the arm64 root into ``build``, install the aarch64 wheels into its ``site``
    and smoke-test them under qemu (`ensure_aarch64_runtime` renames it into place after)."""
    root, site = build / "root", build / "site"
    step = _Stopwatch()
    logger.info("debootstrap %s (arm64, minbase + python3) from %s", DEBIAN_SUITE, mirror)
    _tool(
        [
            *tools.debootstrap,
            "--foreign",
            "--arch=arm64",
            "--variant=minbase",
            "--include=python3,ocl-icd-libopencl1",
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
    proc = run_guest(
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
            preexec_fn=child_setup,
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
