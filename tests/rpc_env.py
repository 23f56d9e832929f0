"""A TVM RPC tracker and servers on 127.0.0.1 as background processes (process groups, killed
at the end; every wait bounded), and `dwsep-run` as a subprocess: what the RPC and tuning
tests share."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dwsep_compiler.device import emulate, qemu
from dwsep_compiler.errors import DwsepError
from dwsep_compiler.device.tracker import tracker_summary



HOST = "127.0.0.1"


START_TIMEOUT_S = 150.0  # servers import TVM (and, under qemu, an emulated Python): shared cores


RUN_TIMEOUT_S = 180.0


def free_port() -> int:
    """A port nobody listens on right now (bound then released)."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


class Background:
    """A process in its own process group (the RPC server forks a child per session), its
    output in a log file; `stop()` kills the whole group."""

    def __init__(self, name: str, proc: subprocess.Popen, log: Path) -> None:
        self.name, self.proc, self.log = name, proc, log

    def tail(self, lines: int = 15) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        try:
            os.killpg(self.proc.pid, sig)  # the group leader's pid is the group id
        except ProcessLookupError:
            pass

    def stop(self) -> None:
        if self.alive():
            self.kill(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        self.kill(signal.SIGKILL)  # forked session children too, even if the leader is gone
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


def _die_with_parent() -> None:
    """In the child: get SIGTERM when pytest dies, however it dies (Linux), never linger."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def start_background(name: str, cmd: list[str], logs: Path, popen=None) -> Background:
    log = logs / f"{name}.log"
    with open(log, "wb") as handle:
        if popen is None:
            proc = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True,
                                    preexec_fn=_die_with_parent)
        else:  # emulate.popen_python: sets up the same itself
            proc = popen(cmd, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
    return Background(name, proc, log)


class RpcEnv:
    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.processes: dict[str, Background] = {}
        self.port = free_port()
        self.tracker = f"{HOST}:{self.port}"

    def wait_for(self, key: str, timeout: float = START_TIMEOUT_S) -> Background:
        """Block until a server is registered under `key` (bounded)."""
        server = self.processes[key]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not server.alive():
                pytest.fail(f"RPC server '{key}' exited ({server.proc.returncode}):\n"
                            f"{server.tail()}", pytrace=False)
            try:
                summary = tracker_summary(self.tracker, timeout=5)
            except DwsepError:
                summary = {}
            if summary.get("queue_info", {}).get(key, {}).get("free", 0) > 0:
                return server
            time.sleep(0.5)
        pytest.fail(f"RPC server '{key}' did not register with the tracker in {timeout:g} s:\n"
                    f"{server.tail()}", pytrace=False)

    def stop(self) -> None:
        for process in reversed(list(self.processes.values())):
            process.stop()


def stock_server(env: RpcEnv, key: str) -> Background:
    port = free_port()
    return start_background(key, [sys.executable, "-m", "tvm.exec.rpc_server", "--tracker", env.tracker,
                        "--key", key, "--host", HOST, "--port", str(port),
                        "--port-end", str(port + 1)], env.logs)


def aarch64_server(env: RpcEnv, runtime: qemu.Aarch64Runtime) -> Background:
    port = free_port()
    return start_background("aarch64", [str(emulate.RPC_SERVER_SCRIPT), "--tracker", env.tracker,
                              "--key", "aarch64", "--host", HOST, "--port", str(port),
                              "--port-end", str(port + 1)], env.logs,
                  popen=lambda cmd, **kw: emulate.popen_python(
                      cmd, qemu.DEFAULT_QEMU_CPU, runtime, **kw))


def opencl_server(env: RpcEnv) -> Background:
    """Our RPC server on this machine with our OpenCL runtime loaded (PoCL is the device)."""
    from dwsep_compiler.device import opencl_runtime

    port = free_port()
    return start_background("opencl", [sys.executable, str(emulate.RPC_SERVER_SCRIPT),
                                       "--tracker", env.tracker, "--key", "opencl",
                                       "--host", HOST, "--port", str(port),
                                       "--port-end", str(port + 1), "--load-library",
                                       str(opencl_runtime.build_runtime())], env.logs)


def dwsep_run(*args: str, timeout: float = RUN_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dwsep_compiler.run_cli", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, check=False)
