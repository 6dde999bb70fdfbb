"""Stopping `spicetap proxy` while a session streams: the archives close, signed, even when
the stop is asked for twice (an impatient Ctrl-C, a service manager's second SIGTERM)."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from pathlib import Path

from spicetap.archive.reader import ArchiveReader
from spicetap.archive.verify import verify
from tests.integration.proxy_process import ProxyProcess
from tests.proxy.test_framing import OK, TICKET, caps_word, link_mess, link_reply, mini
from tests.proxy.test_pumps import recv_exactly
from tests.proxy.test_recording import MAIN, SESSION_ID, init

BITS = caps_word(1, 3)  # AUTH_SPICE, MINI_HEADER
BURST = mini(4, bytes(4096)) * 64  # PINGs: id, time, then data


def _server(listener: socket.socket, stop: threading.Event) -> None:
    """One main channel: the link stage, INIT, then PINGs until the connection ends."""
    conn, _ = listener.accept()
    with conn:
        conn.settimeout(30)
        recv_exactly(conn, len(link_mess(BITS, channel_type=MAIN, conn=0)))
        conn.sendall(link_reply(BITS))
        recv_exactly(conn, len(TICKET))
        conn.sendall(OK + init())
        try:
            for _ in range(20_000):  # bounded: about 5 GB at most
                if stop.is_set():
                    break
                conn.sendall(BURST)
        except OSError:
            pass


def _viewer(port: int, got: list[int], stop: threading.Event) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(link_mess(BITS, channel_type=MAIN, conn=0))
        recv_exactly(sock, len(link_reply(BITS)))
        sock.sendall(TICKET)
        for _ in range(1_000_000):
            if stop.is_set():
                break
            try:
                data = sock.recv(1 << 20)
            except OSError:
                break
            if not data:
                break
            got[0] += len(data)


def test_a_second_stop_signal_while_draining_does_not_cut_the_archives(tmp_path: Path) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()
    server = threading.Thread(target=_server, args=(listener, stop), daemon=True)
    server.start()
    got = [0]
    record = tmp_path / "rec"
    proxy = ProxyProcess(listener.getsockname()[1], record, tmp_path / "proxy")
    try:
        viewer = threading.Thread(target=_viewer, args=(proxy.port, got, stop), daemon=True)
        viewer.start()
        for _ in range(200):  # streaming: the recording process has a backlog to drain
            if got[0] > 20 << 20:
                break
            time.sleep(0.05)
        assert got[0] > 20 << 20, "the stream did not flow"
        # the recording process paused: the proxy is surely draining when the next come
        (recording,) = proxy.children()
        os.kill(recording, signal.SIGSTOP)  # our own processes, by their PIDs
        try:
            proxy.proc.send_signal(signal.SIGTERM)
            for _ in range(200):
                if "stopping: draining archives" in proxy.log():
                    break
                time.sleep(0.05)
            time.sleep(0.3)
            proxy.proc.send_signal(signal.SIGTERM)
            proxy.proc.send_signal(signal.SIGINT)
            time.sleep(0.3)
        finally:
            os.kill(recording, signal.SIGCONT)
        assert proxy.proc.wait(60) == 0
    finally:
        stop.set()
        proxy.stop()
        listener.close()
    log = proxy.log()
    assert "draining archives (at most 60 s; further stop signals are ignored)" in log, log
    assert "Traceback" not in log and "Broken pipe" not in log, log
    (archive,) = proxy.archives()
    assert archive.name.endswith(f"-{SESSION_ID:08x}.spta")
    assert verify(archive).status == "intact"
    with ArchiveReader(archive) as reader:
        kinds = [r["kind"] for r in reader.records()]
        assert reader.end is not None and reader.end["status"] in ("complete", "proxy stopped")
    assert kinds.count("close") == 1 and kinds.count("message") > 1000
