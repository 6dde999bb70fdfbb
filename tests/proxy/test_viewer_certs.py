"""What each TLS front presents: issued once per subject and host and kept across builds
until it nears its end (or the CA changes), the user's files read at each build, and a
certificate viewers refuse (or soon will) said in the log."""

from __future__ import annotations

import datetime
import logging
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from proxy import viewer_certs
from proxy.tls import load_or_create_ca, write_key
from proxy.viewer_certs import CertificateChoice, ViewerCertificates

NOW = datetime.datetime(2026, 11, 23, 12, 0, tzinfo=datetime.UTC)


def _self_signed(folder: Path, not_before: datetime.datetime, days: float) -> CertificateChoice:
    """A user's certificate and key, valid from `not_before` for `days`."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Example"),
            x509.NameAttribute(NameOID.COMMON_NAME, "gw.example"),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_before + datetime.timedelta(days=days))
        .sign(key, hashes.SHA256())
    )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    write_key(key, folder / "key.pem")
    return CertificateChoice(folder / "cert.pem", folder / "key.pem")


def _counting_keys(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    made: list[int] = []
    real = rsa.generate_private_key

    def counted(public_exponent: int, key_size: int) -> rsa.RSAPrivateKey:
        made.append(key_size)
        return real(public_exponent=public_exponent, key_size=key_size)

    monkeypatch.setattr(rsa, "generate_private_key", counted)
    return made


def test_an_issued_certificate_is_made_once_and_kept_until_near_its_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ca = load_or_create_ca(tmp_path / "ca")
    made = _counting_keys(monkeypatch)
    first = ViewerCertificates(lambda: ca, tmp_path / "issued", None, now=NOW)
    a = first.present(CertificateChoice(), "127.0.0.1")
    assert first.present(CertificateChoice(), "127.0.0.1") is a  # a second front
    assert a.subject == "O=spicetap,CN=127.0.0.1" and a.source is None
    other = first.present(CertificateChoice(subject="C=XX,O=Example,CN=vm1"), "127.0.0.1")
    assert other.subject == "C=XX,O=Example,CN=vm1"
    assert len(made) == 2

    # the next reload's build: both kept, nothing issued
    real_now = datetime.datetime.now(datetime.UTC)
    again = ViewerCertificates(lambda: ca, tmp_path / "issued", None, [a, other], now=real_now)
    assert again.present(CertificateChoice(), "127.0.0.1") is a
    assert len(made) == 2
    # another host is another certificate (it names the host)
    assert again.present(CertificateChoice(), "127.0.0.2").fingerprint != a.fingerprint
    assert len(made) == 3

    # a reload within REISSUE_BEFORE of its end issues it again
    late = a.not_after - viewer_certs.REISSUE_BEFORE + datetime.timedelta(hours=1)
    later = ViewerCertificates(lambda: ca, tmp_path / "issued", None, [a], now=late)
    renewed = later.present(CertificateChoice(), "127.0.0.1")
    assert renewed.fingerprint != a.fingerprint and len(made) == 4

    # a new CA (the old one moved away): what the old one issued is not shown again
    new_ca = load_or_create_ca(tmp_path / "other-ca")
    moved = ViewerCertificates(lambda: new_ca, tmp_path / "issued", None, [a], now=real_now)
    assert moved.present(CertificateChoice(), "127.0.0.1").fingerprint != a.fingerprint
    assert list((tmp_path / "issued").iterdir()) == []  # keys live in memory only


def test_the_users_files_are_read_at_each_build(tmp_path: Path) -> None:
    choice = _self_signed(tmp_path / "live", NOW - datetime.timedelta(days=1), 90)
    loaded = ViewerCertificates(load_or_create_ca, tmp_path, None, now=NOW).present(
        choice, "127.0.0.1"
    )
    assert loaded.subject == "O=Example,CN=gw.example"  # in the certificate's order
    assert loaded.source == tmp_path / "live" / "cert.pem"
    assert "O=Example,CN=gw.example (from " in loaded.describe()
    assert "valid until 2027-02-20 12:00 UTC" in loaded.describe()
    _self_signed(tmp_path / "live", NOW, 90)  # renewed in place
    renewed = ViewerCertificates(load_or_create_ca, tmp_path, None, [loaded], now=NOW).present(
        choice, "127.0.0.1"
    )
    assert renewed != loaded and renewed.fingerprint != loaded.fingerprint
    assert not (tmp_path / "ca-cert.pem").exists()  # no CA made when none is needed


@pytest.mark.parametrize(
    ("starts", "days", "level", "said"),
    [
        (-1.0, 90.0, None, None),
        (-80.0, 85.0, logging.WARNING, "expires in 5.0 days (2026-11-28 12:00 UTC)"),
        (-80.0, 79.0, logging.ERROR, "expired on 2026-11-22 12:00 UTC: viewers refuse it"),
        (2.0, 90.0, logging.ERROR, "is not valid before 2026-11-25 12:00 UTC: viewers refuse it"),
    ],
)
def test_a_certificate_viewers_refuse_or_soon_will_is_said(
    starts: float,
    days: float,
    level: int | None,
    said: str | None,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    choice = _self_signed(tmp_path, NOW + datetime.timedelta(days=starts), days)
    certificates = ViewerCertificates(load_or_create_ca, tmp_path, None, now=NOW)
    with caplog.at_level(logging.INFO, logger="spicetap.proxy"):
        certificates.present(choice, "127.0.0.1")
        certificates.present(choice, "127.0.0.2")  # another front, the same file: said once
    if said is None:
        assert caplog.records == []
        return
    (record,) = caplog.records
    assert record.levelno == level
    assert record.getMessage().startswith("the TLS certificate O=Example,CN=gw.example (from ")
    assert record.getMessage().endswith(".pem) " + said)
