"""The HTTP CONNECT front and named targets, with real spice-gtk viewers (SPICE_PROXY /
the session's proxy property, as remote-viewer --spice-proxy sets it) and QEMU."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from spicetap.archive.reader import ArchiveReader
from spicetap.archive.verify import verify
from spicetap.inputs import iter_records
from tests.conftest import peers
from tests.harness import (
    ALL_CHANNELS,
    ClientOptions,
    QemuServer,
    SpiceEndpoint,
    run_gi_client,
    spicy_screenshot,
)
from tests.harness.haproxy import PROXY_SOURCE, Haproxy
from tests.harness.images import CURSOR_CELL, differing_pixels, distinct_colours, read_ppm
from tests.harness.procs import PeerFailed, wait_until
from tests.harness.screenshot import settled_screenshot
from tests.integration.proxy_process import ProxyProcess

pytestmark = pytest.mark.peers


def _connect_status(
    port: int, target: str, headers: str = "", body: bytes = b"", host: str = "127.0.0.1"
) -> bytes:
    """The status line the CONNECT front on host:port answers for `target`."""
    with socket.create_connection((host, port), timeout=10) as s:
        head = f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n{headers}\r\n"
        s.sendall(head.encode() + body)
        return s.recv(4096).split(b"\r\n", 1)[0]


def _session_header(archive: Path) -> dict[str, object]:
    with ArchiveReader(archive) as reader:
        session = reader.header["session"]
    assert isinstance(session, dict)
    return session


def test_connect_front_relays_allowed_targets_and_refuses_others(tmp_path: Path) -> None:
    with peers(), QemuServer(guest="none") as srv:  # a still screen: SeaBIOS text
        assert srv.port is not None
        extra = ("--connect-listen", "127.0.0.1:0", "--allow", f"127.0.0.1:{srv.port}")
        with ProxyProcess(0, tmp_path / "rec", tmp_path / "proxy", extra) as proxy:
            front = f"http://127.0.0.1:{proxy.ports['connect']}"
            direct = settled_screenshot(srv.endpoint(), tmp_path / "direct.ppm")
            via = spicy_screenshot(SpiceEndpoint(port=srv.port, proxy=front), tmp_path / "v.ppm")
            assert _connect_status(proxy.ports["connect"], f"127.0.0.1:{srv.port}").startswith(
                b"HTTP/1.1 200"
            )
            refused = _connect_status(proxy.ports["connect"], f"127.0.0.1:{srv.port + 1}")
            assert refused == b"HTTP/1.1 403 Forbidden"
            # a body on a CONNECT (bad chunk framing here) once ended the whole proxy
            chunked = _connect_status(
                proxy.ports["connect"],
                f"127.0.0.1:{srv.port}",
                "Transfer-Encoding: chunked\r\n",
                b"ZZZ\r\n",
            )
            assert chunked == b"HTTP/1.1 400 Refused"
            with pytest.raises(PeerFailed):  # the viewer is refused, the proxy goes on
                spicy_screenshot(
                    SpiceEndpoint(port=srv.port + 1, proxy=front), tmp_path / "no.ppm", timeout=15
                )
            assert proxy.proc.poll() is None
    assert differing_pixels(via, direct) <= CURSOR_CELL
    assert distinct_colours(read_ppm(via)[2]) > 1  # SeaBIOS' text, not a blank screen
    assert "CONNECT refused (403)" in proxy.log()
    archives = proxy.archives()
    assert archives and all(verify(a).status == "intact" for a in archives)
    session = _session_header(archives[0])
    assert session["insertion"] == "connect"
    assert session["server"] == f"127.0.0.1:{srv.port}"


def test_connect_front_terminates_tls_for_the_channels_that_use_it(tmp_path: Path) -> None:
    """A mixed server (main must be TLS, the rest plain): the viewer CONNECTs to the plain
    port, is told NEED_SECURED for main, and CONNECTs again to the TLS port; spicetap
    terminates that TLS with a certificate for the host the viewer named."""
    options = {"tls-channel": "main"}
    with (
        peers(),
        QemuServer(guest="boot", tls=True, password="s3cret", spice_options=options) as srv,
    ):
        assert srv.port is not None and srv.tls_port is not None
        assert srv.tls_material is not None
        extra = (
            "--connect-listen",
            "127.0.0.1:0",
            "--allow",
            f"127.0.0.1:{srv.port}",
            "--allow",
            f"127.0.0.1:{srv.tls_port}",
            "--upstream-ca",
            str(srv.tls_material.ca_file),
        )
        with ProxyProcess(0, tmp_path / "rec", tmp_path / "proxy", extra) as proxy:
            endpoint = SpiceEndpoint(
                port=srv.port,
                tls_port=srv.tls_port,
                password="s3cret",
                ca_file=tmp_path / "proxy" / "config" / "ca-cert.pem",  # spicetap's CA
                proxy=f"http://127.0.0.1:{proxy.ports['connect']}",
            )
            result = run_gi_client(
                endpoint,
                ClientOptions(
                    duration=10, expect_channels=ALL_CHANNELS, expect_display=True, smartcard=True
                ),
                tmp_path / "client",
            )
    assert result.returncode == 0, (result.summary, proxy.log()[-3000:])
    assert len(result.opened) == ALL_CHANNELS
    archives = proxy.archives()
    assert archives and all(verify(a).status == "intact" for a in archives)
    recs = [r for a in archives for r in iter_records(a, [])]
    tls_of: dict[str | None, list[object]] = {}
    for r in recs:
        if r.kind == "open":
            tls_of.setdefault(r.channel, []).append((r.fields or {}).get("tls"))
    plain, tls = {"viewer": False, "server": False}, {"viewer": True, "server": True}
    # refused in plain (recorded on its own: no session id yet), then over TLS
    assert len(tls_of["main"]) == 2 and plain in tls_of["main"] and tls in tls_of["main"]
    assert tls_of["display"] == [plain]
    replies = [r for r in recs if r.name == "link_reply" and r.channel == "main"]
    assert any((r.fields or {}).get("error") == "NEED_SECURED" for r in replies), replies
    # the TLS main channel's plaintext is recorded and fully dissected
    assert any(r.channel == "main" and r.name == "init" for r in recs)
    assert any(r.name == "draw_copy" for r in recs)
    assert not [r for r in recs if r.not_fully_dissected or r.kind == "tls"]
    assert "s3cret" not in proxy.log()


def test_named_target_by_connect_and_by_its_own_listener(tmp_path: Path) -> None:
    with peers(), QemuServer(guest="none") as srv:
        assert srv.port is not None
        config = tmp_path / "gateway.toml"
        config.write_text(
            f'[connect]\nlisten = "127.0.0.1:0"\n\n'
            f'[targets.vm1]\nupstream = "127.0.0.1:{srv.port}"\nlisten = "127.0.0.1:0"\n'
        )
        extra = ("--config", str(config))
        with ProxyProcess(0, tmp_path / "rec", tmp_path / "proxy", extra) as proxy:
            front = f"http://127.0.0.1:{proxy.ports['connect']}"
            direct = settled_screenshot(srv.endpoint(), tmp_path / "direct.ppm")
            # the viewer names the target; the port it gives does not matter
            by_name = spicy_screenshot(
                SpiceEndpoint(host="vm1", port=5900, proxy=front), tmp_path / "name.ppm"
            )
            own = spicy_screenshot(
                SpiceEndpoint(port=proxy.ports["plain:vm1"]), tmp_path / "own.ppm"
            )
            # nothing else is reachable: the allow-list is empty
            assert _connect_status(proxy.ports["connect"], "127.0.0.1:22") == (
                b"HTTP/1.1 403 Forbidden"
            )
    assert differing_pixels(by_name, direct) <= CURSOR_CELL
    assert differing_pixels(own, direct) <= CURSOR_CELL
    headers = [_session_header(a) for a in proxy.archives()]
    assert sorted(str(h["insertion"]) for h in headers) == ["connect", "reverse"]
    assert all(h["target"] == "vm1" for h in headers)


def test_a_load_balancer_before_the_connect_front_names_the_viewer(tmp_path: Path) -> None:
    """spicy-screenshot (SPICE_PROXY) -> haproxy in TCP mode (send-proxy-v2, from
    127.0.0.2) -> the CONNECT front -> QEMU: each channel is spicy's own address and port,
    recorded with the balancer that named it, and neither the header nor the CONNECT
    request reaches QEMU. From the trusted address a request without a header is refused
    before it is read, and recorded."""
    with peers(), QemuServer(guest="none") as srv:
        assert srv.port is not None
        extra = (
            *("--connect-listen", "127.0.0.1:0", "--allow", f"127.0.0.1:{srv.port}"),
            *("--proxy-protocol-from", PROXY_SOURCE),
        )
        with ProxyProcess(0, tmp_path / "rec", tmp_path / "proxy", extra) as proxy:
            at = proxy.ports["connect"]
            with Haproxy(at, tmp_path / "haproxy", "send-proxy-v2") as haproxy:
                balancer = f"http://127.0.0.1:{haproxy.port}"
                endpoint = SpiceEndpoint(port=srv.port, proxy=balancer)
                shot = spicy_screenshot(endpoint, tmp_path / "via.ppm")
            with socket.socket() as c:  # the trusted address, no header before its request
                c.bind((PROXY_SOURCE, 0))
                c.settimeout(5)
                c.connect(("127.0.0.1", at))
                c.sendall(f"CONNECT 127.0.0.1:{srv.port} HTTP/1.1\r\n\r\n".encode())
                assert c.recv(64) == b""  # no answer: refused before the request was read
            wait_until(
                lambda: "PROXY protocol: no PROXY protocol header" in proxy.log(),
                timeout=10,
                what="the refusal logged",
            )
            log = proxy.log()
    assert distinct_colours(read_ppm(shot)[2]) > 1  # SeaBIOS' text came through
    assert "bad link magic" not in log and "CONNECT refused" not in log
    recs = [r for a in proxy.archives() for r in iter_records(a, [])]
    opens = [r.fields or {} for r in recs if r.kind == "open"]
    behind = [f for f in opens if "forwarded_by" in f]
    assert len(behind) >= 2, opens  # main and display at least
    for fields in behind:  # each channel's own port, as haproxy saw it
        assert fields["client"].startswith("127.0.0.1:"), fields
        assert not fields["client"].endswith(":0"), fields
        assert fields["forwarded_by"].startswith(f"{PROXY_SOURCE}:"), fields
    linked = [_session_header(a) for a in proxy.archives()]
    linked = [s for s in linked if s.get("id") is not None]
    assert len(linked) == 1 and linked[0]["insertion"] == "connect", linked
    assert str(linked[0]["forwarded_by"]).startswith(f"{PROXY_SOURCE}:"), linked
    refused = [r for r in recs if r.kind == "error" and "PROXY" in (r.error or "")]
    assert refused and str(refused[0].error).startswith("PROXY protocol: no PROXY protocol")
    (opened,) = [
        r.fields or {} for r in recs if r.kind == "open" and r.connection == refused[0].connection
    ]
    assert opened["client"].startswith(f"{PROXY_SOURCE}:")  # the balancer itself
    assert opened["server"] == f"127.0.0.1:{at}", opened  # the front: no target was named
