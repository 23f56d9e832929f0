"""ARM speed without a board: what the emulated core executes per inference, per kernel.

A QEMU TCG plugin (`profile_plugin.c`, compiled with the machine's gcc at first use and cached
like the aarch64 root) counts, for every translated block of the guest, its executions and, with
``memory``, its loads and stores and the misses of a cache model (64-byte lines, L1 64 KB
4-way, L2 512 KB 8-way, LRU). Blocks are mapped through the guest's ``/proc/self/maps`` to the
shared library they belong to and, through its symbol table, to a function: a TVM library's
kernels are symbols of ``model.so``. The library runs once and eleven times in two guests; the
difference over ten is one inference, start-up and loading cancel out.

A proxy, not a timing: instruction counts are exact and deterministic, but there are no
pipeline stalls, no real memory latencies, and the cache model has no prefetcher; a
memory-bound kernel (depthwise) shows up in its misses rather than its instructions.

Needs Debian's dynamic ``qemu-aarch64`` (package ``qemu-user``; the static one cannot load
plugins), gcc, and ``aarch64-linux-gnu-nm`` (binutils of the cross toolchain).
"""

from __future__ import annotations

import bisect
import hashlib
import os
import subprocess
import tempfile
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Sequence

import numpy as np

from dwsep_compiler.device import aarch64_root, emulate, qemu
from dwsep_compiler.errors import DwsepError, first_line

PLUGIN_SOURCE = Path(__file__).with_name("profile_plugin.c")
NEON_FP32_LANES = 4  # one FMLA on 128-bit vectors: 4 multiply-accumulates
NEON_FP16_LANES = 8  # ARMv8.2 +fullfp16: 8 half-precision multiply-accumulates per FMLA
DEFAULT_RUNS = 11
# What an inference runs outside the model library: the TVM runtime (the VM, the workspace pool,
# the thread pool), the C library and the dynamic loader (thread-local lookups).
RUNTIME_LIBRARIES = ("libtvm_runtime.so", "libtvm_ffi.so", "libc.so", "libm.so",
                     "libstdc++.so", "libgcc_s.so", "libgomp.so", "ld-linux")


@dataclass
class Counts:
    """What a region of code did (per inference once differenced)."""

    instructions: float = 0
    loads: float = 0
    stores: float = 0
    load_bytes: float = 0
    store_bytes: float = 0
    l1_misses: float = 0
    l2_misses: float = 0

    def add(self, other: Counts, scale: float = 1.0) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + scale * getattr(other, f.name))

    def as_dict(self) -> dict:
        return {f.name: round(getattr(self, f.name), 1) for f in fields(self)}


