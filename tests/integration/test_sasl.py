"""SASL through a real `spicetap proxy` in pass-through mode: QEMU's spice-server with
`sasl=on` (DIGEST-MD5, qop=auth-conf, from the harness' own SASL config and sasldb) and the
spice-gtk GI client logging in with a user name and password.

After SASL is chosen, everything on a channel is the SASL exchange and then SASL-encrypted
data, so spicetap relays it unchanged and the archive keeps only lengths: an `auth` record
per channel says SASL was chosen and the rest may be encrypted; what follows is `sasl` link
records whose bytes are redacted as secrets. The main channel learns its session id from
MAIN INIT, which is encrypted here: spicetap cannot tell which session it belongs to, so it
is recorded in an archive of its own ("unassigned"), beside the session's archive."""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from spicetap.archive.reader import ArchiveReader
from spicetap.archive.verify import verify
from spicetap.cli import main
from spicetap.inputs import iter_records
from spicetap.records import SASL_NOTE
from tests.conftest import peers
from tests.harness import (
    ALL_CHANNELS,
    ClientOptions,
    QemuServer,
    SaslAccount,
    SpiceEndpoint,
    run_gi_client,
)
from tests.harness.client import ClientResult
from tests.integration.proxy_process import ProxyProcess

pytestmark = pytest.mark.peers

ACCOUNT = SaslAccount("tapuser", "sasl-pw-5f0c2e")
WRONG_PASSWORD = "wrong-pw-91ab7d"
MECH_SASL = 2  # LinkAuthMechanism value for SASL
LINK_UNITS = [  # what a channel's link stage shows in clear, up to SASL's selection
    ("c2s", "auth_mechanism"),
    ("c2s", "header"),
    ("c2s", "link_mess"),
    ("s2c", "header"),
    ("s2c", "link_reply"),
]


@pytest.fixture(scope="module")
def sasl_qemu() -> Iterator[QemuServer]:
    """One SASL server for the module (a start costs seconds on 2 cores)."""
    with peers(), QemuServer(guest="none", sasl=ACCOUNT) as srv:
        yield srv


def proxy_for(srv: QemuServer, work: Path, *extra: str) -> ProxyProcess:
    assert srv.port is not None
    return ProxyProcess(srv.port, work / "rec", work / "proxy", extra=extra)


def connect(proxy: ProxyProcess, password: str, work: Path, channels: int) -> ClientResult:
    endpoint = SpiceEndpoint(port=proxy.port, username=ACCOUNT.username, password=password)
    options = ClientOptions(
        duration=20, expect_channels=channels, expect_display=True, smartcard=True
    )
    with peers():
        return run_gi_client(endpoint, options, work)


def metrics(proxy: ProxyProcess) -> dict[str, float]:
    conn = http.client.HTTPConnection("127.0.0.1", proxy.ports["management"], timeout=10)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    samples = (line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))
    return {name: float(value) for name, value in samples}


def relayed_bytes(proxy: ProxyProcess) -> dict[str, int]:
    """Bytes the proxy relayed each way, once every channel has closed (bounded wait)."""
    for _ in range(100):
        now = metrics(proxy)
        if now["spicetap_channels_open"] == 0:
            return {d: int(now[f'spicetap_bytes_total{{direction="{d}"}}']) for d in ("c2s", "s2c")}
        time.sleep(0.1)
    raise AssertionError("channels still open 10 s after the client left")


def archived(proxy: ProxyProcess) -> dict[str, list[Any]]:
    """Archive name -> its records; every archive verified intact first."""
    out: dict[str, list[Any]] = {}
    for archive in proxy.archives():
        assert verify(archive).status == "intact", archive
        with ArchiveReader(archive) as reader:
            assert reader.header["session"]["auth"] == "pass-through"
        out[archive.stem] = list(iter_records(archive, []))
    assert out
    return out


def by_connection(recs: list[Any]) -> dict[int, list[Any]]:
    out: dict[int, list[Any]] = {}
    for rec in recs:
        out.setdefault(rec.connection, []).append(rec)
    return out


def assert_nothing_secret(proxy: ProxyProcess, *secrets: str) -> None:
    blobs = {str(a): a.read_bytes() for a in proxy.archives()}
    blobs["the proxy log"] = proxy.log().encode()
    for where, blob in blobs.items():
        for secret in secrets:
            assert secret.encode() not in blob, f"{secret!r} in {where}"


