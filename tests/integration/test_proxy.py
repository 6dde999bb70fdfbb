"""`spicetap proxy` between real viewers and QEMU's spice-server (reverse mode, plain)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import struct
import threading
import time
from pathlib import Path

import pytest

from proxy.core.relay import SESSION_REFUSED
from spicetap.archive.reader import ArchiveReader
from spicetap.archive.verify import verify
from spicetap.inputs import iter_records
from spicetap.show import iter_capture
from tests.conftest import peers
from tests.harness import (
    ALL_CHANNELS,
    ClientOptions,
    LoopbackCapture,
    QemuServer,
    SpiceEndpoint,
    full_exchange_options,
    run_gi_client,
    spicy_screenshot,
)
from tests.harness.client import ClientResult
from tests.harness.haproxy import PROXY_SOURCE, Haproxy
from tests.harness.images import CURSOR_CELL, differing_pixels
from tests.harness.procs import PeerFailed, wait_until
from tests.harness.screenshot import settled_screenshot
from tests.integration.proxy_process import ProxyProcess, run_spicetap, tls_both_legs

pytestmark = pytest.mark.peers


def test_screenshot_through_proxy_equals_direct(tmp_path: Path) -> None:
    with peers(), QemuServer(guest="none") as srv:  # a still screen: SeaBIOS text
        assert srv.port is not None
        with ProxyProcess(srv.port, tmp_path / "rec", tmp_path / "proxy") as proxy:
            direct = settled_screenshot(srv.endpoint(), tmp_path / "direct.ppm")
            via = spicy_screenshot(SpiceEndpoint(port=proxy.port), tmp_path / "via.ppm")
    assert differing_pixels(via, direct) <= CURSOR_CELL  # SeaBIOS' cursor may blink between
    (archive,) = proxy.archives()
    assert verify(archive).status == "intact"


def test_an_ipv6_viewer_is_named_with_its_address_in_brackets(tmp_path: Path) -> None:
    """spicy-screenshot over IPv6 loopback -> spicetap (--listen [::1]:0) -> QEMU on IPv4:
    the picture comes through, and the log, the archive's header and open records, and the
    listing name the viewer "[::1]:PORT", whose port cannot be read as the address's."""
    extra = ("--listen", "[::1]:0")
    with peers(), QemuServer(guest="none") as srv:
        assert srv.port is not None
        with ProxyProcess(srv.port, tmp_path / "rec", tmp_path / "proxy", extra) as proxy:
            direct = settled_screenshot(srv.endpoint(), tmp_path / "direct.ppm")
            via = spicy_screenshot(SpiceEndpoint(host="::1", port=proxy.port), tmp_path / "v.ppm")
    assert differing_pixels(via, direct) <= CURSOR_CELL
    bracketed = re.compile(r"\[::1\]:(\d+)")
    (archive,) = proxy.archives()
    with ArchiveReader(archive) as reader:
        viewer = reader.header["session"]["viewer"]
    assert bracketed.fullmatch(viewer) and viewer != f"[::1]:{proxy.port}", viewer
    opens = [r.fields or {} for r in iter_records(archive, []) if r.kind == "open"]
    assert len(opens) >= 2 and all(bracketed.fullmatch(f["client"]) for f in opens), opens
    assert {f["server"] for f in opens} == {f"127.0.0.1:{srv.port}"}, opens
    log = proxy.log()
    assert f"listening (plain) on [::1]:{proxy.port}" in log, log
    assert re.search(rf"channel \d+: \[::1\]:\d+ -> 127\.0\.0\.1:{srv.port} ", log), log
    listed = run_spicetap(tmp_path / "cfg", "sessions", "--json", str(tmp_path / "rec"))
    assert listed.returncode == 0, listed.stderr
    assert viewer in listed.stdout, listed.stdout


