"""Whom a viewer logs in as over SASL (proxy/core/saslident.py), read only with sasl_user,
and what the relay makes of it: one `sasl_login` auth event, the channel's user, and a
server that hangs up on the viewer's answer counted as a refused login."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from proxy.core.framing import C2S, S2C
from proxy.core.relay import AuthFailed, ChannelRelay, Command, Limits, RecordEvent
from proxy.core.saslident import LONGEST, SASL_LOGIN, SaslIdentity
from proxy.recorder import WAIT_RECORDS, RecorderWorker, RecordingOptions
from spicetap.archive.privacy import PrivacyPolicy
from spicetap.archive.reader import ArchiveReader
from spicetap.inputs import iter_records
from tests.proxy.test_framing import mini
from tests.proxy.test_sasl_framing import exchange
from tests.proxy.test_sasl_framing import field as sasl_field


def field(data: bytes) -> bytes:
    """As spice-gtk sends a field: its data, then a NUL, counted in the length."""
    return sasl_field(data + b"\0")


def identity(mechanism: bytes, *steps: tuple[str, bytes]) -> dict[str, str]:
    ident = SaslIdentity()
    ident.client(field(mechanism))
    for direction, data in steps:
        (ident.client if direction == C2S else ident.server)(field(data))
    return ident.fields()


# RFC examples where the RFCs give them; the password or proof is what must never show
CASES = [
    ("plain", b"PLAIN", [(C2S, b"\0tim\0tanstaaftanstaaf")], {"user": "tim"}, b"tanstaaf"),
    (
        "plain as",
        b"PLAIN",
        [(C2S, b"Ursel\0Kurt\0xipj3plmq")],
        {"user": "Kurt", "as": "Ursel"},
        b"xipj3plmq",
    ),
    ("plain, a NUL in the password", b"PLAIN", [(C2S, b"\0tim\0pa\0ss")], {"user": "tim"}, b"pa"),
    (
        "login",
        b"LOGIN",
        [(C2S, b""), (S2C, b"Username:"), (C2S, b"tim"), (S2C, b"Password:"), (C2S, b"s3cr3t-pw")],
        {"user": "tim"},
        b"s3cr3t",
    ),
    (
        "login with a first answer",
        b"LOGIN",
        [(C2S, b"tim"), (S2C, b"Password:"), (C2S, b"s3cr3t-pw")],
        {"user": "tim"},
        b"s3cr3t",
    ),
    (
        "login: no prompt for the name",
        b"LOGIN",
        [(C2S, b""), (S2C, b"Password:"), (C2S, b"s3cr3t-pw")],
        {},
        b"s3cr3t",
    ),
    (
        "cram-md5",
        b"CRAM-MD5",
        [
            (C2S, b""),
            (S2C, b"<1896.697170952@postoffice.example.net>"),
            (C2S, b"joe tanstaaf 3dbc88f0624776a737b39093f6eb6427"),
        ],
        {"user": "joe tanstaaf"},
        b"3dbc88f0",
    ),
    (
        "digest-md5",
        b"DIGEST-MD5",
        [
            (C2S, b""),
            (S2C, b'realm="elwood.innosoft.com",nonce="OA6MG9tEQGm2hh",qop="auth"'),
            (
                C2S,
                b'charset=utf-8,username="chris",realm="elwood.innosoft.com",'
                b'nonce="OA6MG9tEQGm2hh",nc=00000001,cnonce="OA6MHXh6VqTrRk",'
                b'digest-uri="imap/elwood.innosoft.com",'
                b"response=d388dad90d4bbd760a152321f2143af7,qop=auth",
            ),
        ],
        {"user": "chris", "realm": "elwood.innosoft.com"},
        b"d388dad9",
    ),
    (
        "digest-md5, escaped, latin-1, authzid",
        b"DIGEST-MD5",
        [(C2S, b'username = "Ren\xe9 \\"R\\" X" , authzid="admin",response=abc')],
        {"user": 'René "R" X', "as": "admin"},
        b"abc",
    ),
    (
        "scram",
        b"SCRAM-SHA-256",
        [(C2S, b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO")],
        {"user": "user"},
        b"rOprNGfw",
    ),
    (
        "scram escaped, authzid, channel binding",
        b"SCRAM-SHA-1",
        [(C2S, b"p=tls-unique,a=ad=3Dmin,n=a=2Cb=3Dc,r=nonce")],
        {"user": "a,b=c", "as": "ad=min"},
        b"nonce",
    ),
    (
        "scram, reserved extension first",
        b"SCRAM-SHA-1",
        [(C2S, b"n,,m=ext,n=bob,r=x")],
        {"user": "bob"},
        b"r=x",
    ),
    (
        "anonymous",
        b"ANONYMOUS",
        [(C2S, b"sirhc@example.com")],
        {"trace": "sirhc@example.com"},
        b"\0",
    ),
    ("external", b"EXTERNAL", [(C2S, b"admin")], {"user": "admin"}, b"\0"),
    ("gssapi: no name in clear", b"GSSAPI", [(C2S, b"\x60\x82token")], {}, b"token"),
    ("authzid the same", b"SCRAM-SHA-1", [(C2S, b"n,a=bob,n=bob,r=x")], {"user": "bob"}, b"r=x"),
    ("lower-case name", b"plain", [(C2S, b"\0tim\0pw-1234")], {"user": "tim"}, b"pw-1234"),
]


@pytest.mark.parametrize(
    ("mechanism", "steps", "expected", "secret"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_the_name_is_read_and_the_proof_is_not(
    mechanism: bytes, steps: list[tuple[str, bytes]], expected: dict[str, str], secret: bytes
) -> None:
    said = identity(mechanism, *steps)
    assert said == {"sasl_mechanism": mechanism.decode().upper(), **expected}
    assert secret.decode("latin-1") not in repr(said)


@pytest.mark.parametrize(
    "bad",
    [b"", b"\0only-one-nul", b"n=x", b"n,,r=nonce-without-name", b"x,,n=bob,r=1",
     b"username", b'username="unterminated', b"\xff" * 100, b"joe notahexdigest"],
)  # fmt: skip
def test_malformed_data_names_nobody(bad: bytes) -> None:
    for mechanism in (b"PLAIN", b"SCRAM-SHA-1", b"DIGEST-MD5", b"CRAM-MD5"):
        said = identity(mechanism, (C2S, bad))
        assert "user" not in said, said


def test_a_name_is_printable_and_bounded() -> None:
    said = identity(b"PLAIN", (C2S, b"\0evil\nline\x1b[31m" + b"x" * 1000 + b"\0pw"))
    user = said["user"]
    assert user.startswith("evil\N{REPLACEMENT CHARACTER}line\N{REPLACEMENT CHARACTER}[31m")
    assert len(user) == LONGEST and user.isprintable()
    assert identity(b"NOT A MECH;")["sasl_mechanism"] == "(not a mechanism name)"


def run(relay: ChannelRelay, chunks: list[tuple[str, bytes]]) -> list[Command]:
    commands: list[Command] = []
    for direction, data in chunks:
        commands += relay.received(direction, data, 1.0)
    return commands


def logins(commands: list[Command]) -> list[dict[str, object]]:
    return [c.fields for c in commands if isinstance(c, RecordEvent) and c.name == SASL_LOGIN]


def failures(commands: list[Command]) -> list[str]:
    return [c.by for c in commands if isinstance(c, AuthFailed)]


def test_the_relay_says_whom_a_sasl_login_was_for_only_when_allowed() -> None:
    for allowed in (True, False):
        relay = ChannelRelay(Limits(), 0.0, sasl_user=allowed)
        commands = run(relay, exchange())
        expected = [{"sasl_mechanism": "DIGEST-MD5", "user": "u", "outcome": "accepted"}]
        assert logins(commands) == (expected if allowed else [])
        assert relay.user == ("u" if allowed else None)
        assert relay.linked and not failures(commands)
        events = [(c.kind, c.direction) for c in commands if isinstance(c, RecordEvent)]
        assert events == ([("auth", S2C)] if allowed else [])


def test_a_refusal_by_result_names_the_claim_but_not_the_channels_user() -> None:
    relay = ChannelRelay(Limits(), 0.0, sasl_user=True)
    commands = run(relay, exchange(result=struct.pack("<I", 1) + sasl_field(b"no\0")))
    assert logins(commands) == [{"sasl_mechanism": "DIGEST-MD5", "user": "u", "outcome": "refused"}]
    assert failures(commands) == ["server"] and relay.user is None


def test_a_server_hanging_up_on_the_viewers_answer_is_a_refused_login() -> None:
    """spice-server's way with a wrong password: its SASL step fails and it closes."""
    cut = exchange()[:-2]  # the viewer's answer is the last thing sent
    assert cut[-1][0] == C2S
    for allowed in (True, False):
        relay = ChannelRelay(Limits(), 0.0, sasl_user=allowed)
        commands = run(relay, cut) + relay.peer_closed(S2C, 2.0)
        assert failures(commands) == ["server"]
        refused = [{"sasl_mechanism": "DIGEST-MD5", "user": "u", "outcome": "refused"}]
        assert logins(commands) == (refused if allowed else [])


