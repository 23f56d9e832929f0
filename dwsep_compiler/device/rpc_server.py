#!/usr/bin/env python3
"""A TVM RPC server that registers with a tracker, run in-process: the device side of `dwsep-run`.

Self-contained (standard library and the `apache-tvm` wheel; it never imports `dwsep_compiler`),
so it can be copied to a board and run there::

    python3 rpc_server.py --tracker 192.168.1.10:9190 --key rk3399 --host 0.0.0.0

It does what ``python -m tvm.exec.rpc_server --tracker ... --key ...`` does, with two
differences that matter on small devices and under qemu-user:

* the listening server runs in this process (`tvm.rpc.server.PopenRPCServerState`), where the
  stock command starts it in a `PopenWorker` that re-executes Python: that fails under qemu-user
  without binfmt_misc, since the child is an aarch64 binary the host kernel cannot execute.
  Each session is still served in a forked child, as in the stock server;
* `tvm/lib/libtvm_runtime_extra.so` is loaded when the wheel has it (the runtime-only mode,
  ``TVM_USE_RUNTIME_LIB=1``, does not load it), so that sessions find the functions it holds
  (`random_fill_for_measure`, used by MetaSchedule's RPC runner, ...).

The runtime-only library is used (``TVM_USE_RUNTIME_LIB=1`` unless already set). Once bound,
one line ``READY <host>:<port>`` goes to stdout; logs go to stderr. Exit status 2 with a one-line
``error: ...`` when it cannot start.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import sys
from collections.abc import Sequence


def _extra_runtime_library() -> str | None:
    """Path of the wheel's `libtvm_runtime_extra.so`, when it ships one."""
    import tvm

    path = os.path.join(os.path.dirname(os.path.abspath(tvm.__file__)), "lib",
                        "libtvm_runtime_extra.so")
    return path if os.path.isfile(path) else None


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="rpc_server.py",
        description="TVM RPC server registered with a tracker (in-process listener).")
    parser.add_argument("--tracker", required=True, metavar="HOST:PORT",
                        help="address of the RPC tracker")
    parser.add_argument("--key", required=True, help="device key to register under")
    parser.add_argument("--host", default="0.0.0.0",
                        help="address to listen on [default: 0.0.0.0]")
    parser.add_argument("--port", type=int, default=9090, help="first port to try [9090]")
    parser.add_argument("--port-end", type=int, default=9199,
                        help="end of the port range (exclusive) [9199]")
    parser.add_argument("--custom-addr", metavar="ADDR",
                        help="address to report to the tracker (default: as the tracker sees it)")
    parser.add_argument("--load-library", action="append", default=[], metavar="SO",
                        help="another shared library to load first (repeatable)")
    parser.add_argument("--no-extra-runtime", action="store_true",
                        help="do not load tvm/lib/libtvm_runtime_extra.so")
    parser.add_argument("--silent", action="store_true", help="log errors only")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    host, sep, port_text = args.tracker.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        print(f"error: bad --tracker {args.tracker!r}: expected HOST:PORT", file=sys.stderr)
        return 2
    if not 0 < args.port < args.port_end:
        print("error: need 0 < --port < --port-end", file=sys.stderr)
        return 2
    os.environ.setdefault("TVM_USE_RUNTIME_LIB", "1")
    import tvm.rpc.server as rpc_server

    libraries = list(args.load_library)
    if not args.no_extra_runtime:
        extra = _extra_runtime_library()
        if extra is not None:
            libraries.insert(0, extra)
    for library in libraries:
        try:  # loaded here, before any fork: every session's child inherits it
            ctypes.CDLL(os.path.abspath(library), ctypes.RTLD_GLOBAL)
        except OSError as exc:
            print(f"error: cannot load {library}: {exc}", file=sys.stderr)
            return 2
        rpc_server.logger.info("loaded %s", library)
    if args.silent:
        rpc_server.logger.setLevel("ERROR")
    try:
        state = rpc_server.PopenRPCServerState(
            args.host, args.port, args.port_end, tracker_addr=(host, int(port_text)),
            key=args.key, custom_addr=args.custom_addr, silent=args.silent)
    except (OSError, ValueError) as exc:
        print(f"error: cannot listen on {args.host}:{args.port}..{args.port_end - 1}: {exc}",
              file=sys.stderr)
        return 2
    print(f"READY {args.host}:{state.port}", flush=True)
    try:
        state.thread.join()
    except KeyboardInterrupt:
        os._exit(130)  # the listener thread never returns: do not wait for it at exit
    return 1  # the listener stopped: it could not reach the tracker (see its log above)


if __name__ == "__main__":
    sys.exit(main())
