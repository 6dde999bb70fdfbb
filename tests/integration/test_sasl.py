"""SASL through a real `spicetap proxy` in pass-through mode: QEMU's spice-server with
`sasl=on` (DIGEST-MD5, from the harness' own SASL config and sasldb) and the spice-gtk GI
client logging in with a user name and password.

On plain TCP spice-server demands a SASL security layer (qop=auth-conf here): after the
exchange everything is SASL-encrypted, so spicetap relays it unchanged and the archive keeps
only lengths. An `auth` record per channel says so; the exchange's fields and then the
layer's bytes are `sasl` link records, redacted as secrets, and the server's completion
flags and link result are in clear. The main channel learns its session id from MAIN INIT,
which is encrypted there: spicetap cannot tell which session it belongs to, so it is
recorded in an archive of its own ("unassigned"), beside the session's archive.

Over TLS spice-server asks for no security layer (qop=auth): after the exchange the channels
carry clear SPICE, which spicetap dissects, and the whole session is one archive.

With --sasl-user spicetap reads whom each login was for (never the password or proof), for
every mechanism spice-gtk and spice-server share over TLS; by default it reads nobody's."""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from proxy.core.relay import SASL_LAYER_MIGRATION
from proxy.core.saslident import SASL_LOGIN
from spicetap.archive.reader import ArchiveReader
from spicetap.archive.verify import verify
from spicetap.cli import main
from spicetap.inputs import iter_records
from spicetap.records import SASL_NOTE, SASL_OVER_TLS_NOTE
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
from tests.integration.proxy_process import ProxyProcess, tls_both_legs

pytestmark = pytest.mark.peers

