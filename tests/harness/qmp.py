"""One-shot QMP commands over QEMU's unix socket (stdlib only).

Each call opens the socket, negotiates capabilities, runs one command and
closes: tests call it rarely (query-spice, quit), so a persistent connection
would only add state.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

from tests.harness.procs import PeerFailed


def _read_message(reader: Any, *, skip_events: bool = True) -> dict[str, Any]:
    for _ in range(1000):  # asynchronous events may come before the reply
        line = reader.readline()
        if not line:
            raise PeerFailed("QMP socket closed")
        message: dict[str, Any] = json.loads(line)
        if skip_events and "event" in message:
            continue
        return message
    raise PeerFailed("no QMP reply among 1000 messages")


def qmp_command(socket_path: Path, command: str, *, timeout: float = 10.0, **arguments: Any) -> Any:
    """Run `command` and return its "return" value; PeerFailed on a QMP error."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(socket_path))
        reader = sock.makefile("rb")
        _read_message(reader)  # greeting
        sock.sendall(json.dumps({"execute": "qmp_capabilities"}).encode() + b"\n")
        _read_message(reader)
        request: dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        sock.sendall(json.dumps(request).encode() + b"\n")
        try:
            reply = _read_message(reader)
        except (OSError, PeerFailed):
            if command == "quit":  # QEMU may close before answering
                return {}
            raise
        if "error" in reply:
            raise PeerFailed(f"QMP {command}: {reply['error']}")
        return reply.get("return")
