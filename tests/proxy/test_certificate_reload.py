"""The certificate a TLS front shows viewers, across reloads: a renewed file is shown from
the reload on, an issued one is kept (not issued again), and the operator sees each
certificate's end in /metrics. Real listeners and real handshakes on loopback (a real
viewer: tests/integration/test_certificate_renewal.py)."""

from __future__ import annotations

import logging
import shutil
import socket
import ssl
from datetime import timedelta
from pathlib import Path

import pytest
import trio
import trio.testing
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from proxy.io import certwatch
from proxy.io.certwatch import renew_certificates
from proxy.io.management import ManagementApi, ManagementOptions, serve_management
from proxy.io.migration import MigrationListeners
from proxy.io.reloading import ReloadFailed
from proxy.io.server import ProxyState
from tests.harness import make_tls_material
from tests.proxy.test_reload import Setup, running

TLS_VM1 = '[targets.vm1]\nupstream = "127.0.0.1:{a}"\ntls_listen = "127.0.0.1:0"\n'


def _shown(port: int, ca_file: Path | None) -> bytes:
    """The certificate (DER) a viewer is shown on `port`, checked against `ca_file`
    (None: not checked). Blocking."""
    if ca_file is None:
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    else:
        context = ssl.create_default_context(cafile=str(ca_file))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as sock,
        context.wrap_socket(sock, server_hostname="127.0.0.1") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


async def shown(port: int, ca_file: Path | None = None) -> bytes:
    return await trio.to_thread.run_sync(_shown, port, ca_file)


def _der(pem_file: Path) -> bytes:
    cert = x509.load_pem_x509_certificate(pem_file.read_bytes())
    return cert.public_bytes(serialization.Encoding.DER)


def _file_config(live: Path) -> str:
    files = f'tls_cert = "{live / "cert.pem"}"\ntls_key = "{live / "key.pem"}"\n'
    return "[proxy]\n" + files.replace("{", "{{").replace("}", "}}") + "\n" + TLS_VM1


def _install(material: Path, live: Path, key_from: Path | None = None) -> None:
    """As a renewal tool does: the new files over the old ones."""
    live.mkdir(exist_ok=True)
    shutil.copy(material / "server-cert.pem", live / "cert.pem")
    shutil.copy((key_from or material) / "server-key.pem", live / "key.pem")


async def test_a_renewed_certificate_file_is_shown_from_the_reload_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SPICETAP_CONFIG_DIR", str(tmp_path / "config"))
    first, second = make_tls_material(tmp_path / "a"), make_tls_material(tmp_path / "b")
    live = tmp_path / "live"
    _install(first.x509_dir, live)
    async with running(tmp_path, _file_config(live)) as setup:
        port = setup.port_of("tls:vm1")
        setup.listeners.follow_migration = True  # its migrations show the same certificate
        report = await setup.reloader.reload()
        assert report.renewed == []  # the same file: nothing to say
        assert await shown(port, first.ca_file) == _der(first.x509_dir / "server-cert.pem")

        _install(second.x509_dir, live)
        report = await setup.reloader.reload()
        (line,) = report.renewed
        assert line.startswith(f"tls:vm1 127.0.0.1:{port}: C=XX,O=spicetap-test,CN=127.0.0.1")
        assert f"from {live / 'cert.pem'}" in line
        assert "show a new certificate" in report.summary()
        assert report.json()["listeners"]["renewed"] == [line]
        assert await shown(port, second.ca_file) == _der(second.x509_dir / "server-cert.pem")
        with pytest.raises(ssl.SSLCertVerificationError):  # the old CA's viewers see it
            await shown(port, first.ca_file)
        routing = setup.listeners.running[next(iter(setup.listeners.running))].routing
        assert isinstance(routing.migration, MigrationListeners)
        assert routing.migration.viewer_tls is routing.tls

        # a renewal caught half-way (the new certificate, the old key): nothing changes
        _install(first.x509_dir, live, key_from=second.x509_dir)
        with pytest.raises(ReloadFailed, match=r"cert\.pem"):
            await setup.reloader.reload()
        assert await shown(port, second.ca_file) == _der(second.x509_dir / "server-cert.pem")


