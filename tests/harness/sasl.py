"""A private Cyrus SASL set-up for QEMU's `sasl=on`: a config file and a user database.

spice-server asks Cyrus SASL for the application "qemu", so libsasl2 reads `qemu.conf` from
the folder named by SASL_CONF_PATH in QEMU's environment; nothing system-wide is touched.
The mechanism is DIGEST-MD5 unless the account names another: over a plaintext port
spice-server wants a security layer (SSF >= 56), and DIGEST-MD5 with qop=auth-conf is the
one that gives it without Kerberos. So after authentication the channel is SASL-encrypted
(RC4 as negotiated by the peers). Over TLS spice-server asks for none, and any mechanism
libsasl2-modules brings serves (PLAIN, LOGIN, CRAM-MD5, SCRAM-*); the sasldb keeps the
password itself, which each of them needs.

The user's password goes to saslpasswd2 on stdin (never on a command line, which other
local users could read) and lives only in the database in this throw-away folder.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests.harness.procs import PeerFailed, PeerMissing, need_program

APP_NAME = "qemu"  # QEMU sets spice-server's SASL application name to this
MECHANISM = "digest-md5"
# mechanism -> the libsasl2 plugin that serves it (libsasl2-modules)
PLUGINS = {
    "digest-md5": "libdigestmd5",
    "plain": "libplain",
    "login": "liblogin",
    "cram-md5": "libcrammd5",
    "scram-sha-1": "libscram",
    "scram-sha-256": "libscram",
}
PLUGIN_DIRS = (Path("/usr/lib/x86_64-linux-gnu/sasl2"), Path("/usr/lib/sasl2"))
SBIN = ("/usr/sbin", "/sbin")  # saslpasswd2's home; not on every user's PATH


@dataclass(frozen=True)
class SaslAccount:
    """Who may log in: the SASL user name and password a client gives."""

    username: str
    password: str
    mechanism: str = MECHANISM  # the one the server offers (its mech_list)


@dataclass(frozen=True)
class SaslConfig:
    conf_dir: Path  # SASL_CONF_PATH for QEMU
    account: SaslAccount


def _saslpasswd2() -> str:
    for folder in SBIN:
        candidate = Path(folder) / "saslpasswd2"
        if candidate.is_file():
            return str(candidate)
    return need_program("saslpasswd2", "sasl2-bin")


def need_plugin(mechanism: str) -> None:
    """PeerMissing unless libsasl2's plugin for `mechanism` is installed."""
    for folder in PLUGIN_DIRS:
        if any(folder.glob(f"{PLUGINS[mechanism]}.so*")):
            return
    raise PeerMissing(
        f"Cyrus SASL {mechanism.upper()} plugin not found: apt-get install libsasl2-modules"
    )


def make_sasl_config(folder: Path, account: SaslAccount) -> SaslConfig:
    """Write `qemu.conf` and a sasldb holding `account` into `folder`."""
    need_plugin(account.mechanism)
    saslpasswd2 = _saslpasswd2()
    folder.mkdir(parents=True, exist_ok=True)
    db = folder / "sasldb"
    db.unlink(missing_ok=True)
    (folder / f"{APP_NAME}.conf").write_text(f"mech_list: {account.mechanism}\nsasldb_path: {db}\n")
    # -a: the application (its realm defaults to this host's name, as spice-server's does)
    proc = subprocess.run(
        [saslpasswd2, "-p", "-c", "-a", APP_NAME, "-f", str(db), account.username],
        input=account.password.encode(),
        capture_output=True,
        timeout=30,
        check=False,
    )
    if proc.returncode != 0 or not db.exists():
        raise PeerFailed(
            f"saslpasswd2 failed (rc {proc.returncode}): {proc.stderr.decode(errors='replace')}"
        )
    db.chmod(0o600)
    return SaslConfig(conf_dir=folder, account=account)