@pytest.mark.parametrize(
    ("cut", "who"),
    [
        (6, S2C),  # the server closed after its own challenge: it owed nothing
        (7, C2S),  # the viewer gave up after answering
        (5, C2S),  # ...or before
    ],
)
def test_other_ends_of_a_sasl_exchange_are_no_refusal(cut: int, who: str) -> None:
    relay = ChannelRelay(Limits(), 0.0, sasl_user=True)
    commands = run(relay, exchange()[:cut]) + relay.peer_closed(who, 2.0)
    assert failures(commands) == []
    (login,) = logins(commands)
    assert login["outcome"] == "unfinished" and login["sasl_mechanism"] == "DIGEST-MD5"


@pytest.mark.parametrize("channel_type", [1, 2])  # main (its server side scanned), display
def test_the_login_is_said_after_forwarding_before_recording_the_bytes_that_brought_it(
    channel_type: int,
) -> None:
    """The server's last SASL word, the link result and (main) INIT often come in one
    chunk: the recorder must hear whose the login was before INIT opens the archive."""
    relay = ChannelRelay(Limits(), 0.0, sasl_user=True)
    *before, (_, last), (_, link_ok) = exchange(channel_type=channel_type, conn=0)
    run(relay, before)
    init = mini(103, struct.pack("<IIII", 0x5E55, 1, 0, 0) + bytes(16))
    commands = relay.received(S2C, last + link_ok + init, 1.0)
    kinds = [type(c).__name__ for c in commands]
    assert kinds[:3] == ["Forward", "RecordEvent", "RecordData"], kinds
    assert logins(commands) == [
        {"sasl_mechanism": "DIGEST-MD5", "user": "u", "outcome": "accepted"}
    ]