def test_connections_that_never_link_share_one_archive(tmp_path: Path) -> None:
    """Health checks (connect, close), another protocol, and a link header sent apart
    from its link message: the first two go to one `unlinked` archive for the whole run,
    not one each; the split link joins its session's archive whole."""
    with peers(), QemuServer(guest="none") as srv:
        assert srv.port is not None
        with ProxyProcess(srv.port, tmp_path / "rec", tmp_path / "proxy") as proxy:
            for _ in range(3):
                socket.create_connection(("127.0.0.1", proxy.port), timeout=5).close()
            with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as c:
                c.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                c.settimeout(5)
                assert c.recv(1024) == b""  # the proxy closes it: not SPICE
            shot = spicy_screenshot(SpiceEndpoint(port=proxy.port), tmp_path / "via.ppm")
            with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as c:
                c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                link_mess = struct.pack("<IBBIII", 0, 1, 0, 0, 0, 18)  # main, no caps
                c.sendall(struct.pack("<4sIII", b"REDQ", 2, 2, 18))
                time.sleep(0.3)  # read apart by the proxy
                c.sendall(link_mess)
                c.settimeout(5)
                assert c.recv(16)[:4] == b"REDQ"  # the server's link reply
            wait_until(lambda: len(proxy.archives()) == 3, timeout=10, what="three archives")
    assert shot.stat().st_size > 1000
    archives = {a.name: a for a in proxy.archives()}
    (unlinked,) = [a for n, a in archives.items() if n.endswith("-unlinked.spta")]
    assert verify(unlinked).status == "intact"
    with ArchiveReader(unlinked) as reader:
        assert reader.header["session"]["unlinked"] is True
    recs = list(iter_records(unlinked, []))
    conns = {r.connection for r in recs}
    assert len(conns) == 4 and {r.channel for r in recs} == {"unknown"}
    assert [r.kind for r in recs].count("open") == 4 and [r.kind for r in recs].count("close") == 4
    (http,) = [r for r in recs if r.kind == "error"]
    assert "bad link magic" in (http.error or "")
    # the split link: a main channel refused nothing, yet never sent INIT to name a session
    (split,) = [a for n, a in archives.items() if "unassigned" in n]
    split_recs = list(iter_records(split, []))
    assert {r.channel for r in split_recs} == {"main"}
    assert [r.name for r in split_recs if r.kind == "link"][:2] == ["header", "link_mess"]
    (session,) = [a for n, a in archives.items() if a not in (unlinked, split)]
    assert "unknown" not in {r.channel for r in iter_records(session, [])}


def _hold(proxy: ProxyProcess, count: int) -> list[socket.socket]:
    """`count` connections that never link, once the proxy counts them open."""
    from tests.integration.test_probe import metrics

    held = [socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
            for _ in range(count)]  # fmt: skip
    wait_until(
        lambda: metrics(proxy)["spicetap_connections_open"] == count,
        timeout=10,
        what=f"{count} connections held",
    )
    return held


def test_past_max_connections_new_ones_are_closed_at_once(tmp_path: Path) -> None:
    """Eleven connections held in the link stage fill --max-connections 11 (a session's
    worth): one more is closed at once (not after the link timeout), said in the log and
    the metrics; once they go, a real viewer gets through."""
    from tests.integration.test_probe import metrics

    with peers(), QemuServer(guest="none") as srv:
        assert srv.port is not None
        extra = ("--max-connections", "11", "--management", "127.0.0.1:0")
        with ProxyProcess(srv.port, tmp_path / "rec", tmp_path / "proxy", extra=extra) as proxy:
            held = _hold(proxy, 11)
            started = time.monotonic()
            with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as one_more:
                one_more.settimeout(5)
                assert one_more.recv(16) == b""
            assert time.monotonic() - started < 5  # the link timeout is 10 s
            counts = metrics(proxy)
            assert counts["spicetap_connections_refused_total"] == 1
            assert counts["spicetap_connections_limit"] == 11
            assert "1 new connection(s) closed at once: 11 open" in proxy.log()
            for sock in held:
                sock.close()
            wait_until(
                lambda: metrics(proxy)["spicetap_connections_open"] == 0,
                timeout=10,
                what="the held ones gone",
            )
            shot = spicy_screenshot(SpiceEndpoint(port=proxy.port), tmp_path / "via.ppm")
            assert shot.stat().st_size > 1000
            assert metrics(proxy)["spicetap_connections_refused_total"] == 1


