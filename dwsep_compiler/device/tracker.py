"""The TVM RPC tracker, spoken to directly: its summary (which keys have servers) and a session
with a server under a key, each failure a one-line `RemoteError` that says which it was
(unreachable, not a tracker, no server under the key, all busy)."""

from __future__ import annotations

import json
import socket
import struct
from typing import Any

from dwsep_compiler.errors import DwsepError, first_line


class RemoteError(DwsepError):
    """A run could not be done (connection, session, inputs, device): one line, exit 2."""


DEFAULT_SESSION_TIMEOUT_S = 60.0
#: TVM RPC protocol constants (tvm/rpc/base.py), repeated so that errors are ours to word.
_TRACKER_MAGIC = 0x2F271
_TRACKER_SUCCESS = 0
_TRACKER_REQUEST = 4
_TRACKER_SUMMARY = 6


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` -> (host, port), or a `RemoteError`."""
    host, sep, port = text.strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise RemoteError(f"bad tracker address {text!r}: expected HOST:PORT, e.g. "
                          "127.0.0.1:9190")
    return host, int(port)


def _send_json(sock: socket.socket, value: Any) -> None:
    data = json.dumps(value).encode()
    sock.sendall(struct.pack("<i", len(data)) + data)


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    chunks, got = [], 0
    while got < size:
        chunk = sock.recv(min(size - got, 65536))
        if not chunk:
            raise ConnectionError("connection closed by the tracker")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _recv_json(sock: socket.socket) -> Any:
    (size,) = struct.unpack("<i", _recv_exact(sock, 4))
    return json.loads(_recv_exact(sock, size).decode())


def _tracker_socket(address: tuple[str, int], timeout: float) -> socket.socket:
    host, port = address
    try:
        sock = socket.create_connection(address, timeout=timeout)
    except socket.timeout:
        raise RemoteError(f"cannot reach the RPC tracker at {host}:{port}: no answer in "
                          f"{timeout:g} s") from None
    except OSError as exc:
        raise RemoteError(f"cannot reach the RPC tracker at {host}:{port}: "
                          f"{exc.strerror or exc}") from None
    try:
        sock.sendall(struct.pack("<i", _TRACKER_MAGIC))
        (magic,) = struct.unpack("<i", _recv_exact(sock, 4))
    except (OSError, struct.error):
        sock.close()
        raise RemoteError(f"{host}:{port} does not answer like a TVM RPC tracker") from None
    if magic != _TRACKER_MAGIC:
        sock.close()
        raise RemoteError(f"{host}:{port} is not a TVM RPC tracker")
    return sock


def tracker_summary(tracker: str | tuple[str, int], timeout: float = 10.0) -> dict:
    """The tracker's summary: ``{"server_info": [{"key": "server:K", "addr": [...]}, ...],
    "queue_info": {K: {"free": n, "pending": m}}}``."""
    address = parse_address(tracker) if isinstance(tracker, str) else tracker
    sock = _tracker_socket(address, timeout)
    try:
        sock.settimeout(timeout)
        _send_json(sock, [_TRACKER_SUMMARY])
        value = _recv_json(sock)
    except (OSError, ValueError, struct.error) as exc:
        raise RemoteError(f"the RPC tracker at {address[0]}:{address[1]} did not answer a "
                          f"summary request ({first_line(exc, last=True)})") from None
    finally:
        sock.close()
    if not (isinstance(value, list) and value and value[0] == _TRACKER_SUCCESS):
        raise RemoteError(f"the RPC tracker at {address[0]}:{address[1]} refused a summary "
                          "request")
    return value[1]


def registered_keys(summary: dict) -> dict[str, int]:
    counts: dict[str, int] = {}
    for server in summary.get("server_info", []):
        key = str(server.get("key", ""))
        if key.startswith("server:"):
            counts[key[len("server:"):]] = counts.get(key[len("server:"):], 0) + 1
    return counts


def request_session(tracker: str | tuple[str, int], key: str,
                    timeout: float = DEFAULT_SESSION_TIMEOUT_S, priority: int = 1):
    """``(session, where)``: a `tvm.rpc.RPCSession` with a server registered at `tracker` under
    `key`, and the server's address for messages.

    Waits at most `timeout` seconds for the tracker to grant one (every server under the key may
    be busy, or none registered yet); then raises a `RemoteError` saying which it was."""
    address = parse_address(tracker) if isinstance(tracker, str) else tracker
    where = f"{address[0]}:{address[1]}"
    if not key:
        raise RemoteError("empty --rpc-key")
    sock = _tracker_socket(address, min(timeout, 10.0))
    try:
        sock.settimeout(timeout)
        _send_json(sock, [_TRACKER_REQUEST, key, "", priority])
        value = _recv_json(sock)
    except socket.timeout:
        value = None
    except (OSError, ValueError, struct.error) as exc:
        raise RemoteError(f"the RPC tracker at {where} dropped the session request for key "
                          f"'{key}' ({first_line(exc, last=True)})") from None
    finally:
        sock.close()
    if value is None:
        try:
            keys = registered_keys(tracker_summary(address))
        except RemoteError:
            keys = None
        if keys is not None and key in keys:
            raise RemoteError(f"no free RPC server under key '{key}' at tracker {where} within "
                              f"{timeout:g} s ({keys[key]} registered, all busy)")
        known = (f"registered keys: {', '.join(sorted(keys))}" if keys else
                 "no server is registered at all") if keys is not None else "tracker summary failed"
        raise RemoteError(f"no RPC server registered under key '{key}' at tracker {where} "
                          f"within {timeout:g} s ({known})")
    if not (isinstance(value, list) and len(value) == 2 and value[0] == _TRACKER_SUCCESS):
        raise RemoteError(f"the RPC tracker at {where} refused the request for key '{key}': "
                          f"{value!r}")
    url, port, matchkey = value[1]
    import tvm.rpc

    try:
        session = tvm.rpc.connect(url, int(port), matchkey)
    except Exception as exc:
        raise RemoteError(f"cannot connect to the RPC server at {url}:{port} (key '{key}', from "
                          f"tracker {where}): {first_line(exc, last=True)}") from None
    return session, f"{url}:{port} (key {key})"
