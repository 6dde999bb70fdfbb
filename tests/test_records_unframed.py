"""Bytes that cross a channel but never make a whole unit still reach the records (the
archive keeps what the privacy policy allows), and a closed connection is forgotten."""

from __future__ import annotations

from proxy.core.framing import C2S, S2C
from spicetap.archive.privacy import SECRET_STAGE, PrivacyPolicy, decide
from spicetap.records import Record, RecordBuilder
from tests.proxy.test_framing import link_mess, mini, session

VIEWER, SERVER = ("127.0.0.1", 40000), ("127.0.0.1", 5900)


def _feed(builder: RecordBuilder, chunks: list[tuple[str, bytes]]) -> list[Record]:
    out: list[Record] = []
    for d, data in chunks:
        out += builder.data(1, 1.0, d, data)
    return out


def test_a_message_cut_by_the_close_is_kept_and_the_connection_forgotten() -> None:
    builder = RecordBuilder()
    builder.opened(1, 1.0, VIEWER, SERVER)
    cut = mini(4, b"pingpong")[:9]
    records = _feed(builder, [*session(False, True)[:4], (S2C, cut)])
    records += builder.closed(1, 2.0, "server closed")
    (error,) = [r for r in records if r.kind == "error"]
    assert (error.direction, error.raw, error.name) == (S2C, cut, None)
    assert (
        error.error
        == "connection ended (server closed) inside a unit: 9 bytes of a truncated message"
    )
    assert records[-1].kind == "close"
    assert builder.conns == {} and builder.main_session == {}  # nothing held for it any more


def test_a_link_message_cut_is_kept_and_the_open_record_still_comes() -> None:
    builder = RecordBuilder()
    builder.opened(1, 1.0, VIEWER, SERVER)
    part = link_mess(1)[:20]
    records = _feed(builder, [(C2S, part)]) + builder.closed(1, 2.0, "viewer closed")
    assert [r.kind for r in records] == ["open", "link", "error", "close"]
    assert records[1].raw + records[2].raw == part  # the link header, then the cut body
    assert records[2].name is None
    assert records[0].fields == {"client": "127.0.0.1:40000", "server": "127.0.0.1:5900"}


def test_a_cut_ticket_is_named_a_secret() -> None:
    """Bytes where the ticket comes are never kept, whole or cut (privacy: "secret")."""
    builder = RecordBuilder()
    builder.opened(1, 1.0, VIEWER, SERVER)
    chunks = session(False, True)
    records = _feed(builder, [*chunks[:2], (C2S, chunks[2][1][:50])])
    (error,) = [r for r in records + builder.closed(1, 2.0, "viewer closed") if r.kind == "error"]
    assert error.name == SECRET_STAGE and len(error.raw) == 50
    assert decide(PrivacyPolicy(), "main", C2S, "error", error.name, frozenset()).redact == "secret"


def test_bytes_after_a_framing_error_come_with_the_error() -> None:
    builder = RecordBuilder()
    builder.opened(1, 1.0, VIEWER, SERVER)
    chunk = b"XXXX" + bytes(12) + b"junk" * 1000  # a bad magic, and what came with it
    head, error = _feed(builder, [(C2S, chunk)])[1:]
    assert head.kind == "link" and error.kind == "error"
    assert "bad link magic" in (error.error or "")
    assert head.raw + error.raw == chunk and error.name is None  # no secret before the reply


def test_unframed_bytes_are_kept_only_where_the_policy_keeps_everything() -> None:
    def fate(policy: PrivacyPolicy, channel: str, name: str | None = None) -> str | None:
        decision = decide(policy, channel, C2S, "error", name, frozenset())
        assert decision.keep
        return decision.redact

    everything = PrivacyPolicy()
    assert fate(everything, "inputs") is None and fate(everything, "main") is None
    assert fate(everything, "main", SECRET_STAGE) == "secret"  # the ticket may be in there
    assert fate(PrivacyPolicy(keys="events"), "inputs") == "unframed"
    assert fate(PrivacyPolicy(keys="events"), "display") is None
    assert fate(PrivacyPolicy(clipboard="hash"), "main") == "unframed"
    assert fate(PrivacyPolicy(files="metadata"), "main") == "unframed"
    assert fate(PrivacyPolicy(display=False), "display") == "unframed"
    assert fate(PrivacyPolicy(audio=False), "record") == "unframed"


def test_a_link_header_read_apart_waits_for_the_link_message_to_name_its_channel() -> None:
    """Its records (and the open record) then carry the channel and session, so they go
    to the session's archive rather than to one of connections that never linked."""
    builder = RecordBuilder()
    builder.opened(1, 1.0, VIEWER, SERVER)
    whole = link_mess(1, channel_type=2, conn=0x5EC7)
    assert builder.data(1, 1.0, C2S, whole[:16]) == []  # the header alone: held
    out = builder.data(1, 1.1, C2S, whole[16:])
    assert [(r.kind, r.name) for r in out] == [
        ("open", None), ("link", "header"), ("link", "link_mess")
    ]  # fmt: skip
    assert {(r.channel, r.session) for r in out} == {("display", 0x5EC7)}
    assert out[0].fields == {"client": "127.0.0.1:40000", "server": "127.0.0.1:5900"}


def test_a_connection_that_never_names_its_channel_lets_go_of_its_records() -> None:
    builder = RecordBuilder()
    builder.opened(1, 1.0, VIEWER, SERVER)
    assert builder.data(1, 1.0, C2S, b"RE") == []  # could still be SPICE
    bad = builder.data(1, 1.1, C2S, b"D! this is not spice")
    assert [r.kind for r in bad] == ["open", "link", "error"]  # bad magic: nothing to wait for
    assert {r.channel for r in bad} == {"unknown"}
    builder.opened(2, 2.0, VIEWER, SERVER)
    closed = builder.closed(2, 2.5, "viewer closed")  # a health check: connect, close
    assert [(r.kind, r.channel) for r in closed] == [("open", "unknown"), ("close", "unknown")]


def test_the_open_record_comes_first_when_an_error_is_the_first_thing_to_say() -> None:
    """A viewer that sends nothing until the link timeout, or a connection that failed its
    TLS handshake: the proxy's error is the connection's first record, after the open."""
    builder = RecordBuilder()
    builder.opened(1, 1.0, VIEWER, SERVER, {"tls": {"viewer": True}})
    records = builder.error(1, 2.0, C2S, "TLS handshake failed: no shared cipher")
    records += builder.closed(1, 2.0, "TLS handshake failed: no shared cipher")
    assert [r.kind for r in records] == ["open", "error", "close"]
    assert records[0].time == 1.0 and records[0].fields is not None
    assert records[0].fields["tls"] == {"viewer": True}
    assert records[1].error == "TLS handshake failed: no shared cipher"
