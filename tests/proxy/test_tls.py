"""spicetap's certificates and its checks of the server, the same on every Python: strict
verifiers (Python 3.13's default contexts) accept what spicetap issues, and spicetap accepts
the server certificates viewers accept."""

from __future__ import annotations

import datetime
import ipaddress
import logging
import socket
import ssl
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from proxy.io.ends import TlsEnd, tls_end
from proxy.tls import (
    CA_CERT,
    CA_KEY,
    CA_KEY_USAGE,
    client_context,
    issue_server_cert,
    load_or_create_ca,
    server_context,
)
from tests.proxy.test_pumps import TIMEOUT, in_threads

HANDSHAKE_TIMEOUT = TIMEOUT / 2  # in_threads outwaits a handshake that times out


def _pem_key(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def bare_pki(folder: Path) -> tuple[Path, Path]:
    """A CA and a server certificate (cert, key) with no key identifiers, as older tools
    made them; the CA as ca-cert.pem and ca-key.pem, where spicetap keeps its own."""
    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    server_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bare CA")])
    now = datetime.datetime.now(datetime.UTC)

    def builder(subject: x509.Name, key: rsa.RSAPrivateKey) -> x509.CertificateBuilder:
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=10))
        )

    ca = (
        builder(ca_name, ca_key)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(CA_KEY_USAGE, critical=True)  # as spicetap's own CAs have it
        .sign(ca_key, hashes.SHA256())
    )
    server = (
        builder(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bare")]), server_key)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CA_CERT).write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (folder / CA_KEY).write_bytes(_pem_key(ca_key))
    cert, key = folder / "server-cert.pem", folder / "server-key.pem"
    cert.write_bytes(server.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(_pem_key(server_key))
    return cert, key


def handshake(server: ssl.SSLContext, client: ssl.SSLContext) -> list[BaseException | None]:
    """Both sides of a TLS handshake over a socket pair: what each raised, or None."""
    a, b = socket.socketpair()
    with a, b:
        server_end = tls_end(a, server, server_side=True)
        client_end = tls_end(b, client, server_side=False, server_hostname="127.0.0.1")

        def run(end: TlsEnd) -> tuple[BaseException | None]:
            """What the handshake raised, boxed: in_threads re-raises bare exceptions."""
            try:
                end.handshake(HANDSHAKE_TIMEOUT)
            except (OSError, TimeoutError) as exc:  # ssl.SSLError is an OSError
                return (exc,)
            return (None,)

        results = in_threads(lambda: run(server_end), lambda: run(client_end))
        return [box[0] for box in results]


def strict(ca_file: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca_file))
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT  # what Python 3.13's contexts do by default
    return ctx


def test_what_spicetap_issues_passes_a_strict_verifier(tmp_path: Path) -> None:
    ca = load_or_create_ca(tmp_path)
    cert, key = issue_server_cert(ca, "O=spicetap,CN=test", ["127.0.0.1"], tmp_path)
    assert handshake(server_context(cert, key, None), strict(tmp_path / CA_CERT)) == [None, None]


def test_a_ca_from_before_key_identifiers_still_issues_and_is_named(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """spicetap's CA made by an older spicetap: what it issues still verifies as viewers
    verify; a strict client refuses it, and the log says why and what to do."""
    bare_pki(tmp_path)
    with caplog.at_level(logging.WARNING, logger="spicetap.proxy"):
        ca = load_or_create_ca(tmp_path)
    assert "has no subject key identifier" in caplog.text
    assert str(tmp_path / CA_CERT) in caplog.text
    cert, key = issue_server_cert(ca, "O=spicetap,CN=test", ["127.0.0.1"], tmp_path)
    ours = server_context(cert, key, None)
    assert handshake(ours, client_context(tmp_path / CA_CERT, False, None)) == [None, None]
    refused = handshake(ours, strict(tmp_path / CA_CERT))[1]
    assert isinstance(refused, ssl.SSLCertVerificationError)
    assert "Subject Key Identifier" in str(refused)


def test_a_new_ca_gives_no_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="spicetap.proxy"):
        load_or_create_ca(tmp_path)  # made
        load_or_create_ca(tmp_path)  # read back
    assert not caplog.records


def test_the_server_is_checked_as_viewers_check_it(tmp_path: Path) -> None:
    """A server certificate without key identifiers passes, as it does in spice-gtk, on
    every Python (3.13's default flags would refuse it)."""
    cert, key = bare_pki(tmp_path)
    ours = client_context(tmp_path / CA_CERT, False, None)
    assert ours.verify_flags == ssl.VERIFY_X509_TRUSTED_FIRST
    assert handshake(server_context(cert, key, None), ours) == [None, None]


def test_a_refused_handshake_tells_the_peer_at_once(tmp_path: Path) -> None:
    """The side that refuses sends its alert before giving up: the other side fails with
    it, well before its own timeout, instead of waiting on an open socket."""
    cert, key = bare_pki(tmp_path / "server")
    other = load_or_create_ca(tmp_path / "other")
    server_error, client_error = handshake(
        server_context(cert, key, None), client_context(other.cert_path, False, None)
    )
    assert isinstance(client_error, ssl.SSLCertVerificationError)
    assert isinstance(server_error, ssl.SSLError), server_error
    assert "UNKNOWN_CA" in str(server_error).upper(), server_error


def test_neither_side_renegotiates(tmp_path: Path) -> None:
    """A server's TLS 1.2 HelloRequest stalled a write mid-forwarding (OpenSSL wanted to
    read first): the channel ended as "server closed" and the viewer's last bytes were
    neither delivered nor recorded. Both sides now refuse it with an alert."""
    ca = load_or_create_ca(tmp_path)
    cert, key = issue_server_cert(ca, "O=spicetap,CN=127.0.0.1", ["127.0.0.1"], tmp_path / "s")
    for ctx in (client_context(tmp_path / CA_CERT, False, None), server_context(cert, key, None)):
        assert ctx.options & ssl.OP_NO_RENEGOTIATION


def test_host_certificates_share_one_key_and_leave_no_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CONNECT front issues a certificate for whatever allowed host a viewer names. A
    new RSA key for each (about 0.1 s of CPU) let any allowed viewer make spicetap spend
    that again and again, for every spelling of a name and every address of a block."""
    from proxy import tls

    ca = load_or_create_ca(tmp_path)
    made = []
    real = rsa.generate_private_key  # the module proxy.tls calls it from

    def counted(public_exponent: int, key_size: int) -> rsa.RSAPrivateKey:
        made.append(key_size)
        return real(public_exponent=public_exponent, key_size=key_size)

    monkeypatch.setattr(rsa, "generate_private_key", counted)
    hosts = tls.HostCertificates(ca, None, None, tmp_path / "hosts")
    spellings = [hosts.context_for(h) for h in ("localhost", "LOCALhost", "localhost.")]
    assert spellings[0] is spellings[1] is spellings[2]  # as the allow-list compares names
    for i in range(20):
        hosts.context_for(f"10.0.0.{i}")
    assert made == [2048]
    # the key lives in memory: written only to be loaded, as each certificate is
    assert list((tmp_path / "hosts").iterdir()) == []

    served = hosts.context_for("10.0.0.7")  # the viewer's check passes against the name
    client = ssl.create_default_context(cafile=str(tmp_path / CA_CERT))
    a, b = socket.socketpair()
    with (
        served.wrap_socket(a, server_side=True, do_handshake_on_connect=False) as server_end,
        client.wrap_socket(b, server_hostname="10.0.0.7", do_handshake_on_connect=False) as end,
    ):
        in_threads(server_end.do_handshake, end.do_handshake)
