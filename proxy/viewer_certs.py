"""The certificates spicetap's TLS fronts present to viewers, and what an operator watches
of them.

A front presents either the user's own certificate (`--tls-cert`/`--tls-key`, or
`tls_cert`/`tls_key` in the config file) or one spicetap's CA issues to the listener's
host. The user's files are read at each start and reload: a certificate renewed in place
(certbot, an internal CA's short-lived certificates) is presented to viewers from the next
reload on, with no session dropped. An issued one is made once per subject and host and
kept across reloads (a 2048-bit key costs about 0.1 s of CPU), until it nears its end.

Blocking (files, key generation): built in a worker thread at a reload.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import ssl
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from proxy.tls import (
    Ca,
    TlsSetupError,
    chain_pem,
    context_from_pem,
    default_subject,
    server_cert,
    server_context,
)
from spicetap.archive.keys import config_dir

log = logging.getLogger("spicetap.proxy")

# an issued certificate this close to its end is issued again at the next reload (it is
# valid for 825 days: proxy/tls.py server_cert)
REISSUE_BEFORE = datetime.timedelta(days=30)
# a certificate this close to its end is warned about at each start and reload
WARN_BEFORE = datetime.timedelta(days=14)


def issued_folder() -> Path:
    """Where issued certificates and keys are written, only to be loaded (and removed)."""
    return config_dir() / "issued"


@dataclass(frozen=True)
class CertificateChoice:
    """What a TLS front presents: the user's certificate chain and key, or (neither) one
    spicetap's CA issues to `subject` (None: O=spicetap,CN=<listen host>)."""

    cert: Path | None = None
    key: Path | None = None
    subject: str | None = None


@dataclass(frozen=True)
class ViewerCertificate:
    """A certificate a TLS front presents, with the context that presents it."""

    context: ssl.SSLContext = field(compare=False, repr=False)
    fingerprint: str  # SHA-256 of the certificate (DER), hex: a renewed one differs
    subject: str  # as viewers' host-subject option spells it: "O=..,CN=.."
    not_before: datetime.datetime
    not_after: datetime.datetime
    source: Path | None  # the user's certificate file; None: issued by spicetap's CA
    # an issued one's: the host it names and the CA's fingerprint (reused while both hold)
    issued_for: tuple[str, str] | None = None

    def named(self) -> str:
        """To whom, and whose: "O=..,CN=.. (from FILE)"."""
        whose = f"from {self.source}" if self.source is not None else "issued by spicetap's CA"
        return f"{self.subject} ({whose})"

    def describe(self) -> str:
        """One line for the log: to whom, whose, until when, which."""
        until = self.not_after.strftime("%Y-%m-%d %H:%M UTC")
        return f"{self.named()}, valid until {until}, SHA-256 {self.fingerprint[:16]}"

    def problem(self, now: datetime.datetime) -> str | None:
        """Why viewers refuse this certificate, or soon will; None when it is good."""
        if now < self.not_before:
            return f"is not valid before {self.not_before:%Y-%m-%d %H:%M} UTC: viewers refuse it"
        if now >= self.not_after:
            return f"expired on {self.not_after:%Y-%m-%d %H:%M} UTC: viewers refuse it"
        left = self.not_after - now
        if left < WARN_BEFORE:
            days = left.total_seconds() / 86400
            return f"expires in {days:.1f} days ({self.not_after:%Y-%m-%d %H:%M} UTC)"
        return None


def _details(leaf: x509.Certificate) -> tuple[str, str, datetime.datetime, datetime.datetime]:
    fingerprint = hashlib.sha256(leaf.public_bytes(serialization.Encoding.DER)).hexdigest()
    # in the certificate's order, as spice-gtk's host-subject spells it (RFC 4514's
    # string would reverse it)
    subject = ",".join(attr.rfc4514_string() for attr in leaf.subject)
    return fingerprint, subject, leaf.not_valid_before_utc, leaf.not_valid_after_utc


