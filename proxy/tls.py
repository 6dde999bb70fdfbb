"""TLS for both legs: spicetap's own CA (created on first use in the config directory), the
certificate it presents to viewers, and the checks it makes of the real server.

SPICE viewers check the server either by host name (OpenSSL's usual check, as
spicy-screenshot does) or by comparing the certificate's subject with a given
"host subject" string such as "C=XX,O=Example,CN=host" (spice-gtk, remote-viewer
--spice-host-subject). So the certificate spicetap presents carries the subject the
operator asks for and the listen address as an IP or DNS subjectAltName.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import ssl
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from spicetap.archive.keys import config_dir

log = logging.getLogger("spicetap.proxy")

# What spicetap's CA key may sign (the same in every CA it has made)
CA_KEY_USAGE = x509.KeyUsage(
    digital_signature=True,
    key_cert_sign=True,
    crl_sign=True,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    encipher_only=False,
    decipher_only=False,
)

CA_CERT = "ca-cert.pem"
CA_KEY = "ca-key.pem"
_ATTRS = {
    "C": NameOID.COUNTRY_NAME,
    "ST": NameOID.STATE_OR_PROVINCE_NAME,
    "L": NameOID.LOCALITY_NAME,
    "O": NameOID.ORGANIZATION_NAME,
    "OU": NameOID.ORGANIZATIONAL_UNIT_NAME,
    "CN": NameOID.COMMON_NAME,
}


def default_subject(host: str) -> str:
    """The subject of certificates spicetap issues when the operator names none; `spicetap vv`
    writes the same string as the viewer's host-subject."""
    return f"O=spicetap,CN={host}"


def listen_host(host: str) -> str:
    """The address viewers use for a listener: a wildcard bind is reached on loopback."""
    return host if host not in ("", "0.0.0.0", "::") else "127.0.0.1"


class TlsSetupError(ValueError):
    """A TLS option is unusable (one line naming it)."""


def parse_subject(text: str) -> x509.Name:
    """ "C=XX,O=Example,CN=host" (spice-gtk's host-subject syntax) as an X.509 name."""
    parts = []
    for item in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = item.partition("=")
        oid = _ATTRS.get(key.strip().upper())
        if not sep or oid is None or not value:
            raise TlsSetupError(f"subject {text!r}: cannot read {item!r} (use C=..,O=..,CN=..)")
        try:  # X.509's own rules, such as a country being two letters
            parts.append(x509.NameAttribute(oid, value.strip()))
        except ValueError as exc:
            raise TlsSetupError(f"subject {text!r}: {item!r}: {exc}") from None
    if not parts:
        raise TlsSetupError(f"subject {text!r} is empty")
    return x509.Name(parts)


def subject_string(name: list[tuple[tuple[str, str], ...]]) -> str:
    """getpeercert()'s subject as "C=..,O=..,CN=.." to compare with a host subject."""
    short = {
        "countryName": "C",
        "stateOrProvinceName": "ST",
        "localityName": "L",
        "organizationName": "O",
        "organizationalUnitName": "OU",
        "commonName": "CN",
    }
    return ",".join(f"{short.get(k, k)}={v}" for rdn in name for k, v in rdn)


def _norm(subject: str) -> str:
    return ",".join(p.strip().replace(" = ", "=") for p in subject.split(",") if p.strip())


@dataclass(frozen=True)
class Ca:
    cert: x509.Certificate
    key: rsa.RSAPrivateKey
    cert_path: Path


