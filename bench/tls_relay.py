"""TLS relaying, three ways, in one thread: what one direction of a TLS channel costs the
proxy before any recording.

- `c-forwarder`: what the proxy's pumps use once a channel is linked: the C forwarder
  (proxy/io/_forward.c) on the ends' OpenSSL connections, taken over from their memory
  BIOs (TlsCore), without the GIL;
- `memory-bio`: spicetap's blocking ends in Python (proxy/io/ends.py: an ssl.SSLObject over
  memory BIOs, one recv() and one send() per 256 KiB), what the pumps use without the
  extension, and what they all used before session 11;
- `socket`: ssl.SSLSocket on the socket itself (OpenSSL reads and writes the socket),
  recv_into() and sendall(): the way haproxy uses OpenSSL, here from Python.

A TLS sender process pushes the bytes to the relay, which forwards them to a TLS receiver
process; the two take turns, best of `--repeat`. The figure is the relaying thread's CPU
per GB (time.thread_time); strace shows the socket way reading each 16 KiB TLS record with
two read() calls (header, then body), where the memory-BIO ends read 256 KiB at once. The
issue's baseline is haproxy, which `python -m bench.proxy` measures; this one shows
whether OpenSSL on the socket would take the proxy closer to it.

    python -m bench.tls_relay [--gib 1] [--repeat 3]    # bench/results/tls_relay.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from bench.proxies import HOST, Pki, make_pki
from proxy.io.ends import TLS_WITHOUT_C, TlsEnd, tls_end
from proxy.tls import server_context

CHUNK = 256 * 1024
TIMEOUT = 120.0  # seconds for one transfer, at most
RESULTS = Path(__file__).resolve().parent / "results" / "tls_relay.json"
WAYS = ("c-forwarder", "memory-bio", "socket")


def _client_context(pki: Pki) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.ca))
    ctx.check_hostname = False  # the certificates name the bench's subjects, not HOST
    return ctx


def _send(port: int, pki: Pki, total: int) -> None:
    """The TLS sender: `total` bytes to the relay, then a close."""
    raw = socket.create_connection((HOST, port), timeout=TIMEOUT)
    with _client_context(pki).wrap_socket(raw, server_hostname=HOST) as tls:
        block = os.urandom(CHUNK)
        for _ in range(total // CHUNK):
            tls.sendall(block)
        # Half-close, then read to the relay's close: a socket closed with unread bytes (the
        # session tickets TLS 1.3 sends after the handshake) resets the connection, and a
        # reset loses what the relay had not read yet.
        tls.shutdown(socket.SHUT_WR)  # the TLS layer is dropped here; the socket stays
        for _ in range(1 << 16):
            if not tls.recv(CHUNK):
                break


def _receive(listener: socket.socket, pki: Pki) -> None:
    """The TLS receiver: reads until the relay closes."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki.server_cert, pki.server_key)
    conn, _ = listener.accept()
    conn.settimeout(TIMEOUT)
    with ctx.wrap_socket(conn, server_side=True) as tls:
        buf = bytearray(CHUNK)
        for _ in range(1 << 24):  # bounded: far more reads than any transfer needs
            try:
                if not tls.recv_into(buf):
                    break
            except OSError:  # the relay's close without close_notify
                break


Relay = Callable[[socket.socket, socket.socket, Pki], int]


def _tls_ends(viewer: socket.socket, server: socket.socket, pki: Pki) -> tuple[TlsEnd, TlsEnd]:
    source = tls_end(viewer, server_context(pki.proxy_cert, pki.proxy_key, None), server_side=True)
    sink = tls_end(server, _client_context(pki), server_side=False, server_hostname=HOST)
    shake = threading.Thread(target=source.handshake, args=(TIMEOUT,))
    shake.start()
    sink.handshake(TIMEOUT)
    shake.join(TIMEOUT)
    return source, sink


def _relay_c(viewer: socket.socket, server: socket.socket, pki: Pki) -> int:
    source, sink = _tls_ends(viewer, server, pki)
    forward = source.forward_to(sink)
    if forward is None:
        raise RuntimeError(f"no C forwarder for TLS here: {TLS_WITHOUT_C}")
    moved = 0
    for _ in range(1 << 24):
        try:
            data, delivered, error, _at = forward()
        except OSError:  # the sender's close without close_notify
            break
        if not data:
            break
        if delivered < len(data):
            raise OSError(error, os.strerror(error))
        moved += len(data)
    return moved