async def test_an_issued_certificate_is_kept_until_its_subject_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SPICETAP_CONFIG_DIR", str(tmp_path / "config"))
    subject = '[proxy]\ntls_subject = "O=Example,CN=gateway"\n\n'
    async with running(tmp_path, subject + TLS_VM1) as setup:
        port = setup.port_of("tls:vm1")
        ca_file = tmp_path / "config" / "ca-cert.pem"
        before = await shown(port, ca_file)
        assert _subject(before) == "O=Example,CN=gateway"
        assert (await setup.reloader.reload()).renewed == []
        assert await shown(port, ca_file) == before  # kept: no new key, no new certificate

        # a target of its own subject (a .vv file's host-subject for that VM)
        setup.write(subject + TLS_VM1 + 'tls_subject = "C=XX,O=Example,CN=vm1"\n')
        (line,) = (await setup.reloader.reload()).renewed
        assert "C=XX,O=Example,CN=vm1 (issued by spicetap's CA)" in line
        assert _subject(await shown(port, ca_file)) == "C=XX,O=Example,CN=vm1"
        running_route = setup.listeners.running[next(iter(setup.listeners.running))].route
        assert running_route.subject == "C=XX,O=Example,CN=vm1"  # what migrations tell viewers
        # what is left in the config directory: no key of a listener's certificate
        assert list((tmp_path / "config" / "issued").iterdir()) == []


def _subject(der: bytes) -> str:
    cert = x509.load_der_x509_certificate(der)
    return ",".join(attr.rfc4514_string() for attr in cert.subject)


async def test_metrics_give_each_tls_fronts_certificate_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SPICETAP_CONFIG_DIR", str(tmp_path / "config"))
    material = make_tls_material(tmp_path / "a")
    live = tmp_path / "live"
    _install(material.x509_dir, live)
    plain = '\n[targets.vm2]\nupstream = "127.0.0.1:{b}"\nlisten = "127.0.0.1:0"\n'
    config = _file_config(live) + plain
    async with running(tmp_path, config) as setup:
        options = ManagementOptions(("127.0.0.1", 0), None, None, None)
        api = ManagementApi(options, ProxyState(), None, None, setup.reloader)
        text = (await api.answer("GET", "/metrics", b"")).body.decode()
        cert = x509.load_pem_x509_certificate((live / "cert.pem").read_bytes())
        end = int(cert.not_valid_after_utc.timestamp())
        port = setup.port_of("tls:vm1")
        assert (
            "spicetap_tls_certificate_expiry_timestamp_seconds{"
            f'listener="tls:vm1 127.0.0.1:{port}",subject="C=XX,O=spicetap-test,CN=127.0.0.1"}} '
            f"{end}"
        ) in text.splitlines()
        # the plain listener has none
        assert text.count("spicetap_tls_certificate_expiry_timestamp_seconds{") == 1


async def test_the_connect_front_issues_to_the_subject_the_file_now_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SPICETAP_CONFIG_DIR", str(tmp_path / "config"))
    connect = '[connect]\nlisten = "127.0.0.1:0"\nallow = ["127.0.0.1:5900"]\n\n'
    first = '[proxy]\ntls_subject = "O=Example,CN=first"\n\n' + connect
    async with running(tmp_path, first + TLS_VM1) as setup:
        front = setup.listeners.connect
        assert front is not None
        kept = front.front.certificates
        await setup.reloader.reload()
        assert front.front.certificates is kept  # its issued certificates stay cached
        setup.write(first.replace("CN=first", "CN=second") + TLS_VM1)
        await setup.reloader.reload()
        issued = front.front.certificates
        assert issued is not kept and issued.subject == "O=Example,CN=second"