def _link(
    port: int, channel_type: int, conn: int, tunnel: str | None = None
) -> tuple[socket.socket, bytes]:
    """Link a channel by hand through the proxy (through its CONNECT front to `tunnel`):
    the socket, and what came back first (b"" when the proxy closed without a word)."""
    from tests.proxy.test_framing import caps_word, link_mess

    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    if tunnel is not None:
        sock.sendall(f"CONNECT {tunnel} HTTP/1.1\r\nHost: {tunnel}\r\n\r\n".encode())
        head = b""
        while not head.endswith(b"\r\n\r\n") and len(head) < 4096:  # the answer's head
            head += _read(sock, 1) or b"\r\n\r\n"
        assert head.startswith(b"HTTP/1.1 200 "), head
    sock.sendall(link_mess(caps_word(1, 3), channel_type=channel_type, conn=conn))
    return sock, _read(sock, 16)


def _read(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


def _authenticate(sock: socket.socket, header: bytes) -> None:
    """The rest of a link with the empty password (QEMU here disables ticketing)."""
    from proxy.core.probe import encrypt_ticket

    size = struct.unpack_from("<I", header, 12)[0]
    reply = _read(sock, size)
    assert struct.unpack_from("<I", reply)[0] == 0  # SPICE_LINK_ERR_OK
    sock.sendall(encrypt_ticket(reply[4:166], b"\0"))  # the key: 162 bytes of DER
    assert _read(sock, 4) == b"\0\0\0\0"  # the link result: OK


def test_near_the_cap_new_sessions_are_refused_and_running_ones_still_link(
    tmp_path: Path,
) -> None:
    """--max-connections 9 keeps its last connection for channels of sessions already
    begun. With seven held, a session's main channel links (the eighth) and gets its
    session id from QEMU's MAIN INIT; another main channel (a new session, the ninth) is
    closed without a word, logged and counted; an inputs channel of the running session
    takes the ninth and links with QEMU."""
    from tests.integration.test_probe import metrics

    with peers(), QemuServer(guest="none") as srv:
        assert srv.port is not None
        extra = ("--max-connections", "9", "--management", "127.0.0.1:0", "--link-timeout", "60")
        with ProxyProcess(srv.port, tmp_path / "rec", tmp_path / "proxy", extra=extra) as proxy:
            held = _hold(proxy, 7)
            main, header = _link(proxy.port, 1, 0)
            assert header[:4] == b"REDQ"
            _authenticate(main, header)
            msg_type, size = struct.unpack("<HI", _read(main, 6))  # the mini header
            assert msg_type == 103  # SPICE_MSG_MAIN_INIT: its body starts with the session id
            session_id = struct.unpack_from("<I", _read(main, size))[0]
            assert session_id != 0
            newcomer, said = _link(proxy.port, 1, 0)
            assert said == b""  # closed: no link reply from anyone
            newcomer.close()
            wait_until(
                lambda: metrics(proxy)["spicetap_connections_open"] == 8,
                timeout=10,
                what="the refused one gone",
            )
            inputs, header = _link(proxy.port, 3, session_id)
            assert header[:4] == b"REDQ"
            _authenticate(inputs, header)  # QEMU took it into the running session
            counts = metrics(proxy)
            assert counts["spicetap_sessions_refused_total"] == 1
            assert counts["spicetap_connections_refused_total"] == 0
            assert "1 new session(s) refused: 9 connections open" in proxy.log()
            for sock in [*held, main, inputs]:
                sock.close()
    closes = [r for a in proxy.archives() for r in iter_records(a, []) if r.kind == "close"]
    assert [r.name for r in closes].count(SESSION_REFUSED) == 1  # the newcomer's, said why


def test_the_proxy_and_its_recording_process_get_the_hard_open_files_limit(
    tmp_path: Path,
) -> None:
    """Started with a soft limit of 256 (Debian's default is 1,024), the proxy raises it
    before it starts the recording process, which then has it too (an archive per session
    is open at once there)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, soft), hard))
    try:
        proxy = ProxyProcess(1, tmp_path / "rec", tmp_path / "proxy")  # inherits 256
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    with proxy:
        (recording,) = proxy.children()
        want = hard if hard != resource.RLIM_INFINITY else None
        for pid in (proxy.proc.pid, recording):
            line = next(
                x for x in Path(f"/proc/{pid}/limits").read_text().splitlines()
                if x.startswith("Max open files")
            )  # fmt: skip
            got_soft = line.split()[3]
            assert got_soft != "256"
            if want is not None:
                assert int(got_soft) == want
    assert "connections at once (open files limit" in proxy.log()


def test_full_exchange_through_proxy_is_recorded(tmp_path: Path) -> None:
    with peers(), QemuServer(guest="linux") as srv:
        assert srv.port is not None
        with ProxyProcess(srv.port, tmp_path / "rec", tmp_path / "proxy") as proxy:
            result = run_gi_client(
                SpiceEndpoint(port=proxy.port),
                full_exchange_options(tmp_path / "client"),
                tmp_path / "client",
            )
    assert result.returncode == 0, (result.summary, proxy.log()[-2000:])
    assert len(result.opened) == ALL_CHANNELS
    (archive,) = proxy.archives()
    assert verify(archive).status == "intact"
    with ArchiveReader(archive) as reader:
        session = reader.header["session"]
    assert session["insertion"] == "reverse" and session["auth"] == "pass-through"
    assert session["viewer"].startswith("127.0.0.1:")
    assert session["server"] == f"127.0.0.1:{srv.port}"
    recs = list(iter_records(archive, []))
    assert len({r.connection for r in recs}) == ALL_CHANNELS
    assert len({r.session for r in recs}) == 1
    assert not [r for r in recs if r.not_fully_dissected or r.kind in ("error", "gap")]
    seen = {(r.channel, r.direction, r.kind, r.name) for r in recs}
    for expected in [
        ("inputs", "c2s", "message", "key_down"),
        ("main", "c2s", "agent", "clipboard"),
        ("main", "s2c", "agent", "clipboard"),
        ("main", "c2s", "agent", "file_xfer_data"),
        ("playback", "s2c", "message", "data"),
        ("record", "c2s", "message", "data"),
        ("usbredir", "c2s", "message", "data"),
        ("port", "s2c", "message", "data"),
    ]:
        assert expected in seen, expected


def _client_in_background(
    endpoint: SpiceEndpoint, options: ClientOptions, work: Path
) -> tuple[threading.Thread, list[ClientResult]]:
    out: list[ClientResult] = []
    thread = threading.Thread(target=lambda: out.append(run_gi_client(endpoint, options, work)))
    thread.start()
    return thread, out


def test_qemu_killed_mid_session_leaves_a_complete_archive(tmp_path: Path) -> None:
    with peers(), QemuServer(guest="boot") as srv:
        assert srv.port is not None and srv.pid is not None
        with ProxyProcess(srv.port, tmp_path / "rec", tmp_path / "proxy") as proxy:
            thread, _ = _client_in_background(
                SpiceEndpoint(port=proxy.port),
                ClientOptions(duration=20, min_duration=15, expect_display=True),
                tmp_path / "client",
            )
            time.sleep(3)
            os.kill(srv.pid, signal.SIGKILL)
            thread.join(60)
            time.sleep(1)
            assert proxy.proc.poll() is None  # the proxy itself goes on
    (archive,) = proxy.archives()
    assert verify(archive).status == "intact", proxy.log()[-2000:]
    recs = list(iter_records(archive, []))
    closes = [r for r in recs if r.kind == "close"]
    assert closes and len(closes) == len({r.connection for r in recs})
    assert any("server" in (r.name or "") for r in closes)


def test_proxy_sigkill_leaves_a_prefix_of_what_was_forwarded(tmp_path: Path) -> None:
    with peers(), QemuServer(guest="boot", spice_options={"streaming-video": "all"}) as srv:
        assert srv.port is not None
        proxy = ProxyProcess(
            srv.port, tmp_path / "rec", tmp_path / "proxy", extra=("--flush-interval", "0.05")
        )
        try:
            with LoopbackCapture(tmp_path / "viewer.pcapng", ports=[proxy.port]):
                thread, _ = _client_in_background(
                    SpiceEndpoint(port=proxy.port),
                    ClientOptions(duration=15, min_duration=10, expect_display=True),
                    tmp_path / "client",
                )
                time.sleep(4)
                proxy.kill()  # SIGKILL mid-stream
                thread.join(60)
        finally:
            proxy.kill()
    (archive,) = proxy.archives()
    # the recording process outlives the proxy: it read end-of-file and signed the archive
    verdict = verify(archive)
    assert verdict.status == "intact", verdict
    with ArchiveReader(archive) as reader:
        list(reader.records())
        assert reader.end is not None and reader.end["status"] == "proxy vanished"
    recorded = list(iter_records(archive, []))
    assert any(r.name == "stream_data" for r in recorded)  # display streaming was on
    forwarded: dict[tuple[int, str], bytes] = {}
    for seen in iter_capture(tmp_path / "viewer.pcapng"):
        if seen.kind in ("link", "message") and seen.name != "ticket":
            key = (seen.connection, seen.direction)
            forwarded[key] = forwarded.get(key, b"") + seen.raw
    # the proxy numbers connections in accept order, as the capture does
    archived: dict[tuple[int, str], bytes] = {}
    for r in recorded:
        if r.kind in ("link", "message") and r.name != "ticket":
            key = (r.connection, r.direction)
            archived[key] = archived.get(key, b"") + r.raw
    assert archived
    for key, data in archived.items():
        assert forwarded[key].startswith(data), key


def test_close_policy_refuses_viewers_once_recording_is_gone(tmp_path: Path) -> None:
    """--backlog close: no session may go on unrecorded, so when the recording process
    dies, viewers are turned away (and the proxy itself stays up)."""
    with peers(), QemuServer(guest="none") as srv:
        assert srv.port is not None
        extra = ("--backlog", "close")
        with ProxyProcess(srv.port, tmp_path / "rec", tmp_path / "proxy", extra=extra) as proxy:
            spicy_screenshot(SpiceEndpoint(port=proxy.port), tmp_path / "before.ppm")
            (recording,) = proxy.children()
            os.kill(recording, signal.SIGKILL)  # the recording process our proxy started
            wait_until(
                lambda: "recording stopped" in proxy.log(), timeout=10, what="the proxy noticing"
            )
            with pytest.raises(PeerFailed):
                spicy_screenshot(SpiceEndpoint(port=proxy.port), tmp_path / "after.ppm")
            assert proxy.proc.poll() is None
            # the proxy closes the viewer's socket, then logs why: the viewer may be gone first
            wait_until(
                lambda: "recording failed: session dropped by policy" in proxy.log(),
                timeout=10,
                what="the refusal logged",
            )
    assert not (tmp_path / "after.ppm").exists()


def test_a_full_disk_stops_recording_loudly_then_recording_resumes(tmp_path: Path) -> None:
    """The recording process can write 64 KiB per file and no more (RLIMIT_FSIZE: its
    writes then fail as on a full disk). The first session's archive stops there: it
    verifies as truncated, every record before the cut intact. Recording stops, said in
    one line naming the archive, and viewers go on being served (policy gap). A second
    after that ([recording] resume_after), the next viewer gets a new recording process,
    free of the limit, and a whole signed archive."""
    import resource

    from tests.integration.test_probe import metrics

    config = tmp_path / "spicetap.toml"
    config.write_text("[recording]\nresume_after = 1.0\n")
    with peers(), QemuServer(guest="none") as srv:
        assert srv.port is not None
        extra = ("--config", str(config), "--management", "127.0.0.1:0")
        with ProxyProcess(srv.port, tmp_path / "rec", tmp_path / "proxy", extra=extra) as proxy:
            (recording,) = proxy.children()  # the recording process our proxy started
            resource.prlimit(recording, resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))
            shot = spicy_screenshot(SpiceEndpoint(port=proxy.port), tmp_path / "0.ppm")
            assert shot.stat().st_size > 1000
            wait_until(
                lambda: "forwarding goes on without it" in proxy.log(),
                timeout=10,
                what="the proxy saying recording stopped",
            )
            (cut,) = proxy.archives()
            time.sleep(1.5)  # past resume_after
            shot = spicy_screenshot(SpiceEndpoint(port=proxy.port), tmp_path / "1.ppm")
            assert shot.stat().st_size > 1000
            assert proxy.proc.poll() is None
            assert recording not in proxy.children()  # the failed one was reaped
            counts = metrics(proxy)
            assert counts["spicetap_recorder_resumed_total"] == 1
            assert counts["spicetap_recorder_failed"] == 0
    log = proxy.log()
    assert f"recording failed: [Errno 27] File too large: '{cut}'" in log
    assert "recording resumed for new connections, in a new process" in log
    assert "Traceback" not in log
    verdict = verify(cut)
    assert verdict.status == "truncated" and verdict.records > 0, verdict
    assert f"recorded {cut} (cut short: recording failed;" in log  # the list at the end
    (whole,) = [a for a in proxy.archives() if a != cut]
    assert f"recorded {whole}\n" in log
    assert verify(whole).status == "intact"
    assert {r.channel for r in iter_records(whole, [])} >= {"main", "display"}


def test_hostile_upstream_closes_only_that_channel(tmp_path: Path) -> None:
    """A server answering garbage: the channel is closed with a clear error, recorded."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    port = server.getsockname()[1]
    stop = threading.Event()

    def serve() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(5)
                conn.recv(1024)
                conn.sendall(b"HTTP/1.0 400 Bad Request\r\n\r\n" + bytes(64))
                time.sleep(0.5)

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with ProxyProcess(port, tmp_path / "rec", tmp_path / "proxy") as proxy:
            for _ in range(2):
                with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as c:
                    link_mess = struct.pack("<IBBIII", 0, 1, 0, 0, 0, 18)  # main, no caps
                    c.sendall(struct.pack("<4sIII", b"REDQ", 2, 2, 18) + link_mess)
                    c.settimeout(5)
                    data = b""
                    while len(data) < 20:
                        chunk = c.recv(4096)
                        if not chunk:
                            break
                        data += chunk
                    assert data.startswith(b"HTTP/1.0 400")  # forwarded unchanged first
            time.sleep(0.5)
            assert proxy.proc.poll() is None
    finally:
        stop.set()
        thread.join(5)
        server.close()
    log = proxy.log()
    assert "bad link magic" in log
    archives = proxy.archives()
    recs = [r for a in archives for r in iter_records(a, [])]
    errors = [r for r in recs if r.kind == "error"]
    # one error per channel (the close reason does not repeat it), on the server's side,
    # and every byte the server sent is in the archive
    assert len(errors) == 2 and all("bad link magic" in (r.error or "") for r in errors)
    assert {r.direction for r in errors} == {"s2c"}
    garbage = b"HTTP/1.0 400 Bad Request\r\n\r\n" + bytes(64)
    for conn in {r.connection for r in errors}:
        sent = b"".join(r.raw for r in recs if r.connection == conn and r.direction == "s2c")
        assert sent == garbage


def test_config_file_drives_the_proxy(tmp_path: Path) -> None:
    with peers(), QemuServer(guest="none") as srv:
        assert srv.port is not None
        config = tmp_path / "spicetap.toml"
        config.write_text(
            f'[proxy]\nupstream = "127.0.0.1:{srv.port}"\n'
            f'[recording]\ndirectory = "{tmp_path / "rec"}"\ncompress = true\n'
            '[recording.privacy]\nkeys = "events"\n'
        )
        proxy = ProxyProcess(0, None, tmp_path / "proxy", extra=("--config", str(config)))
        with proxy:
            spicy_screenshot(SpiceEndpoint(port=proxy.port), tmp_path / "via.ppm")
    (archive,) = sorted((tmp_path / "rec").glob("*.spta.zst"))
    assert verify(archive).status == "intact"
    with ArchiveReader(archive) as reader:
        assert reader.header["policy"]["keys"] == "events"
        assert reader.header["compressed"] is True


SUBJECT = "C=XX,O=spicetap-test,CN=127.0.0.1"


def test_tls_on_both_legs_with_spicetaps_ca(tmp_path: Path) -> None:
    with peers(), QemuServer(guest="boot", plain=False, tls=True, password="s3cret") as srv:
        assert srv.tls_port is not None and srv.tls_material is not None
        tlsm = srv.tls_material
        keylog = tmp_path / "keys.log"
        extra = (
            *tls_both_legs(srv.tls_port, tlsm.ca_file, tlsm.host_subject),
            "--tls-subject",
            SUBJECT,
            "--keylog",
            str(keylog),
        )
        with ProxyProcess(0, tmp_path / "rec", tmp_path / "proxy", extra=extra) as proxy:
            ca = tmp_path / "proxy" / "config" / "ca-cert.pem"
            assert ca.is_file()  # spicetap's own CA, created on first use
            endpoint = SpiceEndpoint(
                tls_port=proxy.port, ca_file=ca, host_subject=SUBJECT, password="s3cret"
            )
            result = run_gi_client(
                endpoint,
                ClientOptions(
                    duration=15,
                    expect_channels=ALL_CHANNELS,
                    expect_display=True,
                    keys=(0x1E,),
                    smartcard=True,
                ),
                tmp_path / "client",
            )
            shot = spicy_screenshot(endpoint, tmp_path / "tls.ppm")
    assert result.returncode == 0, (result.summary, proxy.log()[-2000:])
    assert len(result.opened) == ALL_CHANNELS
    assert shot.stat().st_size > 1000
    assert "CLIENT_" in keylog.read_text()  # secrets of both legs, for Wireshark
    archives = proxy.archives()
    assert archives and all(verify(a).status == "intact" for a in archives)
    sessions = [list(iter_records(a, [])) for a in archives]
    # the spice-gtk client's session (spicy-screenshot's hangs up mid-message: recorded too)
    recs = next(s for s in sessions if len({r.connection for r in s}) == ALL_CHANNELS)
    opens = [r for r in recs if r.kind == "open"]
    assert len(opens) == ALL_CHANNELS
    assert all((r.fields or {}).get("tls") == {"viewer": True, "server": True} for r in opens)
    # TLS on both legs, yet the archive holds the plaintext, fully dissected
    assert any(r.name == "draw_copy" for r in recs)
    bad = [r for r in recs if r.not_fully_dissected or r.kind in ("error", "tls")]
    # the client hangs up whenever its script ends: a message the server was sending then is
    # cut, and recorded as such; anything else is a real problem
    bad = [r for r in bad if "connection ended (viewer closed)" not in str(r.error)]
    assert not bad, [(r.kind, r.channel, r.direction, r.name, r.error) for r in bad]


def test_wrong_upstream_subject_fails_cleanly(tmp_path: Path) -> None:
    with peers(), QemuServer(guest="none", plain=False, tls=True) as srv:
        assert srv.tls_port is not None and srv.tls_material is not None
        extra = (
            *tls_both_legs(
                srv.tls_port, srv.tls_material.ca_file, "C=XX,O=someone-else,CN=127.0.0.1"
            ),
            "--tls-subject",
            SUBJECT,
        )
        with ProxyProcess(0, None, tmp_path / "proxy", extra=extra) as proxy:
            ca = tmp_path / "proxy" / "config" / "ca-cert.pem"
            endpoint = SpiceEndpoint(tls_port=proxy.port, ca_file=ca, host_subject=SUBJECT)
            result = run_gi_client(
                endpoint, ClientOptions(duration=8, expect_channels=1), tmp_path / "client"
            )
            assert proxy.proc.poll() is None
    assert result.returncode != 0
    assert "is not the expected 'C=XX,O=someone-else,CN=127.0.0.1'" in proxy.log()


def test_json_logs_give_each_channels_events_as_fields(tmp_path: Path) -> None:
    """--log-format json: every line of the proxy and of its recording process is one JSON
    object; each channel spicy-screenshot opened has an open and a close event whose
    fields agree with what crossed (the display channel's bytes), and the archive's."""
    extra = ("--log-format", "json")
    with peers(), QemuServer(guest="none") as srv:
        assert srv.port is not None
        with ProxyProcess(srv.port, tmp_path / "rec", tmp_path / "proxy", extra) as proxy:
            spicy_screenshot(SpiceEndpoint(port=proxy.port), tmp_path / "via.ppm")
    lines = proxy.log().splitlines()
    events = [json.loads(line) for line in lines]  # raises on any line that is not JSON
    assert all({"time", "level", "logger", "message"} <= set(e) for e in events)
    opened = {e["conn"]: e for e in events if e.get("event") == "channel_open"}
    closed = {e["conn"]: e for e in events if e.get("event") == "channel_closed"}
    assert len(opened) >= 2 and set(opened) == set(closed)  # main and display at least
    assert {e["upstream"] for e in opened.values()} == {f"127.0.0.1:{srv.port}"}
    assert all(e["insertion"] == "reverse" and not e["tls_viewer"] for e in opened.values())
    (session,) = {e["session"] for e in closed.values()}
    (archive,) = proxy.archives()
    recs = list(iter_records(archive, []))
    for e in closed.values():  # the counts agree with the bytes the archive recorded
        for direction in ("c2s", "s2c"):
            ours = [r for r in recs if r.connection == e["conn"] and r.direction == direction]
            # the ticket is kept as its length only
            sizes = [len(r.raw) or (r.redacted or {}).get("len", 0) for r in ours]  # type: ignore[union-attr]
            assert e[f"bytes_{direction}"] == sum(sizes) > 0, (e, direction)
    (written,) = [e for e in events if e.get("event") == "archive_opened"]
    assert written["logger"] == "spicetap.recorder"  # from the recording process
    assert written["path"] == str(archive) and written["session"] == session


@pytest.mark.parametrize("send", ["send-proxy", "send-proxy-v2"])
def test_a_load_balancer_names_the_viewer_with_the_proxy_protocol(
    tmp_path: Path, send: str
) -> None:
    """spicy-screenshot -> haproxy (TCP mode, PROXY header v1 or v2, from 127.0.0.2) ->
    spicetap -> QEMU: the session is the viewer's address and port as haproxy saw them,
    recorded with the balancer that told them, and QEMU sees none of the header. A
    viewer straight from a trusted address without a header is refused, and recorded."""
    front = ("--proxy-protocol-from", PROXY_SOURCE)
    with peers(), QemuServer(guest="none") as srv:
        assert srv.port is not None
        with ProxyProcess(srv.port, tmp_path / "rec", tmp_path / "proxy", front) as proxy:
            with Haproxy(proxy.port, tmp_path / "haproxy", send) as haproxy:
                shot = spicy_screenshot(SpiceEndpoint(port=haproxy.port), tmp_path / "via.ppm")
            # from the trusted address, a link with no header before it
            with socket.socket() as c:
                c.bind((PROXY_SOURCE, 0))
                c.settimeout(5)
                c.connect(("127.0.0.1", proxy.port))
                c.sendall(struct.pack("<4sIII", b"REDQ", 2, 2, 18))
                assert c.recv(16) == b""  # refused before any server heard
            wait_until(
                lambda: "PROXY protocol: no PROXY protocol header" in proxy.log(),
                timeout=10,
                what="the refusal logged",
            )
            log = proxy.log()
    assert shot.stat().st_size > 1000
    assert "bad link magic" not in log  # the server got the viewer's bytes, no header
    sessions = {}
    for archive in proxy.archives():
        assert verify(archive).status == "intact"
        with ArchiveReader(archive) as reader:
            sessions[archive.name] = reader.header["session"]
    linked = [s for s in sessions.values() if s.get("id") is not None]
    assert len(linked) == 1, sessions
    (session,) = linked
    host, port = session["viewer"].rsplit(":", 1)
    assert host == "127.0.0.1" and int(port) > 0, session  # spicy's own end, as haproxy saw
    assert session["forwarded_by"].startswith(f"{PROXY_SOURCE}:"), session
    recs = [r for a in proxy.archives() for r in iter_records(a, [])]
    opens = [r.fields or {} for r in recs if r.kind == "open"]
    behind = [f for f in opens if "forwarded_by" in f]
    assert len(behind) >= 2, opens  # main and display at least
    for fields in behind:  # each channel's own port
        assert fields["client"].startswith("127.0.0.1:"), fields
        assert not fields["client"].endswith(":0"), fields
        assert fields["forwarded_by"].startswith(f"{PROXY_SOURCE}:"), fields
    refused = [r.error or "" for r in recs if r.kind == "error" and "PROXY" in (r.error or "")]
    assert refused and refused[0].startswith("PROXY protocol: no PROXY protocol header"), refused
