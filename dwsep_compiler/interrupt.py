"""Stopping a run at once on SIGINT / SIGTERM, and sweeping up what a killed run left behind.

Python runs signal handlers in the main thread between bytecodes, so a long native call there
(TVM's build, an onnxruntime session, a BLAS solve) would swallow Ctrl-C until it returns.
`run_interruptible` therefore runs the work in a worker thread and keeps the main thread waiting
on it: a signal is handled within a few milliseconds, whatever the worker is doing. The handler
forbids new processes from then on (an audit hook: the work's threads run on beside it, and a
worker pool replaces each worker killed), removes the run's registered temporary directories,
kills its child processes (tuning's builder and runner workers), prints one line and leaves
with ``128 + signal`` (130, 143) without waiting for the worker: nothing after it can publish
a half-done output, and tuning records measured so far are already on disk (MetaSchedule
appends each measurement), so a rerun resumes.

Temporary directories of ours carry a marker file naming the process that made them
(`mark_temporary`). `remove_stale` deletes such directories whose process is gone (killed with
``kill -9``, the machine rebooted), and never anything without our marker or still in use.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import threading
import time
from typing import Callable

MARKER = ".dwsep-temporary"  # the marker file's name, inside each temporary directory
EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}

_temporary: set[str] = set()
_lock = threading.Lock()


def process_start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused PID apart;
    None where /proc does not say."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def mark_temporary(path: str) -> None:
    """Write our marker into the fresh directory ``path`` and register it for removal on an
    interrupt (until `release` says it is published or gone)."""
    with open(os.path.join(path, MARKER), "w") as handle:
        json.dump({"pid": os.getpid(), "start": process_start_time(os.getpid())}, handle)
    with _lock:
        _temporary.add(path)


def release(path: str) -> None:
    """``path`` is no longer ours to remove (renamed into place, or removed)."""
    with _lock:
        _temporary.discard(path)
    marker = os.path.join(path, MARKER)
    if os.path.exists(marker):
        os.remove(marker)


def _alive(owner: dict) -> bool:
    pid = owner.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    started = owner.get("start")
    return started is None or process_start_time(pid) in (None, started)


def remove_stale(directory: str, prefix: str = ".dwsep-") -> list[str]:
    """Remove the ``prefix*`` directories in ``directory`` that carry our marker and whose
    process no longer runs; returns their paths. Unmarked or unreadable ones are left alone."""
    removed = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        path = os.path.join(directory, name)
        if not name.startswith(prefix) or not os.path.isdir(path) or os.path.islink(path):
            continue
        try:
            with open(os.path.join(path, MARKER)) as handle:
                owner = json.load(handle)
        except (OSError, ValueError):
            continue
        if isinstance(owner, dict) and not _alive(owner):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


# Audit events raised before a process is started (PEP 578); the one for subprocess covers
# TVM's worker pools.
_SPAWN_EVENTS = frozenset({"subprocess.Popen", "os.fork", "os.forkpty", "os.posix_spawn",
                           "os.spawn", "os.system", "os.exec"})


def _refuse_new_processes(event: str, _args) -> None:
    """Installed when a stop begins (audit hooks cannot be removed): from then on no thread of
    ours starts a process, so the children killed while stopping are the last ones."""
    if event in _SPAWN_EVENTS:
        raise RuntimeError("stopping: no new processes")


def _end_children(patience_s: float = 1.0) -> None:
    """Kill this process's descendants (tuning's builder and runner workers), looking again
    until none is left alive: one started just before `_refuse_new_processes` came in would
    outlive us, holding our stderr open for the seconds its start-up takes. psutil is a core
    dependency."""
    try:
        import psutil
    except ImportError:
        return
    give_up = time.monotonic() + patience_s
    while time.monotonic() < give_up:
        try:
            children = psutil.Process().children(recursive=True)
        except psutil.Error:
            return
        alive = []
        for child in children:
            try:
                if child.status() != psutil.STATUS_ZOMBIE:
                    child.kill()
                    alive.append(child)
            except psutil.Error:  # gone meanwhile
                pass
        if not alive:
            return
        psutil.wait_procs(alive, timeout=0.05)


def run_interruptible(work: Callable[[], object], prog: str):
    """``work()`` in a worker thread; SIGINT/SIGTERM end the process at once (see module doc).
    Returns what ``work`` returns and re-raises what it raises."""
    outcome: dict = {}

    def target():
        try:
            outcome["value"] = work()
        except BaseException as exc:  # handed to the main thread
            outcome["error"] = exc

    def stop(signum, frame):
        threading.excepthook = lambda args: None  # a thread failing on the refusal: quiet
        sys.addaudithook(_refuse_new_processes)
        with _lock:
            paths = list(_temporary)
        for path in paths:
            shutil.rmtree(path, ignore_errors=True)
        _end_children()
        name = signal.Signals(signum).name
        print(f"{prog}: interrupted ({name}): stopped, no output written", file=sys.stderr,
              flush=True)
        os._exit(EXIT_CODES.get(signum, 128 + signum))

    previous = {sig: signal.signal(sig, stop) for sig in EXIT_CODES}
    try:
        worker = threading.Thread(target=target, name="dwsep-work", daemon=True)
        worker.start()
        while worker.is_alive():
            worker.join(0.1)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")