async def test_an_issued_certificate_near_its_end_is_issued_again_while_the_proxy_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """No reload needed: what spicetap's CA issued is issued again once within 30 days of
    its end, shown from then on, and kept by the next reload; the operator's own
    certificate near its end is said in the log (renewing it is theirs)."""
    monkeypatch.setenv("SPICETAP_CONFIG_DIR", str(tmp_path / "config"))
    material = make_tls_material(tmp_path / "a")  # valid for 30 days
    live = tmp_path / "live"
    _install(material.x509_dir, live)
    theirs = '\n[targets.vm2]\nupstream = "127.0.0.1:{b}"\ntls_listen = "127.0.0.1:0"\n'
    theirs += f'tls_cert = "{live / "cert.pem"}"\ntls_key = "{live / "key.pem"}"\n'
    async with running(tmp_path, TLS_VM1 + theirs) as setup:
        port = setup.port_of("tls:vm1")
        ca_file = tmp_path / "config" / "ca-cert.pem"
        before = await shown(port, ca_file)
        issued = x509.load_der_x509_certificate(before).not_valid_after_utc
        # half a year on: nothing is due
        assert await renew_certificates(setup.reloader, issued - timedelta(days=180)) == []
        assert await shown(port, ca_file) == before
        with caplog.at_level(logging.INFO, logger="spicetap.proxy"):
            renewed = await renew_certificates(setup.reloader, issued - timedelta(days=29))
        assert renewed == [f"tls:vm1 127.0.0.1:{port}"]
        after = await shown(port, ca_file)
        assert after != before and _subject(after) == _subject(before)
        said = [r.getMessage() for r in caplog.records]
        assert any(m.startswith(f"certificates: tls:vm1 127.0.0.1:{port} shows") for m in said)
        # the operator's, 30-day certificate is long expired by then
        assert any("(from " in m and "expired on" in m for m in said), said
        # the next reload keeps the new one
        assert (await setup.reloader.reload()).renewed == []
        assert await shown(port, ca_file) == after


def test_the_watch_looks_twice_a_day(monkeypatch: pytest.MonkeyPatch) -> None:
    looked: list[float] = []

    async def counted(reloader: object, now: object = None) -> list[str]:
        looked.append(trio.current_time())
        if len(looked) == 1:
            raise OSError("the CA cannot be read")  # said, and looked at again later
        return []

    async def main() -> float:
        start = trio.current_time()
        with trio.move_on_after(certwatch.CHECK_INTERVAL * 2.5):
            await certwatch.keep_certificates_current(None)  # type: ignore[arg-type]
        return start

    monkeypatch.setattr(certwatch, "renew_certificates", counted)
    start = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert [round(t - start) for t in looked] == [43200, 86400]


MANAGEMENT_TLS = 'management = "127.0.0.1:0"\nmanagement_tls = true\n'


async def _serve_api(setup: Setup, nursery: trio.Nursery) -> int:
    """The management API over HTTPS, as the proxy starts it: its port."""
    options = ManagementOptions(("127.0.0.1", 0), None, None, _context(setup))
    serving = await nursery.start(
        serve_management, options, ProxyState(), None, None, setup.reloader
    )
    port: int = serving.listeners[0].socket.getsockname()[1]
    return port