@dataclass
class Profile:
    """Per inference: ``regions`` maps ``(library, symbol)`` to its counts (symbol None: the
    library's code outside any symbol), sorted by instructions; ``macs`` when known."""

    cpu: str
    regions: dict[tuple[str, str | None], Counts]
    library: str
    macs: int | None = None
    notes: list[str] = field(default_factory=list)
    kernel_macs: dict[str, int] = field(default_factory=dict)  # PrimFunc -> MACs of all its calls
    lanes: int = NEON_FP32_LANES  # MACs per FMLA at the floor (8 for an fp16 library)

    def total(self, library: str | None = None) -> Counts:
        out = Counts()
        for (lib, _), counts in self.regions.items():
            if library is None or lib == library:
                out.add(counts)
        return out

    def kernels(self) -> list[tuple[str, Counts]]:
        """The model library's kernels by PrimFunc name (a kernel's ``__tvm_ffi_`` entry and
        its ``_compute_`` body together), most instructions first."""
        merged: dict[str, Counts] = {}
        for (lib, symbol), c in self.regions.items():
            if lib == self.library:
                merged.setdefault(kernel_name(symbol), Counts()).add(c)
        return sorted(merged.items(), key=lambda row: -row[1].instructions)

    def runtime(self) -> list[tuple[str, str | None, Counts]]:
        """``(library file name, symbol, counts)`` in `RUNTIME_LIBRARIES`, most instructions
        first: what the inference costs outside the model library."""
        rows = [(os.path.basename(lib), symbol, c) for (lib, symbol), c in self.regions.items()
                if os.path.basename(lib).startswith(RUNTIME_LIBRARIES)]
        return sorted(rows, key=lambda row: -row[2].instructions)

    def as_dict(self) -> dict:
        return {"cpu": self.cpu, "library": self.library, "macs": self.macs,
                "total": self.total().as_dict(), "library_total": self.total(self.library).as_dict(),
                "kernels": [{"name": n, "macs": self.kernel_macs.get(n), **c.as_dict()}
                            for n, c in self.kernels()],
                "libraries": {lib: self.total(lib).as_dict()
                              for lib in sorted({lib for lib, _ in self.regions})},
                "runtime": [{"library": lib, "symbol": symbol, **c.as_dict()}
                            for lib, symbol, c in self.runtime()[:20]],
                "notes": self.notes}

    def table(self, top: int = 20) -> str:
        """Per kernel and in total, per inference (what ``dwsep-run --emulate --profile``
        prints)."""
        lib = self.total(self.library)
        whole = self.total()
        lines = [f"per inference on emulated {self.cpu} (instruction counts; a proxy, not a "
                 "timing: no stalls, modelled caches)",
                 f"{'kernel':<44} {'instr':>11} {'share':>6} {'loads':>10} {'stores':>9} "
                 f"{'L1 miss':>8} {'L2 miss':>8} {'MACs':>10} {'MAC/ins':>7} {'x floor':>7}"]
        for name, c in self.kernels()[:top]:
            share = c.instructions / lib.instructions if lib.instructions else 0.0
            macs = self.kernel_macs.get(name)
            per = f"{macs / c.instructions:>7.2f}" if macs and c.instructions else f"{'':>7}"
            floor = (f"{c.instructions / (macs / self.lanes):>7.2f}" if macs
                     else f"{'':>7}")
            lines.append(f"{name[:44]:<44} {c.instructions:>11.0f} {share:>6.1%} "
                         f"{c.loads:>10.0f} {c.stores:>9.0f} {c.l1_misses:>8.0f} "
                         f"{c.l2_misses:>8.0f} {macs or '':>10} {per} {floor}")
        lines.append(f"{os.path.basename(self.library) + ' total':<44} {lib.instructions:>11.0f} "
                     f"{'':>6} {lib.loads:>10.0f} {lib.stores:>9.0f} {lib.l1_misses:>8.0f} "
                     f"{lib.l2_misses:>8.0f}")
        runtime = self.runtime()
        if runtime:
            spent = sum(c.instructions for _, _, c in runtime)
            most = ", ".join(f"{symbol or '?'} ({lib}) {c.instructions:.3g}"
                             for lib, symbol, c in runtime[:3])
            lines.append(f"{'TVM runtime, libc, loader':<44} {spent:>11.0f}   most: {most}")
        lines.append(f"{'whole process':<44} {whole.instructions:>11.0f}")
        if self.macs:
            floor = self.macs / self.lanes
            kind = "fp16" if self.lanes == NEON_FP16_LANES else "fp32"
            lines.append(f"MACs {self.macs:.4g}: NEON {kind} floor (one {self.lanes}-lane FMLA "
                         f"per {self.lanes} MACs) "
                         f"{floor:.4g} instructions; the library executes "
                         f"{lib.instructions / floor:.2f}x the floor, "
                         f"{self.macs / max(lib.instructions, 1):.2f} MACs per instruction")
        lines.extend(self.notes)
        return "\n".join(lines)


def kernel_name(symbol: str | None) -> str:
    """The PrimFunc a TVM library symbol belongs to (``__tvm_ffi_X`` and ``X_compute_``: X)."""
    if symbol is None:
        return "[no symbol]"
    if symbol.startswith("__tvm_ffi_"):
        symbol = symbol[len("__tvm_ffi_"):]
    if symbol.endswith("_compute_"):
        symbol = symbol[:-len("_compute_")]
    return symbol


def kernel_macs(mod, target) -> dict[str, int]:
    """Multiply-accumulates per inference of each PrimFunc of a Relax module as the CPU
    pipeline legalizes it for ``target``: each reduction block (conv, matmul) does one per point
    of its iteration space, times the calls to that PrimFunc (structurally equal kernels, the
    repeated blocks of a ResNet stage, are one PrimFunc called several times)."""
    from tvm import s_tir, tirx

    from dwsep_compiler.tuning.tasks import legalized

    lowered = legalized(mod, target)
    calls = kernel_calls(lowered)
    out = {}
    for gvar, func in lowered.functions_items():
        if not isinstance(func, tirx.PrimFunc):
            continue
        sch = s_tir.Schedule(func)
        total = 0
        for block in sch.get_child_blocks(sch.get_sblock("root")):
            name = sch.get(block).name_hint
            if not any(k in name for k in ("conv", "matmul", "dense", "depthwise", "pointwise")):
                continue
            iters = sch.get(block).iter_vars
            if any(int(iv.iter_type) == 2 for iv in iters):  # a reduction: one MAC per point
                total += int(np.prod([int(iv.dom.extent) for iv in iters]))
        if total:
            out[gvar.name_hint] = total * calls.get(gvar.name_hint, 1)
    return out


