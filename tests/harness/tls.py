"""Throw-away X.509 material for spice TLS: a CA and a server certificate.

QEMU's `x509-dir=` wants exactly ca-cert.pem, server-cert.pem and
server-key.pem in one folder. The server certificate names 127.0.0.1 both in
its subject (for spice-gtk's host-subject check) and as an IP SAN (for plain
hostname verification, as spicy-screenshot does it through OpenSSL).
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests.harness.procs import need_program

HOST_SUBJECT = "C=XX,O=spicetap-test,CN=127.0.0.1"
_SERVER_EXT = (
    "basicConstraints=CA:FALSE\n"
    "keyUsage=digitalSignature,keyEncipherment\n"
    "extendedKeyUsage=serverAuth\n"
    "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
)


@dataclass(frozen=True)
class TlsMaterial:
    x509_dir: Path  # hand to QEMU as x509-dir
    ca_file: Path  # hand to clients
    host_subject: str  # spice-gtk "cert-subject" / remote-viewer --spice-host-subject


def make_tls_material(folder: Path) -> TlsMaterial:
    openssl = need_program("openssl", "openssl")
    folder.mkdir(parents=True, exist_ok=True)

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], cwd=folder, check=True, capture_output=True)

    run(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-sha256",
        "-days",
        "30",
        "-keyout",
        "ca-key.pem",
        "-out",
        "ca-cert.pem",
        "-subj",
        "/C=XX/O=spicetap-test/CN=spicetap test CA",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    )
    run(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-sha256",
        "-keyout",
        "server-key.pem",
        "-out",
        "server.csr",
        "-subj",
        "/" + HOST_SUBJECT.replace(",", "/"),
    )
    (folder / "server.ext").write_text(_SERVER_EXT)
    run(
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca-cert.pem",
        "-CAkey",
        "ca-key.pem",
        "-CAcreateserial",
        "-days",
        "30",
        "-sha256",
        "-extfile",
        "server.ext",
        "-out",
        "server-cert.pem",
    )
    for leftover in ("server.csr", "server.ext", "ca-cert.srl"):
        (folder / leftover).unlink(missing_ok=True)
    return TlsMaterial(x509_dir=folder, ca_file=folder / "ca-cert.pem", host_subject=HOST_SUBJECT)