async def test_the_management_api_shows_a_renewed_certificate_from_the_reload_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The API's HTTPS presents [proxy]'s certificate, read again at each reload like the
    listeners'; it says so in the reload's report and in /metrics."""
    monkeypatch.setenv("SPICETAP_CONFIG_DIR", str(tmp_path / "config"))
    first, second = make_tls_material(tmp_path / "a"), make_tls_material(tmp_path / "b")
    live = tmp_path / "live"
    _install(first.x509_dir, live)
    config = _file_config(live).replace("[proxy]\n", "[proxy]\n" + MANAGEMENT_TLS)
    async with running(tmp_path, config) as setup, trio.open_nursery() as nursery:
        port = await _serve_api(setup, nursery)
        assert await shown(port, first.ca_file) == _der(first.x509_dir / "server-cert.pem")
        assert (await setup.reloader.reload()).renewed == []

        _install(second.x509_dir, live)
        report = await setup.reloader.reload()
        assert len(report.renewed) == 2  # the viewers' listener and the API
        assert "management API: C=XX,O=spicetap-test,CN=127.0.0.1 (from " in report.renewed[-1]
        assert await shown(port, second.ca_file) == _der(second.x509_dir / "server-cert.pem")
        with pytest.raises(ssl.SSLCertVerificationError):
            await shown(port, first.ca_file)
        options = ManagementOptions(("127.0.0.1", 9000), None, None, _context(setup))
        api = ManagementApi(options, ProxyState(), None, None, setup.reloader)
        text = (await api.answer("GET", "/metrics", b"")).body.decode()
        end = x509.load_pem_x509_certificate((live / "cert.pem").read_bytes()).not_valid_after_utc
        assert (
            'spicetap_tls_certificate_expiry_timestamp_seconds{listener="management '
            f'127.0.0.1:9000",subject="C=XX,O=spicetap-test,CN=127.0.0.1"}} '
            f"{int(end.timestamp())}"
        ) in text.splitlines()
        nursery.cancel_scope.cancel()


def _context(setup: Setup) -> ssl.SSLContext:
    cert = setup.reloader.fronts.management_tls
    assert cert is not None
    return cert.context


async def test_the_management_apis_issued_certificate_is_issued_again_near_its_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No reload needed (the twice-a-day watch); the API's certificate is issued on its
    own, apart from the viewers' listener's, whose TLS keys a key log may hold."""
    monkeypatch.setenv("SPICETAP_CONFIG_DIR", str(tmp_path / "config"))
    config = "[proxy]\n" + MANAGEMENT_TLS + "\n" + TLS_VM1
    async with running(tmp_path, config) as setup, trio.open_nursery() as nursery:
        port = await _serve_api(setup, nursery)
        ca_file = tmp_path / "config" / "ca-cert.pem"
        before = await shown(port, ca_file)
        assert before != await shown(setup.port_of("tls:vm1"), ca_file)
        assert (await setup.reloader.reload()).renewed == []  # kept, not issued again
        assert await shown(port, ca_file) == before
        issued = x509.load_der_x509_certificate(before).not_valid_after_utc
        renewed = await renew_certificates(setup.reloader, issued - timedelta(days=29))
        assert sorted(renewed) == sorted(
            [f"tls:vm1 127.0.0.1:{setup.port_of('tls:vm1')}", "management API"]
        )
        after = await shown(port, ca_file)
        assert after != before and _subject(after) == _subject(before)
        assert (await setup.reloader.reload()).renewed == []  # the next reload keeps it
        assert await shown(port, ca_file) == after
        nursery.cancel_scope.cancel()


async def test_an_api_started_over_plain_http_stays_plain_across_reloads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """management_tls waits for a restart: turned on in the file, the API does not switch
    to HTTPS under its clients (the reload says a restart is needed)."""
    monkeypatch.setenv("SPICETAP_CONFIG_DIR", str(tmp_path / "config"))
    plain = '[proxy]\nmanagement = "127.0.0.1:0"\n\n' + TLS_VM1
    async with running(tmp_path, plain) as setup:
        setup.write(plain.replace("\n\n", "\nmanagement_tls = true\n\n", 1))
        report = await setup.reloader.reload()
        assert report.restart_needed == ["[proxy] management_tls"]
        assert setup.reloader.fronts.management_tls is None
        api = ManagementApi(
            ManagementOptions(("127.0.0.1", 0)), ProxyState(), None, None, setup.reloader
        )
        assert api.https() is None