def load_or_create_ca(directory: Path | None = None) -> Ca:
    folder = directory or config_dir()
    cert_path, key_path = folder / CA_CERT, folder / CA_KEY
    if cert_path.is_file() and key_path.is_file():
        try:
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        except (ValueError, TypeError) as exc:  # TypeError: the key wants a passphrase
            why = (
                "the key is protected by a passphrase"
                if isinstance(exc, TypeError)
                else ("not a PEM certificate and key")
            )
            raise TlsSetupError(
                f"spicetap's CA ({cert_path}, {key_path}): {why}; move them away and a new "
                "CA is made (viewers then need its ca-cert.pem)"
            ) from None
        if not isinstance(key, rsa.RSAPrivateKey):
            raise TlsSetupError(f"{key_path}: not an RSA private key")
        if not _has_extension(cert, x509.SubjectKeyIdentifier):
            log.warning(
                "spicetap's CA %s has no subject key identifier (made before spicetap gave "
                "it one): viewers accept it, strict TLS clients (Python 3.13's default) do "
                "not; move ca-cert.pem and ca-key.pem away to have a new one made",
                cert_path,
            )
        return Ca(cert, key, cert_path)
    folder.mkdir(parents=True, exist_ok=True)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "spicetap"),
            x509.NameAttribute(NameOID.COMMON_NAME, "spicetap local CA"),
        ]
    )
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(CA_KEY_USAGE, critical=True)
        .sign(key, hashes.SHA256())
    )
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return Ca(cert, key, cert_path)


def _has_extension(cert: x509.Certificate, kind: type[x509.ExtensionType]) -> bool:
    try:
        cert.extensions.get_extension_for_class(kind)
    except x509.ExtensionNotFound:
        return False
    return True


def issue_server_cert(ca: Ca, subject: str, names: list[str], folder: Path) -> tuple[Path, Path]:
    """A server certificate for `subject` with `names` (IPs or DNS) as subjectAltNames;
    returns (cert chain path, key path) written to `folder` (key mode 0600)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    folder.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = folder / "spicetap-server-cert.pem", folder / "spicetap-server-key.pem"
    cert_path.write_bytes(chain_pem(ca, server_cert(ca, subject, names, key)))
    write_key(key, key_path)
    return cert_path, key_path


def server_cert(ca: Ca, subject: str, names: list[str], key: rsa.RSAPrivateKey) -> x509.Certificate:
    """A certificate for `key`, issued by spicetap's CA to `subject` and `names`."""
    sans: list[x509.GeneralName] = []
    for n in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            sans.append(x509.DNSName(n))
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(parse_subject(subject))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=825))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        # Both key identifiers: RFC 5280 4.2.1.1-2 asks for them, and strict verifiers
        # (OpenSSL's X509_STRICT, Python 3.13's default contexts) refuse a chain without.
        # The authority's comes from the CA's key, so a CA made before it had its own
        # identifier still issues certificates that pass.
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
            critical=False,
        )
        .sign(ca.key, hashes.SHA256())
    )


def chain_pem(ca: Ca, cert: x509.Certificate) -> bytes:
    """The certificate, then the CA's: what a viewer is shown."""
    pem = serialization.Encoding.PEM
    return cert.public_bytes(pem) + ca.cert.public_bytes(pem)