def _relay_memory_bio(viewer: socket.socket, server: socket.socket, pki: Pki) -> int:
    source, sink = _tls_ends(viewer, server, pki)
    moved = 0
    for _ in range(1 << 24):
        try:
            data = source.receive()
        except OSError:  # the sender's close without close_notify
            break
        if not data:
            break
        sink.send(data)
        moved += len(data)
    return moved


def _relay_socket(viewer: socket.socket, server: socket.socket, pki: Pki) -> int:
    ctx = server_context(pki.proxy_cert, pki.proxy_key, None)
    source = ctx.wrap_socket(viewer, server_side=True)
    sink = _client_context(pki).wrap_socket(server, server_hostname=HOST)
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    moved = 0
    for _ in range(1 << 24):
        try:
            got = source.recv_into(buf)
        except OSError:
            break
        if not got:
            break
        sink.sendall(view[:got])
        moved += got
    return moved


RELAYS: dict[str, Relay] = {
    "c-forwarder": _relay_c,
    "memory-bio": _relay_memory_bio,
    "socket": _relay_socket,
}


def transfer(way: str, pki: Pki, total: int) -> dict[str, float]:
    """One transfer of `total` bytes through the relay `way`, in this thread."""
    ctx = multiprocessing.get_context("fork")
    with socket.create_server((HOST, 0)) as front, socket.create_server((HOST, 0)) as back:
        receiver = ctx.Process(target=_receive, args=(back, pki))
        receiver.start()
        sender = ctx.Process(target=_send, args=(front.getsockname()[1], pki, total))
        sender.start()
        try:
            front.settimeout(TIMEOUT)
            viewer, _ = front.accept()
            server = socket.create_connection(back.getsockname()[:2], timeout=TIMEOUT)
            for sock in (viewer, server):
                sock.settimeout(None)  # the ends are blocking, as in the proxy
            cpu, wall = time.thread_time(), time.monotonic()
            moved = RELAYS[way](viewer, server, pki)
            cpu, wall = time.thread_time() - cpu, time.monotonic() - wall
            viewer.close()
            server.close()
        finally:
            for proc in (sender, receiver):
                proc.join(TIMEOUT)
                if proc.is_alive():  # ours, by PID: never left behind
                    proc.kill()
                    proc.join(10)
    gb = moved / 1e9
    if moved < total:
        raise RuntimeError(f"{way}: {moved} of {total} bytes relayed")
    return {"mb_per_s": moved / 1e6 / wall, "cpu_s_per_gb": cpu / gb}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gib", type=float, default=1.0, help="bytes per transfer (GiB)")
    parser.add_argument("--repeat", type=int, default=3, help="transfers per way (best kept)")
    args = parser.parse_args(argv)
    total = int(args.gib * (1 << 30)) // CHUNK * CHUNK
    runs: dict[str, list[dict[str, float]]] = {way: [] for way in WAYS}
    with tempfile.TemporaryDirectory() as tmp, Progress() as progress:
        pki = make_pki(Path(tmp))
        task = progress.add_task("TLS relay", total=args.repeat * len(WAYS))
        for _ in range(args.repeat):
            for way in WAYS:  # taking turns: the machine's load falls on both alike
                runs[way].append(transfer(way, pki, total))
                progress.advance(task)
    best = {way: min(r, key=lambda x: x["cpu_s_per_gb"]) for way, r in runs.items()}
    bio = best["memory-bio"]["cpu_s_per_gb"]
    ratios = {
        f"{way}_x_bio": best[way]["cpu_s_per_gb"] / bio for way in WAYS if way != "memory-bio"
    }
    table = Table(title="TLS relayed in one thread, best of each (CPU of the relaying thread)")
    for column in ("way", "CPU s/GB", "MB/s", "CPU x memory-bio"):
        table.add_column(column)
    for way in WAYS:
        b = best[way]
        table.add_row(
            way,
            f"{b['cpu_s_per_gb']:.2f}",
            f"{b['mb_per_s']:.0f}",
            f"{b['cpu_s_per_gb'] / best['memory-bio']['cpu_s_per_gb']:.2f}x",
        )
    Console().print(table)
    result: dict[str, Any] = {"bytes": total, "runs": runs, "best": best, **ratios}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    print(f"results in {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