def kernel_calls(mod) -> dict[str, int]:
    """How many times the Relax functions of ``mod`` call each of its PrimFuncs per run."""
    import tvm
    from tvm import relax, tirx

    prims = {gvar.name_hint for gvar, func in mod.functions_items()
             if isinstance(func, tirx.PrimFunc)}
    calls: dict[str, int] = {}

    def visit(expr):
        if isinstance(expr, relax.Call):
            for arg in [expr.op, *expr.args]:
                if isinstance(arg, tvm.ir.GlobalVar) and arg.name_hint in prims:
                    calls[arg.name_hint] = calls.get(arg.name_hint, 0) + 1

    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func.body, visit)
    return calls


# --- the plugin ---------------------------------------------------------------------------------

def plugin_qemu() -> str:
    """The dynamically linked qemu-aarch64 (TCG plugins), or a one-line `DwsepError`."""
    for path in ("/usr/bin/qemu-aarch64", "/usr/local/bin/qemu-aarch64"):
        if os.access(path, os.X_OK):
            return path
    raise DwsepError("qemu-aarch64 that loads TCG plugins not found (the static "
                     "qemu-aarch64-static cannot): apt-get install qemu-user")


def plugin_library(cache_dir: str | os.PathLike | None = None) -> Path:
    """The compiled plugin, built with gcc into the cache on first use (keyed by its source)."""
    source = PLUGIN_SOURCE.read_bytes()
    key = hashlib.sha256(source).hexdigest()[:16]
    base = Path(cache_dir) if cache_dir else aarch64_root.default_cache_dir()
    path = base / "profiler" / f"plugin-{key}.so"
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    try:
        subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-fvisibility=hidden", "-o", str(tmp),
                        str(PLUGIN_SOURCE)], check=True, capture_output=True, text=True,
                       timeout=120)
    except FileNotFoundError:
        raise DwsepError("gcc not found (it compiles the profiling plugin): apt-get install "
                         "gcc") from None
    except subprocess.CalledProcessError as exc:
        raise DwsepError(f"compiling the profiling plugin failed: {first_line(exc.stderr)}") \
            from None
    os.replace(tmp, path)
    return path


def plugin_args(out: str | os.PathLike, memory: bool) -> list[str]:
    """qemu options that load the plugin writing its blocks to ``out``."""
    spec = f"{plugin_library()},out={out}" + (",mem=on" if memory else "")
    return ["-plugin", spec, "-d", "plugin"]


# --- reading what it wrote ----------------------------------------------------------------------

def read_blocks(path: str | os.PathLike) -> dict[int, Counts]:
    """The plugin's output summed by block address: totals executed over the whole run."""
    blocks: dict[int, Counts] = {}
    with open(path) as handle:
        for line in handle:
            vaddr, insns, execs, loads, stores, lb, sb, l1, l2 = line.split()
            c = blocks.setdefault(int(vaddr, 16), Counts())
            c.add(Counts(int(insns) * int(execs), int(loads), int(stores), int(lb), int(sb),
                         int(l1), int(l2)))
    return blocks


@dataclass(frozen=True)
class Mapping:
    start: int
    end: int
    base: int  # where the file's ELF address 0 is (its offset-0 mapping): ELF = vaddr - base
    path: str


def read_maps(text: str) -> list[Mapping]:
    """Executable file mappings of ``/proc/self/maps``, each with its file's load base."""
    rows, bases = [], {}
    for line in text.splitlines():
        parts = line.split(None, 5)
        if len(parts) < 6 or not parts[5].startswith("/"):
            continue
        start, end = (int(v, 16) for v in parts[0].split("-"))
        path = parts[5].strip()
        if int(parts[2], 16) == 0:
            bases[path] = min(bases.get(path, start), start)
        if "x" in parts[1]:
            rows.append((start, end, path))
    return sorted((Mapping(start, end, bases.get(path, start), path)
                   for start, end, path in rows), key=lambda m: m.start)


def _nm(path: str, dynamic: bool) -> str:
    nm = "aarch64-linux-gnu-nm" if _exists("aarch64-linux-gnu-nm") else "nm"
    try:
        return subprocess.run([nm, "--defined-only", "-S", "-C", *(["-D"] if dynamic else []),
                               path], capture_output=True, text=True, timeout=120).stdout
    except FileNotFoundError:
        raise DwsepError("aarch64-linux-gnu-nm not found: apt-get install "
                         "binutils-aarch64-linux-gnu") from None