def write_key(key: rsa.RSAPrivateKey, path: Path) -> None:
    path.touch(mode=0o600)  # before the key is in it
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def server_context(cert: Path, key: Path, keylog: Path | None) -> ssl.SSLContext:
    """What spicetap presents to viewers."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)

    def no_passphrase() -> bytes:  # else OpenSSL prompts on the terminal, and waits
        raise TlsSetupError(f"key {key} is protected by a passphrase: give an unprotected key")

    try:
        ctx.load_cert_chain(cert, key, password=no_passphrase)
    except ssl.SSLError:  # its text is OpenSSL's, such as "[SSL] PEM lib (_ssl.c:3905)"
        raise TlsSetupError(
            f"certificate {cert} / key {key}: not a PEM certificate chain and its private key"
        ) from None
    except OSError as exc:
        raise TlsSetupError(f"certificate {cert} / key {key}: {exc.strerror or exc}") from None
    ctx.options |= ssl.OP_NO_RENEGOTIATION  # see client_context
    if keylog is not None:
        ctx.keylog_filename = str(keylog)
    return ctx


def context_from_pem(
    chain: bytes, key: rsa.RSAPrivateKey, folder: Path, keylog: Path | None
) -> ssl.SSLContext:
    """OpenSSL loads certificates and keys from files only: each goes to a file of its
    own in `folder` (mode 0600, a name no other process or thread uses), is loaded, and
    is removed; the key then lives in memory only."""
    folder.mkdir(parents=True, exist_ok=True)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    paths: list[Path] = []
    try:
        for data in (chain, key_pem):
            fd, name = tempfile.mkstemp(dir=folder, suffix=".pem")  # mode 0600
            paths.append(Path(name))
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        return server_context(paths[0], paths[1], keylog)
    finally:
        for path in paths:
            path.unlink(missing_ok=True)


def client_context(
    ca_file: Path | None, insecure: bool, keylog: Path | None, *, check_hostname: bool = False
) -> ssl.SSLContext:
    """How spicetap checks the real server: its CA, then either the SPICE host subject after
    the handshake (check_hostname False) or, as viewers do without one, the host name."""
    if insecure:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    else:
        try:
            ctx = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
        except (OSError, ssl.SSLError) as exc:
            raise TlsSetupError(f"upstream CA {ca_file}: {exc}") from None
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.check_hostname = check_hostname
        # The same checks on every Python, those viewers make (spice-gtk: OpenSSL's
        # defaults): Python 3.13's contexts add X509_STRICT, which refuses a server
        # certificate without key identifiers (as older tools make them) that viewers
        # accept, and PARTIAL_CHAIN, which trusts an intermediate CA on its own.
        ctx.verify_flags = ssl.VERIFY_X509_TRUSTED_FIRST
    # TLS 1.2 renegotiation: spice-server never asks for it, and a handshake inside the
    # stream stalls a write in the middle of forwarding (OpenSSL wants to read first),
    # which cost the channel and the bytes it was sending. Refused with an alert; OpenSSL 3
    # already refuses a viewer's request by default, this says it for both sides.
    ctx.options |= ssl.OP_NO_RENEGOTIATION
    if keylog is not None:
        ctx.keylog_filename = str(keylog)
    return ctx


def check_subject(peer: dict[str, object] | None, expected: str | None) -> str | None:
    """None when the peer's subject is the expected one (or none is expected), else why."""
    if expected is None:
        return None
    subject = peer.get("subject") if peer else None
    if not isinstance(subject, tuple):
        return "the server presented no certificate subject"
    got = subject_string(list(subject))
    if _norm(got) != _norm(expected):
        return f"server subject {got!r} is not the expected {expected!r}"
    return None


class HostCertificates:
    """Server contexts for whatever host name a viewer asked for (the CONNECT front): viewers
    check the certificate against the host they CONNECTed to, or against a host subject.
    Issued once per host and kept in memory (bounded; the oldest is forgotten first).

    All hosts share one key, made at the first use: a key per host cost about 0.1 s of CPU
    each, which any allowed viewer could make spicetap spend again and again (every
    spelling of a name, every address of an allowed block). Issuing is then a signature.
    The key is kept in memory; it and a certificate are written to `folder` only to be
    loaded (context_from_pem)."""

    def __init__(
        self, ca: Ca, subject: str | None, keylog: Path | None, folder: Path, limit: int = 256
    ) -> None:
        self.ca, self.subject, self.keylog, self.folder = ca, subject, keylog, folder
        self.limit = limit
        self._contexts: dict[str, ssl.SSLContext] = {}
        self._key: rsa.RSAPrivateKey | None = None
        self._lock = threading.Lock()  # contexts are made in worker threads

    def context_for(self, host: str) -> ssl.SSLContext:
        """Blocking (key generation on first use, then a signature per new host): run it
        in a thread."""
        host = host.lower().rstrip(".")  # as the allow-list compares names
        with self._lock:
            ctx = self._contexts.get(host)
            if ctx is None:
                ctx = self._issue(host)
                if len(self._contexts) >= self.limit:
                    self._contexts.pop(next(iter(self._contexts)))
                self._contexts[host] = ctx
            return ctx

    def _issue(self, host: str) -> ssl.SSLContext:
        if self._key is None:
            self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        cert = server_cert(self.ca, self.subject or default_subject(host), [host], self._key)
        return context_from_pem(chain_pem(self.ca, cert), self._key, self.folder, self.keylog)