def check_sasl_channel(recs: list[Any]) -> dict[str, int]:
    """One channel connection: the link stage in clear up to SASL's selection, one `auth`
    record saying so, then only redacted `sasl` units, never a message. Returns the bytes
    its link records account for, each way (kept as lengths where redacted)."""
    links = sorted((r.direction, r.name) for r in recs if r.kind == "link" and r.name != "sasl")
    assert links == LINK_UNITS, links
    (mech,) = [r for r in recs if r.name == "auth_mechanism"]
    assert int.from_bytes(mech.raw, "little") == MECH_SASL
    (auth,) = [r for r in recs if r.kind == "auth"]
    assert auth.name == "sasl" and auth.direction == "c2s" and auth.fields == SASL_NOTE
    assert auth.fields["may_be_encrypted"] is True
    sasl = [r for r in recs if r.kind == "link" and r.name == "sasl"]
    assert {r.direction for r in sasl} == {"c2s", "s2c"}  # an exchange, both ways
    assert all(r.raw == b"" and r.redacted == {"reason": "secret", "len": r.redacted["len"]}
               for r in sasl)  # fmt: skip
    assert all(r.redacted["len"] > 0 for r in sasl)
    assert not [r for r in recs if r.kind in ("message", "agent", "error", "gap", "tls")]
    assert [r.kind for r in recs].count("close") == 1 and recs[-1].kind == "close"
    lengths = {"c2s": 0, "s2c": 0}
    for rec in recs:
        if rec.kind == "link":
            lengths[rec.direction] += rec.redacted["len"] if rec.redacted else len(rec.raw)
    return lengths


def test_sasl_session_through_the_proxy_is_recorded_as_lengths(
    sasl_qemu: QemuServer, tmp_path: Path
) -> None:
    with proxy_for(sasl_qemu, tmp_path, "--management", "127.0.0.1:0") as proxy:
        result = connect(proxy, ACCOUNT.password, tmp_path / "client", ALL_CHANNELS)
        relayed = relayed_bytes(proxy)
        assert proxy.proc.poll() is None
    assert result.returncode == 0, (result.summary, proxy.log()[-2000:])
    assert len(result.opened) == ALL_CHANNELS and not result.summary["errors"]
    assert result.summary["display"]["invalidates"] > 0  # the screen came through SASL
    archives = archived(proxy)
    # the session's archive holds every channel but main, which has one of its own
    (session_name,) = [n for n in archives if "unassigned" not in n]
    (main_name,) = [n for n in archives if "unassigned" in n]
    (main_conn,) = by_connection(archives[main_name]).values()
    assert main_conn[0].channel == "main" and main_conn[-1].name == "viewer closed"
    others = by_connection(archives[session_name])
    assert len(others) == ALL_CHANNELS - 1
    assert all(rs[0].channel != "main" for rs in others.values())
    sessions = {r.session for rs in others.values() for r in rs}
    assert len(sessions) == 1 and session_name.endswith(f"{sessions.pop():08x}")
    # every byte relayed is in the archives, the SASL part as lengths only
    recorded = {"c2s": 0, "s2c": 0}
    for recs in [main_conn, *others.values()]:
        for direction, n in check_sasl_channel(recs).items():
            recorded[direction] += n
    assert recorded == relayed
    (display,) = [rs for rs in others.values() if rs[0].channel == "display"]
    assert check_sasl_channel(display)["s2c"] > 1000  # the SeaBIOS screen, encrypted
    # neither the password nor the SASL exchange (user name, mechanism names) was kept
    assert_nothing_secret(proxy, ACCOUNT.password, ACCOUNT.username, "DIGEST-MD5")


def test_wrong_sasl_password_fails_cleanly_and_the_proxy_serves_on(
    sasl_qemu: QemuServer, tmp_path: Path
) -> None:
    with proxy_for(sasl_qemu, tmp_path) as proxy:
        refused = connect(proxy, WRONG_PASSWORD, tmp_path / "bad", channels=1)
        assert proxy.proc.poll() is None
        accepted = connect(proxy, ACCOUNT.password, tmp_path / "good", channels=1)
        assert proxy.proc.poll() is None
    assert refused.returncode == 2 and not refused.summary["connected"], refused.summary
    assert refused.opened == []
    errors = [message for _t, _where, message in refused.summary["errors"]]
    assert any(e.startswith("error-auth") for e in errors), errors
    assert accepted.returncode == 0, (accepted.summary, proxy.log()[-2000:])
    mains = [
        rs
        for recs in archived(proxy).values()
        for rs in by_connection(recs).values()
        if rs[0].channel == "main"
    ]
    assert len(mains) == 2
    failed, good = sorted(mains, key=lambda rs: rs[0].time)
    # the refused login: SASL chosen, the exchange (lengths), then the server hung up
    check_sasl_channel(failed)
    assert failed[-1].name == "server closed"
    assert good[-1].name == "viewer closed"
    assert "closed: server closed" in proxy.log()
    assert_nothing_secret(proxy, ACCOUNT.password, WRONG_PASSWORD, ACCOUNT.username)


def test_probe_says_the_server_wants_sasl(
    sasl_qemu: QemuServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """spice-server with sasl=on offers SASL only (no ticket), which probe does not speak:
    not admitted, and the human answer lists the server's auth methods."""
    port = str(sasl_qemu.port)
    assert main(["probe", "127.0.0.1", port, "--json"]) == 1
    answer = json.loads(capsys.readouterr().out)
    assert answer == {
        "success": False,
        "host": "127.0.0.1",
        "port": sasl_qemu.port,
        "error": "Authentication failed",
    }
    assert main(["probe", "127.0.0.1", port]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert "the server offers only SASL" in lines[0]
    assert "  auth methods: sasl" in lines
    assert "AUTH_SASL" in next(line for line in lines if line.startswith("  capabilities:"))