def symbol_table(path: str) -> tuple[list[int], list[tuple[int, str]]]:
    """Function symbols of an aarch64 ELF file: (sorted start addresses, [(end, name)]), each
    symbol's code running to the next symbol. A stripped shared library (the TVM runtime of
    the wheel) has only its exported functions: its internal code then counts under the
    exported function before it, a coarse but telling attribution (what showed the runtime's
    workspace pool called on every tile)."""
    rows = _symbol_rows(_nm(path, dynamic=False)) or _symbol_rows(_nm(path, dynamic=True))
    # A symbol owns the code up to the next one, whatever its recorded size: a TVM kernel's
    # parallel loop body is an unnamed function placed right after its ``*_compute_`` symbol.
    ends = []
    for i, (start, end, name) in enumerate(rows):
        following = rows[i + 1][0] if i + 1 < len(rows) else max(end or 0, start + 1)
        ends.append((following, name))
    return [r[0] for r in rows], ends


def _symbol_rows(listing: str) -> list[tuple[int, int | None, str]]:
    """``(start, end or None, name)`` of the function symbols in an ``nm -S`` listing."""
    rows = []
    for line in listing.splitlines():
        parts = line.split(None, 3)
        if len(parts) == 4 and parts[2].lower() in ("t", "w"):
            start, size = int(parts[0], 16), int(parts[1], 16)
            rows.append((start, start + size, parts[3]))
        elif len(parts) == 3 and parts[1].lower() in ("t", "w"):  # no size (TVM's kernels)
            rows.append((int(parts[0], 16), None, parts[2]))
    rows.sort(key=lambda r: r[0])
    return rows


def attribute(blocks: dict[int, Counts], maps: list[Mapping],
              symbolize: Sequence[str]) -> dict[tuple[str, str | None], Counts]:
    """Blocks to ``(library path, symbol)``; symbols only for libraries in ``symbolize`` (whose
    file names, as the guest saw them, start with one of these)."""
    starts = [m.start for m in maps]
    tables: dict[str, tuple] = {}
    regions: dict[tuple[str, str | None], Counts] = {}
    for vaddr, counts in blocks.items():
        i = bisect.bisect_right(starts, vaddr) - 1
        mapping = maps[i] if i >= 0 and vaddr < maps[i].end else None
        if mapping is None:
            key = ("[no file]", None)
        else:
            symbol = None
            if os.path.basename(mapping.path).startswith(tuple(symbolize)):
                if mapping.path not in tables:
                    tables[mapping.path] = symbol_table(mapping.path)
                addresses, ends = tables[mapping.path]
                elf = vaddr - mapping.base
                j = bisect.bisect_right(addresses, elf) - 1
                if j >= 0 and elf < ends[j][0]:
                    symbol = ends[j][1]
            key = (mapping.path, symbol)
        regions.setdefault(key, Counts()).add(counts)
    return regions


def _exists(program: str) -> bool:
    from shutil import which

    return which(program) is not None


# --- profiling a library --------------------------------------------------------------------

def profile_library(library: str | os.PathLike, inputs: Sequence[np.ndarray],
                    qemu_cpu: str = qemu.DEFAULT_QEMU_CPU, runtime=None,
                    memory: bool = True, runs: int = DEFAULT_RUNS,
                    macs: int | None = None, kernel_macs: dict[str, int] | None = None,
                    lanes: int = NEON_FP32_LANES) -> Profile:
    """One inference of an aarch64 ``model.so`` (from `export_library`) on the emulated
    ``qemu_cpu``, one thread: the counts of a guest that runs it ``runs`` times minus one that
    runs it once, over ``runs - 1``. ``macs``: the model's multiply-accumulates (the NEON floor
    line); ``kernel_macs``: per PrimFunc (`kernel_macs`), for the per-kernel floor."""
    library = Path(library).resolve()
    if not library.is_file():
        raise DwsepError(f"library not found: {library}")
    with tempfile.TemporaryDirectory(prefix="dwsep-profile-") as tmp:
        inputs_npz = Path(tmp) / "inputs.npz"
        np.savez(inputs_npz, **{f"arg_{i}": np.ascontiguousarray(x) for i, x in enumerate(inputs)})

        def command(n: int, maps: Path) -> list[str]:
            return [str(emulate.RUNNER_SCRIPT), str(library), "--inputs", str(inputs_npz),
                    "--runs", str(n), "--maps", str(maps)]

        regions = profile_command(command, qemu_cpu, runtime, memory, runs,
                                  [library.name, *RUNTIME_LIBRARIES],
                                  what=f"profiling {library.name}")
    library_path = next((lib for lib, _ in regions if lib.endswith(library.name)),
                        str(library))
    notes = [] if memory else ["(memory not traced: loads, stores and misses are 0)"]
    return Profile(qemu_cpu, regions, library_path, macs, notes, dict(kernel_macs or {}), lanes)