def test_a_login_cut_by_a_timeout_the_operator_or_a_broken_stream_is_unfinished() -> None:
    begun = exchange()[:7]  # the viewer has answered; the server has not
    endings = {
        "link timeout": lambda r: r.tick(100.0),
        "operator": lambda r: r.terminate("ended by the operator", 2.0),
        "broken stream": lambda r: r.peer_failed(S2C, "bad WebSocket frame", 2.0),
        "cut field": lambda r: r.received(C2S, b"\x09\0\0\0abc", 2.0) + r.peer_closed(C2S, 2.0),
    }
    for how, end in endings.items():
        relay = ChannelRelay(Limits(link_timeout=10.0), 0.0, sasl_user=True)
        commands = run(relay, begun)
        assert logins(commands) == [], how
        commands = end(relay)
        (login,) = logins(commands)
        assert login["outcome"] == "unfinished" and login["user"] == "u", how
        assert not failures(commands), how
        assert relay.tick(200.0) == [] and logins(relay.peer_closed(S2C, 3.0)) == []  # once


def _sasl_display_channel(worker: RecorderWorker, login: dict[str, str] | None) -> None:
    """A display channel of session 0x5EC7 logging in over SASL on a plain server leg
    (a security layer follows), as the relay hands it to the recorder: its login event,
    if any, before the bytes of SASL's result."""
    worker.handle(("open", 1, 1.0, ("127.0.0.1", 41001), ("127.0.0.1", 5900), None, {}, None))
    *before, (_, result), _link_result = exchange(channel_type=2, conn=0x5EC7)
    for direction, data in before:
        worker.handle(("data", 1, 1.0, direction, data))
    if login is not None:
        worker.handle(("event", 1, 1.1, S2C, "auth", SASL_LOGIN, login, b""))
    worker.handle(("data", 1, 1.1, S2C, result + b"layer bytes"))
    worker.handle(("close", 1, 2.0, "viewer closed"))


