"""A viewer flooding the link stage: `spicetap proxy` buffers a bounded amount for the other
side, closes that channel with its error, and records it (it once held every byte until
the link timeout: 2.7 GB of RSS in 8 s on loopback)."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

from spicetap.inputs import iter_records
from tests.integration.proxy_process import ProxyProcess
from tests.proxy.test_framing import caps_word, link_mess
from tests.proxy.test_recording import MAIN

FLOOD = b"\xff" * (1 << 20)


def _silent_server(listener: socket.socket, got: list[int]) -> None:
    """Reads everything, answers nothing: the viewer's bytes wait for a link reply."""
    conn, _ = listener.accept()
    with conn:
        conn.settimeout(30)
        for _ in range(100_000):
            try:
                data = conn.recv(1 << 20)
            except OSError:
                return
            if not data:
                return
            got[0] += len(data)


def test_a_viewer_flooding_the_link_stage_is_cut_off(tmp_path: Path) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    got = [0]
    server = threading.Thread(target=_silent_server, args=(listener, got), daemon=True)
    server.start()
    record = tmp_path / "rec"
    sent = 0
    with ProxyProcess(listener.getsockname()[1], record, tmp_path / "proxy") as proxy:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as viewer:
            viewer.sendall(link_mess(caps_word(1, 3), channel_type=MAIN, conn=0))
            try:
                for _ in range(200):  # 200 MiB at most, then the proxy has failed the test
                    viewer.sendall(FLOOD)
                    sent += len(FLOOD)
            except OSError:  # the proxy closed the channel
                pass
        server.join(30)
        for _ in range(100):
            if "ahead of the server's link reply" in proxy.log():
                break
            time.sleep(0.05)
    listener.close()
    assert sent < 100 << 20, "the proxy kept reading"
    assert got[0] < 2 << 20, f"{got[0]} bytes reached the server"
    log = proxy.log()
    assert "bytes ahead of the server's link reply" in log, log
    (archive,) = proxy.archives()
    errors = [r for r in iter_records(archive, []) if r.kind == "error"]
    assert any("ahead of the server's link reply" in (r.error or "") for r in errors)
    assert all(r.name == "secret_stage" or not r.raw for r in errors)  # maybe a ticket
