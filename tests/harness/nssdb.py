"""NSS database for spice-gtk's software smartcard (libcacard emulation).

spice-gtk emulates a card from exactly three certificates (with private keys)
in an NSS db, named by the session's smartcard-certificates. Creating RSA keys
takes a moment, so the db is cached; callers get a private copy because NSS
may write to the files it opens.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from tests.harness.cache import cached_build, content_key
from tests.harness.procs import need_program

CARD_CERTS = ("card1", "card2", "card3")


def _build(out: Path) -> None:
    certutil = need_program("certutil", "libnss3-tools")
    db = f"sql:{out}"
    subprocess.run([certutil, "-N", "-d", db, "--empty-password"], check=True, capture_output=True)
    noise = out / "noise.bin"
    for nick in CARD_CERTS:
        noise.write_bytes(os.urandom(64))  # without -z certutil asks for keystrokes
        subprocess.run(
            [
                certutil,
                "-S",
                "-d",
                db,
                "-n",
                nick,
                "-s",
                f"CN=spicetap test {nick}",
                "-x",
                "-t",
                "CT,C,C",
                "-k",
                "rsa",
                "-g",
                "2048",
                "-v",
                "120",
                "-z",
                str(noise),
            ],
            check=True,
            capture_output=True,
            stdin=subprocess.DEVNULL,
        )
    noise.unlink()


def make_smartcard_db(dest: Path) -> str:
    """Copy the cached db into `dest`; returns the "sql:DIR" spec for spice-gtk."""
    cached = cached_build("nssdb", content_key([Path(__file__)]), _build)
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(cached, dest)
    return f"sql:{dest}"