ACCOUNT = SaslAccount("tapuser", "sasl-pw-5f0c2e")
SUBJECT = "C=XX,O=spicetap-test,CN=127.0.0.1"  # spicetap's certificate for the viewer
WRONG_PASSWORD = "wrong-pw-91ab7d"
MECH_SASL = 2  # LinkAuthMechanism value for SASL
LINK_UNITS = [  # what a channel's link stage shows in clear, but for SASL's own fields
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


@contextmanager
def tls_sasl_proxy(
    account: SaslAccount, tmp_path: Path, *extra: str
) -> Iterator[tuple[ProxyProcess, SpiceEndpoint]]:
    """QEMU with SASL on a TLS port only, spicetap before it with TLS on both legs (and
    `extra` flags), and the endpoint of a viewer logging in through it as `account`."""
    with peers(), QemuServer(guest="none", plain=False, tls=True, sasl=account) as srv:
        assert srv.tls_port is not None and srv.tls_material is not None
        tlsm = srv.tls_material
        legs = tls_both_legs(srv.tls_port, tlsm.ca_file, tlsm.host_subject)
        flags = (*legs, "--tls-subject", SUBJECT, *extra)
        with ProxyProcess(0, tmp_path / "rec", tmp_path / "proxy", extra=flags) as proxy:
            yield proxy, SpiceEndpoint(
                tls_port=proxy.port,
                ca_file=tmp_path / "proxy" / "config" / "ca-cert.pem",
                host_subject=SUBJECT,
                username=account.username,
                password=account.password,
            )


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


def check_sasl_channel(recs: list[Any], note: dict[str, Any] = SASL_NOTE) -> dict[str, int]:
    """One channel connection: the link stage in clear up to SASL's selection, one `auth`
    record saying so, SASL's fields redacted, its completion flags and result (unless it
    failed) in clear; then, with `note` SASL_NOTE, only redacted `sasl` units, never a
    message. Returns the bytes its link records account for, each way (kept as lengths
    where redacted)."""
    sasl_units = ("sasl", "sasl_complete", "sasl_result", "link_result")
    clear = [r for r in recs if r.kind == "link" and r.name not in sasl_units]
    links = sorted((r.direction, r.name) for r in clear)
    assert links == LINK_UNITS, links
    flags = [r.fields["complete"] for r in recs if r.name == "sasl_complete"]
    assert flags and not any(flags[:-1])  # the server's "go on", then maybe "complete"
    ok = [{"error": "OK"}]
    sasl_results = [r.fields for r in recs if r.name == "sasl_result"]
    assert sasl_results == (ok if flags[-1] else []), sasl_results
    # the link result then, in clear over TLS; with a security layer it is inside it
    results = [r.fields for r in recs if r.name == "link_result"]
    assert results == (ok if flags[-1] and note is SASL_OVER_TLS_NOTE else []), results
    (mech,) = [r for r in recs if r.name == "auth_mechanism"]
    assert int.from_bytes(mech.raw, "little") == MECH_SASL
    (auth,) = [r for r in recs if r.kind == "auth"]
    assert auth.name == "sasl" and auth.direction == "c2s" and auth.fields == note
    sasl = [r for r in recs if r.kind == "link" and r.name == "sasl"]
    assert {r.direction for r in sasl} == {"c2s", "s2c"}  # an exchange, both ways
    assert all(r.raw == b"" and r.redacted == {"reason": "secret", "len": r.redacted["len"]}
               for r in sasl)  # fmt: skip
    assert all(r.redacted["len"] > 0 for r in sasl)
    assert not [r for r in recs if r.kind in ("gap", "tls")]
    if note is SASL_NOTE:  # encrypted after the exchange: lengths only
        odd = [r for r in recs if r.kind in ("message", "agent", "error")]
        assert not odd, [(r.kind, r.direction, r.name, r.error) for r in odd]
    assert [r.kind for r in recs].count("close") == 1 and recs[-1].kind == "close"
    lengths = {"c2s": 0, "s2c": 0}
    for rec in recs:
        if rec.kind in ("link", "message", "error"):  # agent messages repeat AGENT_DATA's
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
    # the operator is told, once, that a migration would take this viewer past spicetap
    assert proxy.log().count(SASL_LAYER_MIGRATION) == 1


def test_sasl_over_tls_is_dissected_after_its_exchange(tmp_path: Path) -> None:
    """TLS on both legs: spice-server and spice-gtk agree on no SASL security layer, so
    once SASL's result is in, every channel carries clear SPICE. The archive dissects it,
    the main channel's INIT names the session, and all 11 channels are one archive."""
    with tls_sasl_proxy(ACCOUNT, tmp_path, "--management", "127.0.0.1:0") as (proxy, endpoint):
        options = ClientOptions(
            duration=20, expect_channels=ALL_CHANNELS, expect_display=True, smartcard=True
        )
        result = run_gi_client(endpoint, options, tmp_path / "client")
        relayed = relayed_bytes(proxy)
    assert result.returncode == 0, (result.summary, proxy.log()[-2000:])
    assert len(result.opened) == ALL_CHANNELS and not result.summary["errors"]
    archives = archived(proxy)
    (name,) = archives  # one session: main's INIT was read
    conns = by_connection(archives[name])
    assert len(conns) == ALL_CHANNELS
    recorded = {"c2s": 0, "s2c": 0}
    for recs in conns.values():
        for direction, n in check_sasl_channel(recs, SASL_OVER_TLS_NOTE).items():
            recorded[direction] += n
        assert all(r.fields["tls"] == {"viewer": True, "server": True}
                   for r in recs if r.kind == "open")  # fmt: skip
    assert recorded == relayed  # every byte, the exchange as lengths, the rest as it came
    recs = archives[name]
    (init,) = [r for r in recs if r.channel == "main" and r.name == "init"]
    assert name.endswith(f"{init.fields['session_id']:08x}")
    channels = {r.channel for r in recs if r.kind == "message"}
    assert {"main", "display", "inputs", "cursor"} <= channels
    assert any(r.channel == "display" and (r.name or "").startswith("draw_") for r in recs)
    # the client hangs up when its script ends: a message cut then is recorded as such
    bad = [r for r in recs if r.not_fully_dissected or r.kind == "error"]
    bad = [r for r in bad if "connection ended (viewer closed)" not in str(r.error)]
    assert not bad, [(r.kind, r.channel, r.name, r.error) for r in bad]
    assert_nothing_secret(proxy, ACCOUNT.password, ACCOUNT.username)
    assert SASL_LAYER_MIGRATION not in proxy.log()  # over TLS migrations are followed


def test_sasl_through_the_connect_front_is_recorded_as_through_the_reverse_proxy(
    sasl_qemu: QemuServer, tmp_path: Path
) -> None:
    """The CONNECT front relays in trio rather than in pump threads: SASL's exchange, its
    result and the security layer after it come out the same, every channel."""
    config = tmp_path / "gateway.toml"
    config.write_text(
        f'[connect]\nlisten = "127.0.0.1:0"\nallow = ["127.0.0.1:{sasl_qemu.port}"]\n'
    )
    work = tmp_path / "proxy"
    with ProxyProcess(0, tmp_path / "rec", work, ("--config", str(config))) as proxy:
        front = f"http://127.0.0.1:{proxy.ports['connect']}"
        endpoint = SpiceEndpoint(
            port=sasl_qemu.port,
            username=ACCOUNT.username,
            password=ACCOUNT.password,
            proxy=front,
        )
        options = ClientOptions(
            duration=20, expect_channels=ALL_CHANNELS, expect_display=True, smartcard=True
        )
        with peers():
            result = run_gi_client(endpoint, options, tmp_path / "client")
    assert result.returncode == 0, (result.summary, proxy.log()[-2000:])
    assert len(result.opened) == ALL_CHANNELS
    conns = [rs for recs in archived(proxy).values() for rs in by_connection(recs).values()]
    assert len(conns) == ALL_CHANNELS
    for recs in conns:
        check_sasl_channel(recs)
    assert_nothing_secret(proxy, ACCOUNT.password, ACCOUNT.username)


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
    assert failed[-1].name == "server closed during SASL"  # how spice-server refuses
    assert good[-1].name == "viewer closed"
    assert "closed: server closed during SASL" in proxy.log()
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
        "detail": "the server offers only SASL, which probe does not speak",
    }
    assert main(["probe", "127.0.0.1", port]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert "the server offers only SASL" in lines[0]
    assert "  auth methods: sasl" in lines
    assert "AUTH_SASL" in next(line for line in lines if line.startswith("  capabilities:"))


def sasl_logins(recs: list[Any]) -> list[dict[str, Any]]:
    return [r.fields for r in recs if r.kind == "auth" and r.name == SASL_LOGIN]


@pytest.mark.parametrize("mechanism", ["plain", "login", "cram-md5", "scram-sha-256", "digest-md5"])
def test_sasl_user_names_whom_each_mechanism_logged_in(
    mechanism: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """TLS on both legs, the server offering one mechanism: with --sasl-user the name the
    viewer gave is in the log, in each channel's `sasl_login` record and in the archive's
    header, and `spicetap sessions --user` finds the session; the password is nowhere and
    the exchange itself is still kept as lengths."""
    account = SaslAccount(ACCOUNT.username, ACCOUNT.password, mechanism)
    with tls_sasl_proxy(account, tmp_path, "--sasl-user") as (proxy, endpoint):
        options = ClientOptions(duration=20, expect_channels=4, expect_display=True)
        result = run_gi_client(endpoint, options, tmp_path / "client")
    assert result.returncode == 0, (result.summary, proxy.log()[-2000:])
    (name, recs), *others = archived(proxy).items()
    assert not others  # one session: main's INIT was read
    with ArchiveReader(proxy.archives()[0]) as reader:
        assert reader.header["session"]["user"] == account.username
        assert reader.header["policy"]["sasl"] == "the user name only"
    logins = sasl_logins(recs)
    accepted = [f for f in logins if f["outcome"] == "accepted"]
    assert len(accepted) >= 4, logins  # main, display, inputs, cursor at least
    for said in accepted:
        assert said["sasl_mechanism"] == mechanism.upper() and said["user"] == account.username
        assert set(said) <= {"sasl_mechanism", "user", "outcome", "realm"}, said
    exchange = [r for r in recs if r.kind == "link" and r.name == "sasl"]
    assert exchange and all(r.raw == b"" and r.redacted for r in exchange)
    line = f"SASL login as {account.username} ({mechanism.upper()}): accepted"
    assert proxy.log().count(line) == len(accepted)
    assert_nothing_secret(proxy, account.password)
    assert main(["sessions", "--json", "--user", account.username, str(tmp_path / "rec")]) == 0
    (listed,) = json.loads(capsys.readouterr().out)
    assert listed["session"]["user"] == account.username
    assert name.endswith(f"{listed['session']['id']:08x}")


def test_a_refused_sasl_password_is_named_and_counts_toward_the_lockout(
    sasl_qemu: QemuServer, tmp_path: Path
) -> None:
    """spice-server refuses a wrong DIGEST-MD5 password by hanging up on the viewer's
    answer: spicetap counts that as a failed login (one locks the address out here), and
    with --sasl-user says whose it was. The right password is then turned away by
    spicetap itself."""
    extra = ("--sasl-user", "--lockout-failures", "1", "--lockout-seconds", "600")
    with proxy_for(sasl_qemu, tmp_path, *extra) as proxy:
        refused = connect(proxy, WRONG_PASSWORD, tmp_path / "bad", channels=1)
        locked_out = connect(proxy, ACCOUNT.password, tmp_path / "good", channels=1)
        assert proxy.proc.poll() is None
    assert refused.returncode == 2 and refused.opened == [], refused.summary
    assert locked_out.returncode == 2 and locked_out.opened == [], locked_out.summary
    log = proxy.log()
    assert f"SASL login as {ACCOUNT.username} (DIGEST-MD5): refused" in log
    assert "viewer address 127.0.0.1 locked out for 600 s" in log
    recs = [r for recs in archived(proxy).values() for r in recs]
    (login,) = sasl_logins(recs)  # the second viewer never reached the server
    assert login["user"] == ACCOUNT.username and login["outcome"] == "refused"
    assert login["sasl_mechanism"] == "DIGEST-MD5"
    assert_nothing_secret(proxy, ACCOUNT.password, WRONG_PASSWORD)


def test_sasl_user_names_the_session_on_a_plain_server_leg_too(
    sasl_qemu: QemuServer, tmp_path: Path
) -> None:
    """On plain TCP the main channel's INIT is inside SASL's security layer, so the
    session's archive is opened by another channel: it waits for that channel's login, and
    both archives (the session's, and the main channel's own) name the user."""
    with proxy_for(sasl_qemu, tmp_path, "--sasl-user") as proxy:
        result = connect(proxy, ACCOUNT.password, tmp_path / "client", channels=4)
    assert result.returncode == 0, (result.summary, proxy.log()[-2000:])
    archives = archived(proxy)
    assert len(archives) == 2 and sum("unassigned" in name for name in archives) == 1
    for archive in proxy.archives():
        with ArchiveReader(archive) as reader:
            assert reader.header["session"].get("user") == ACCOUNT.username, archive.name
    logins = [f for recs in archives.values() for f in sasl_logins(recs)]
    assert len(logins) >= 4 and all(f["user"] == ACCOUNT.username for f in logins)
    for recs in archives.values():
        for conn in by_connection(recs).values():
            assert conn[0].kind == "open" and conn[-1].kind == "close"  # nothing lost
    assert_nothing_secret(proxy, ACCOUNT.password)