def profile_command(command, qemu_cpu: str, runtime=None, memory: bool = True,
                    runs: int = DEFAULT_RUNS, symbolize: Sequence[str] = (),
                    python_path: Sequence[str] = (), what: str = "profiling"
                    ) -> dict[tuple[str, str | None], Counts]:
    """Per-inference counts of any guest Python program: ``command(n, maps_path)`` gives the
    guest's arguments for a run of ``n`` inferences that writes its ``/proc/self/maps`` to
    ``maps_path``; it runs with 1 and with ``runs``, the difference over ``runs - 1`` is
    returned by ``(library, symbol)`` (symbols for the libraries named in ``symbolize``), most
    instructions first."""
    if runs < 2:
        raise DwsepError("profiling needs at least 2 runs (their difference is counted)")
    runtime = runtime or aarch64_root.ensure_aarch64_runtime()
    qemu = plugin_qemu()
    counted = []
    with tempfile.TemporaryDirectory(prefix="dwsep-profile-") as tmp:
        for n in (1, runs):
            out, maps = Path(tmp) / f"blocks-{n}.txt", Path(tmp) / f"maps-{n}.txt"
            emulate.run_python(command(n, maps), qemu_cpu, runtime, qemu=qemu,
                               qemu_args=plugin_args(out, memory), what=what,
                               python_path=python_path)
            counted.append(attribute(read_blocks(out), read_maps(maps.read_text()), symbolize))
    once, many = counted
    per_inference: dict[tuple[str, str | None], Counts] = {}
    for key in set(once) | set(many):
        c = Counts()
        c.add(many.get(key, Counts()))
        c.add(once.get(key, Counts()), -1.0)
        scaled = Counts()
        scaled.add(c, 1.0 / (runs - 1))
        if scaled.instructions > 0.5:
            per_inference[key] = scaled
    return dict(sorted(per_inference.items(), key=lambda kv: -kv[1].instructions))


def profile_artifact(path: str | os.PathLike, cpu: str | None = None, memory: bool = True,
                     runs: int = DEFAULT_RUNS, inputs: str | None = None, seed: int = 0,
                     runtime=None) -> Profile:
    """`profile_library` on a ``dwsep-compile`` output (directory or its ``model.so``): the
    core its report's target is emulated on (``cpu`` overrides), inputs from ``inputs``
    (.npz keyed by input name) or random of ``model.onnx``'s shapes, the MACs of each kernel
    from ``model.onnx`` as the compiler legalizes it for that target."""
    import onnx

    from dwsep_compiler.compile.precision import PRECISIONS
    from dwsep_compiler.device.remote import find_artifact, load_inputs, random_inputs
    from dwsep_compiler.targets import PRESETS

    artifact = find_artifact(path)
    if artifact.arch != "aarch64":
        raise DwsepError(f"{artifact.library} is built for {artifact.arch}, not aarch64: "
                         "profile an ARM build (--target arm, arm-a53, arm-a76, ...)")
    preset = PRESETS.get(artifact.target or "")
    if preset is not None and preset.is_gpu:
        raise DwsepError(f"{artifact.library} is an OpenCL build: only CPU code is profiled")
    cpu = cpu or (preset.qemu_cpu if preset is not None else None) or qemu.DEFAULT_QEMU_CPU
    specs = artifact.inputs or []
    arrays = load_inputs(inputs) if inputs else random_inputs(specs, seed)
    missing = [s.name for s in specs if s.name not in arrays]
    if missing:
        raise DwsepError(f"--inputs lacks {', '.join(missing)}")
    ordered = [arrays[s.name] for s in specs] if specs else list(arrays.values())
    per_kernel: dict[str, int] = {}
    model_path = os.path.join(os.path.dirname(artifact.library), "model.onnx")
    if preset is not None and os.path.isfile(model_path) and specs:
        from dwsep_compiler.compile import import_onnx

        shapes = {s.name: tuple(a.shape) for s, a in zip(specs, ordered)}
        dtype = PRECISIONS.get(artifact.precision, "float32")
        per_kernel = kernel_macs(import_onnx(onnx.load(model_path), shapes, dtype),
                                 preset.tvm_target())
    fp16 = artifact.precision == "fp16"
    return profile_library(artifact.library, ordered, cpu, runtime, memory, runs,
                           macs=sum(per_kernel.values()) or None, kernel_macs=per_kernel,
                           lanes=NEON_FP16_LANES if fp16 else NEON_FP32_LANES)