def test_the_archive_another_channel_opens_waits_for_its_login(tmp_path: Path) -> None:
    """On a plain server leg SASL hides the main channel's INIT, so a session's archive is
    opened by another channel, still linking: with sasl_user it waits for that channel's
    login, so the header names the user; nothing is lost or reordered meanwhile."""
    login = {"sasl_mechanism": "DIGEST-MD5", "user": "u", "outcome": "accepted"}
    archives = {}
    for allowed in (True, False):
        folder = tmp_path / str(allowed)
        folder.mkdir()
        options = RecordingOptions(folder, policy=PrivacyPolicy(sasl_user=allowed))
        worker = RecorderWorker(options, {}, None)
        _sasl_display_channel(worker, login if allowed else None)
        assert worker.waiting == {}
        (archives[allowed],) = folder.glob("*.spta")
    users = {}
    for allowed, archive in archives.items():
        with ArchiveReader(archive) as reader:
            users[allowed] = reader.header["session"].get("user")
    assert users == {True: "u", False: None}
    kept = {a: [(r.kind, r.name) for r in iter_records(p, []) if r.kind != "auth"]
            for a, p in archives.items()}  # fmt: skip
    assert kept[True] == kept[False] and kept[True][0] == ("open", None)
    assert kept[True][-1][0] == "close" and ("link", "sasl_result") in kept[True]


def test_an_archive_waits_for_a_login_only_so_long(tmp_path: Path) -> None:
    options = RecordingOptions(tmp_path, policy=PrivacyPolicy(sasl_user=True))
    worker = RecorderWorker(options, {}, None)
    worker.handle(("open", 1, 1.0, ("127.0.0.1", 41001), ("127.0.0.1", 5900), None, {}, None))
    for direction, data in exchange(channel_type=2, conn=0x5EC7)[:5]:
        worker.handle(("data", 1, 1.0, direction, data))
    for _ in range(WAIT_RECORDS):  # a server that never finishes: challenges, answers
        worker.handle(("data", 1, 1.0, S2C, sasl_field(b"more?\0") + b"\0"))
        worker.handle(("data", 1, 1.0, C2S, sasl_field(b"yes\0")))
        if worker.sessions:
            break
    assert worker.waiting == {} and list(worker.sessions) == [0x5EC7]
    worker.close_all("stopped")
    (archive,) = tmp_path.glob("*.spta")
    with ArchiveReader(archive) as reader:
        assert "user" not in reader.header["session"]
    assert len([r for r in iter_records(archive, []) if r.name == "sasl"]) > WAIT_RECORDS / 2
