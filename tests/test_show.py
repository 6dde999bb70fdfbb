"""`spicetap show` on real captures (the lab's corpus) and on bad input."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from dissectors import api, interp
from dissectors.errors import Malformed
from spicetap.archive.privacy import PrivacyPolicy
from spicetap.archive.records import to_archive
from spicetap.capture import StreamData, TcpReassembler, read_packets
from spicetap.cli import main
from spicetap.records import Record, RecordBuilder
from spicetap.show import REORDER_MAX, TimeOrder, iter_capture
from tests.capture.builders import stream_frames, write_pcap
from tests.conftest import ELEVEN_CHANNELS
from tests.proxy.test_framing import OK, TICKET, caps_word, link_mess, link_reply
from tests.proxy.test_recording import init

JSON_KEYS = {
    "time",
    "session",
    "connection",
    "channel",
    "channel_id",
    "direction",
    "kind",
    "type",
    "name",
    "size",
    "fields",
    "flags",
}
ELEVEN = ELEVEN_CHANNELS


def records(path: Path) -> list[Record]:
    return list(iter_capture(path))


def test_every_lab_capture_decodes_fully(lab_captures: list[Path]) -> None:
    assert lab_captures
    for path in lab_captures:
        recs = records(path)
        messages = [r for r in recs if r.kind in ("message", "agent")]
        sasl = [r for r in recs if r.kind == "link" and r.name == "sasl"]
        assert messages or sasl, path  # SASL DIGEST-MD5 encrypts what follows its exchange
        partial = [r for r in messages if r.not_fully_dissected]
        assert partial == [], (path.name, [(r.channel, r.name, r.error) for r in partial[:5]])
        errors = [r for r in recs if r.kind in ("error", "gap")]
        # only TLS-encrypted connections may be opaque in a capture
        assert all("TLS-encrypted" in (r.error or "") for r in errors), (path.name, errors[:3])


def test_all_channels_agent_and_sessions(lab_captures: list[Path]) -> None:
    path = next(p for p in lab_captures if p.name.startswith("plain-linux-all-channels"))
    recs = records(path)
    conns = {(r.connection, r.channel, r.channel_id) for r in recs}
    assert {c[1] for c in conns} == ELEVEN
    assert len(conns) == 11  # usbredir twice
    sessions = {r.session for r in recs}
    (session,) = sessions
    init = next(r for r in recs if r.name == "init" and r.channel == "main")
    assert init.decoded is not None and init.decoded.fields is not None
    assert init.decoded.fields["session_id"] == session
    agent = {(r.direction, r.name) for r in recs if r.kind == "agent"}
    for expected in [
        ("c2s", "announce_capabilities"),
        ("s2c", "announce_capabilities"),
        ("c2s", "clipboard_grab"),
        ("s2c", "clipboard_grab"),
        ("c2s", "clipboard"),
        ("s2c", "clipboard"),
        ("c2s", "file_xfer_start"),
        ("c2s", "file_xfer_data"),
        ("s2c", "file_xfer_status"),
        ("c2s", "monitors_config"),
    ]:
        assert expected in agent
    clip = next(
        r for r in recs if r.kind == "agent" and r.name == "clipboard" and r.direction == "c2s"
    )
    assert clip.decoded is not None and clip.decoded.fields is not None
    assert clip.decoded.fields["data"] == b"client clipboard text"
    # secrets: the ticket is never decoded, and an archive keeps only its length
    tickets = [r for r in recs if r.kind == "link" and r.name == "ticket"]
    assert tickets and all(r.fields is None for r in tickets)
    archived = [to_archive(r, 0.0, PrivacyPolicy()) for r in tickets]
    assert all(
        a is not None and a["raw"] == b"" and a["redacted"] == {"reason": "secret", "len": 128}
        for a in archived
    )


def test_real_messages_cut_and_mutated_never_raise(lab_captures: list[Path]) -> None:
    rng = random.Random(1234)
    path = next(p for p in lab_captures if p.name.startswith("plain-linux-all-channels"))
    msgs = [r for r in records(path) if r.kind == "message" and r.decoded is not None]
    seen = 0
    for r in msgs[:400]:
        assert r.decoded is not None
        body = r.raw[len(r.raw) - r.decoded.size :]
        key = (r.decoded.channel_type, r.direction, r.decoded.msg_type)
        for _ in range(3):
            mutated = bytearray(body)
            if mutated and rng.random() < 0.5:
                del mutated[rng.randrange(len(mutated)) :]
            for _ in range(rng.randrange(1, 4)):
                if mutated:
                    mutated[rng.randrange(len(mutated))] = rng.randrange(256)
            dec = api.decode(*key, bytes(mutated))
            assert dec.error is not None or dec.fields is not None
            seen += 1
    assert seen >= 300


def test_cli_show_lines_json_and_tree(
    lab_captures: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    path = next(p for p in lab_captures if p.name.startswith("remote-viewer-plain"))
    assert main(["show", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert main(["show", "--json", str(path)]) == 0
    objs = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(objs) == len(lines) == len(records(path))
    for o in objs:
        assert set(o) == JSON_KEYS
        assert o["direction"] in ("c2s", "s2c")
        assert set(o["flags"]) == {"error", "not_fully_dissected"}
    draw = next(o for o in objs if o["name"] == "draw_copy")
    assert draw["fields"]["data"]["src_bitmap"]["descriptor"]["type"] in (
        "LZ_RGB",
        "GLZ_RGB",
        "QUIC",
        "BITMAP",
        "JPEG",
        "LZ4",
        "FROM_CACHE",
    )
    assert main(["show", "-V", str(path)]) == 0
    tree = capsys.readouterr().out.splitlines()
    assert len(tree) > 2 * len(lines)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, "no such file"),
        (b"", "empty"),
        (b"GIF89a" + bytes(100), "neither a spicetap archive nor a pcap or pcapng capture"),
    ],
)
def test_cli_show_bad_files_give_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes | None, expected: str
) -> None:
    path = tmp_path / "x.pcapng"
    if content is not None:
        path.write_bytes(content)
    assert main(["show", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("spicetap: error: ")
    assert expected in err.lower()


def test_interp_and_generated_agree_on_real_messages(lab_captures: list[Path]) -> None:
    from dissectors.protolang.resolve import load
    from dissectors.regen import DEFS_DIR, REFERENCE_PROTO

    proto = load(REFERENCE_PROTO, (DEFS_DIR / "spice-wire.proto",))
    count = 0
    for path in lab_captures:
        for r in records(path):
            if r.kind != "message" or r.decoded is None or r.decoded.name is None:
                continue
            ch = proto.channel(r.decoded.channel_type)
            assert ch is not None
            body_type = ch.messages(r.direction)[r.decoded.msg_type].body
            body = r.raw[len(r.raw) - r.decoded.size :]
            try:
                value, _ = interp.decode(body_type, body)
            except Malformed:  # pragma: no cover - real traffic decodes
                pytest.fail(f"oracle rejects a real {r.channel} {r.name}")
            assert value == r.decoded.fields
            assert (
                api.encode(r.decoded.channel_type, r.direction, r.decoded.msg_type, value) == body
            )
            count += 1
    assert count > 1000


def test_real_streams_resplit_anywhere_give_the_same_records(lab_captures: list[Path]) -> None:
    rng = random.Random(99)
    path = next(p for p in lab_captures if p.name.startswith("plain-linux-all-channels"))
    once = [r for r in records(path) if r.kind in ("message", "agent", "link")]
    # Replay the same byte streams cut at random places: framing must not depend on cuts.
    pieces: list[tuple[int, float, str, bytes]] = []
    reassembler = TcpReassembler()
    with read_packets(path) as reader:
        for seg in reader:
            for ev in reassembler.feed(seg):
                if isinstance(ev, StreamData):
                    data = ev.data
                    while data:
                        cut = rng.randint(1, max(1, min(len(data), 700)))
                        pieces.append((ev.conn, ev.ts, ev.direction, data[:cut]))
                        data = data[cut:]
    builder = RecordBuilder()
    again: list[Record] = []
    for conn, ts, direction, chunk in pieces:
        again += builder.data(conn, ts, direction, chunk)
    again = [r for r in again if r.kind in ("message", "agent", "link")]
    assert len(pieces) > len(once)
    key = lambda r: (r.connection, r.direction, r.kind, r.name, r.raw)  # noqa: E731
    assert sorted(map(key, again)) == sorted(map(key, once))


@pytest.mark.parametrize("command", [["show"], ["stats"], ["export", "json"]], ids=" ".join)
@pytest.mark.parametrize("text", ["", "   "])
def test_an_empty_filter_is_refused_not_taken_as_none(
    lab_captures: list[Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    command: list[str],
    text: str,
) -> None:
    capture = next(p for p in lab_captures if p.name.startswith("remote-viewer-plain"))
    out = tmp_path / "out.jsonl"
    extra = ["-o", str(out)] if command[0] == "export" else []
    assert main([*command, str(capture), "-f", text, *extra]) == 2
    assert capsys.readouterr() == (
        "",
        f"spicetap: error: -f: column {len(text) + 1}: expected an expression "
        "(a filter is empty)\n",
    )
    assert not out.exists()


def test_a_main_channel_waiting_for_init_prints_in_time_order(tmp_path: Path) -> None:
    """A main channel's link stage waits for INIT (which names its session); a display
    channel of another session links meanwhile. Its records come out after the main
    channel's earlier link stage, not before (each connection's own order kept)."""
    bits = caps_word(1, 3)
    main_channel = stream_frames(
        [(True, link_mess(bits, channel_type=1, conn=0)), (False, link_reply(bits)),
         (True, TICKET), (False, OK), (False, init(0x77))],
        ts0=100.0,
    )  # fmt: skip
    other = (("10.0.0.1", 40001), ("10.0.0.2", 5900))
    display = stream_frames(  # its link message at 100.0075: between OK and INIT
        [(True, link_mess(bits, channel_type=2, conn=0x99)), (False, link_reply(bits))],
        ts0=100.0035,
        endpoints=other,
    )
    capture = write_pcap(tmp_path / "two.pcap", sorted(main_channel + display))
    got = [(r.time, r.channel, r.kind) for r in iter_capture(capture)]
    assert got == sorted(got, key=lambda r: r[0])
    links = [channel for _t, channel, kind in got if kind == "link"]
    assert links == ["main"] * 6 + ["display"] * 4  # headers and bodies: link, reply, ...


def _rec(conn: int, t: float) -> Record:
    return Record(t, None, conn, "main", 0, "s2c", "message", 4, "ping", b"")


def test_records_kept_back_are_bounded_and_keep_each_connections_order() -> None:
    builder = RecordBuilder()
    order = TimeOrder(builder)
    builder.holding.add(1)  # connection 1's records wait in the builder
    assert order.put([_rec(2, 5.0), _rec(2, 4.0)]) == []  # kept back
    builder.holding.clear()
    out = order.put([_rec(1, 1.0), _rec(1, 6.0)])
    # merged by time, but connection 2's 5.0 never overtakes its own 4.0 behind it
    assert [(r.connection, r.time) for r in out] == [(1, 1.0), (2, 5.0), (2, 4.0), (1, 6.0)]
    builder.holding.add(1)  # a hold that never ends lets go at REORDER_MAX records
    kept = [order.put([_rec(2, float(n))]) for n in range(REORDER_MAX)]
    assert kept[:-1] == [[]] * (REORDER_MAX - 1) and len(kept[-1]) == REORDER_MAX