def load_user_certificate(cert: Path, key: Path, keylog: Path | None) -> ViewerCertificate:
    """The user's chain (the first certificate is the front's) and key; TlsSetupError
    names what is wrong with them."""
    context = server_context(cert, key, keylog)  # checks that the key is the certificate's
    try:
        leaf = x509.load_pem_x509_certificates(cert.read_bytes())[0]
    except (OSError, ValueError) as exc:  # replaced between the two reads
        raise TlsSetupError(f"certificate {cert}: {exc}") from None
    fingerprint, subject, not_before, not_after = _details(leaf)
    return ViewerCertificate(context, fingerprint, subject, not_before, not_after, cert)


def issue_certificate(
    ca: Ca, ca_fingerprint: str, subject: str, host: str, folder: Path, keylog: Path | None
) -> ViewerCertificate:
    """A certificate spicetap's CA issues to `subject`, naming `host` and localhost."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    leaf = server_cert(ca, subject, [host, "localhost"], key)
    context = context_from_pem(chain_pem(ca, leaf), key, folder, keylog)
    fingerprint, _, not_before, not_after = _details(leaf)
    # the subject as given: what `spicetap vv` and a migration tell viewers to expect
    return ViewerCertificate(
        context, fingerprint, subject, not_before, not_after, None, (host, ca_fingerprint)
    )


def ca_fingerprint(ca: Ca) -> str:
    return hashlib.sha256(ca.cert.public_bytes(serialization.Encoding.DER)).hexdigest()


class ViewerCertificates:
    """The certificates of one build of the fronts (the start, or a reload): each file
    read and each certificate issued once, whatever number of fronts present it, and
    issued ones `kept` from the running fronts reused."""

    def __init__(
        self,
        load_ca: Callable[[], Ca],
        folder: Path,
        keylog: Path | None,
        kept: Iterable[ViewerCertificate] = (),
        now: datetime.datetime | None = None,
    ) -> None:
        self.load_ca = load_ca  # spicetap's CA, made on first use: only when one is issued
        self._ca: Ca | None = None
        self.folder = folder
        self.keylog = keylog
        self.now = now or datetime.datetime.now(datetime.UTC)
        self._made: dict[tuple[object, ...], ViewerCertificate] = {}
        self._kept = [c for c in kept if c.issued_for is not None]

    def present(self, choice: CertificateChoice, host: str) -> ViewerCertificate:
        """What a front on `host` presents; TlsSetupError when the user's files (or
        spicetap's CA) cannot be used."""
        if choice.cert is not None and choice.key is not None:
            key: tuple[object, ...] = ("file", choice.cert, choice.key)
            if key not in self._made:
                made = load_user_certificate(choice.cert, choice.key, self.keylog)
                self._made[key] = self._checked(made)
            return self._made[key]
        subject = choice.subject or default_subject(host)
        if self._ca is None:
            self._ca = self.load_ca()
        ca = self._ca
        issuer = ca_fingerprint(ca)
        key = ("issued", subject, host, issuer)
        if key not in self._made:
            made = self._kept_for(subject, host, issuer) or issue_certificate(
                ca, issuer, subject, host, self.folder, self.keylog
            )
            self._made[key] = self._checked(made)
        return self._made[key]

    def _checked(self, cert: ViewerCertificate) -> ViewerCertificate:
        say_problem(cert, self.now)
        return cert

    def _kept_for(self, subject: str, host: str, issuer: str) -> ViewerCertificate | None:
        for cert in self._kept:
            fresh = cert.not_after - self.now > REISSUE_BEFORE
            if cert.subject == subject and cert.issued_for == (host, issuer) and fresh:
                return cert
        return None


def say_problem(cert: ViewerCertificate, now: datetime.datetime) -> None:
    """Said at each start and reload, and twice a day, while it lasts: a certificate
    viewers refuse (an error), or soon will (a warning). It is still served: the plain
    fronts and the other certificates are not held back by it."""
    problem = cert.problem(now)
    if problem is not None:
        refused = now >= cert.not_after or now < cert.not_before
        level = logging.ERROR if refused else logging.WARNING
        log.log(level, "the TLS certificate %s %s", cert.named(), problem)
