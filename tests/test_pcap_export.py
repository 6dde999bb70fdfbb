"""pcapng export: our reader and tshark read back what the writer wrote."""

from __future__ import annotations

import io
import random
import shutil
import struct
import subprocess
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

import dpkt
import pytest

from dissectors.regen import LAB_CAPTURES
from spicetap.capture import (
    Direction,
    StreamClosed,
    StreamData,
    StreamEvent,
    StreamGap,
    StreamOpened,
    TcpReassembler,
    TcpSegment,
    read_packets,
)
from spicetap.pcap_export import (
    ACK_EVERY,
    MAX_SEGMENT,
    SERVER_PORT,
    Endpoint,
    PcapngStreamWriter,
    _isn,
)
from tests.conftest import require

Streams = dict[tuple[int, str], bytes]
DIRECTIONS: tuple[Direction, Direction] = ("c2s", "s2c")


def read_back(path: Path) -> tuple[list[TcpSegment], list[StreamEvent], Streams]:
    reassembler = TcpReassembler()
    with read_packets(path) as reader:
        segments = list(reader)
    assert reader.problem is None
    assert reader.frames == reader.segments
    events = [e for s in segments for e in reassembler.feed(s)] + reassembler.finish()
    streams: dict[tuple[int, str], bytearray] = {}
    for e in events:
        if isinstance(e, StreamData):
            streams.setdefault((e.conn, e.direction), bytearray()).extend(e.data)
    return segments, events, {key: bytes(value) for key, value in streams.items()}


def write(path: Path, script: Callable[[PcapngStreamWriter], None], **kw: str) -> Path:
    with path.open("wb") as f:
        writer = PcapngStreamWriter(f, **kw)
        script(writer)
        writer.finish()
    return path


def test_round_trip_interleaved_ipv4_ipv6_and_a_large_payload(tmp_path: Path) -> None:
    rng = random.Random(7)
    big = rng.randbytes(1 << 20)
    sent: dict[tuple[int, str], bytearray] = defaultdict(bytearray)
    ends: dict[int, tuple[Endpoint, Endpoint]] = {}
    # a connection id whose server sequence numbers wrap around 2**32 within ``big``
    wraps = next(c for c in range(1 << 16) if _isn(c, 1) > (1 << 32) - (1 << 19))
    ids = (0, wraps, 2)

    def script(w: PcapngStreamWriter) -> None:
        ends[0] = w.open(0, 10.0, ("127.0.0.1", 40001), ("127.0.0.1", 5999))
        ends[1] = w.open(wraps, 10.1, ("::1", 40002), ("::1", 5999))
        ends[2] = w.open(2, 10.2, None, None)
        ts = 10.3
        for i in range(60):  # three connections, both directions, interleaved
            conn, direction = i % 3, DIRECTIONS[i % 2]
            payload = big if i == 31 else rng.randbytes(rng.choice((0, 1, 7, 1000, 65001)))
            w.data(ids[conn], ts, direction, payload)
            sent[(conn, direction)] += payload
            ts += 0.01
        w.close(0, ts)
        w.close(wraps, ts, by="s2c")
        w.close(2, ts)

    segments, events, streams = read_back(write(tmp_path / "out.pcapng", script))
    assert streams == {key: bytes(value) for key, value in sent.items() if value}
    assert len(sent[(1, "s2c")]) > 1 << 20
    server_seqs = [s.seq for s in segments if s.src == "::1" and s.sport == 5999 and s.payload]
    assert server_seqs != sorted(server_seqs)  # wrapped
    assert not [e for e in events if isinstance(e, StreamGap)]
    opened = {e.conn: e for e in events if isinstance(e, StreamOpened)}
    assert {conn: (e.client, e.server) for conn, e in opened.items()} == ends
    assert not any(e.midstream for e in opened.values())
    assert ends[2] == (Endpoint("127.0.0.1", 49152), Endpoint("127.0.0.1", SERVER_PORT))
    closed = [e for e in events if isinstance(e, StreamClosed)]
    assert sorted((e.conn, e.reason) for e in closed) == [(0, "fin"), (1, "fin"), (2, "fin")]
    assert max(len(s.payload) for s in segments) == MAX_SEGMENT
    times = [s.ts for s in segments]
    assert times == sorted(times)


def _ones_complement(data: bytes) -> int:
    """The textbook checksum (RFC 1071), a word at a time: the oracle."""
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def frames(path: Path) -> Iterator[tuple[float, dpkt.ethernet.Ethernet]]:
    with path.open("rb") as f:
        for ts, buf in dpkt.pcapng.Reader(f):
            yield ts, dpkt.ethernet.Ethernet(buf)


def test_checksums_lengths_and_acks(tmp_path: Path) -> None:
    sizes = [1, 2, 3, 255, 65000, 65001, 3 * 65000 + 17, 600_001]

    def script(w: PcapngStreamWriter) -> None:
        for conn, (client, server) in enumerate(
            [(("127.0.0.1", 40000), ("127.0.0.1", 5930)), (("::1", 40000), ("::1", 5930))]
        ):
            w.open(conn, 1.0, client, server)
            for size in sizes:
                w.data(conn, 2.0, "s2c", bytes(range(256)) * (size // 256) + b"\xff" * (size % 256))
            w.close(conn, 3.0)

    count = 0
    for _ts, eth in frames(write(tmp_path / "out.pcapng", script)):
        ip = eth.data
        tcp = bytes(ip.data)
        if isinstance(ip, dpkt.ip.IP):
            assert _ones_complement(bytes(ip)[: ip.hl * 4]) == 0xFFFF
            assert ip.len == len(bytes(ip)) <= 65535
            pseudo = ip.src + ip.dst + struct.pack("!BBH", 0, 6, len(tcp))
        else:
            assert ip.plen == len(tcp)
            pseudo = ip.src + ip.dst + struct.pack("!I3xB", len(tcp), 6)
        assert _ones_complement(pseudo + tcp) == 0xFFFF
        assert len(ip.data.data) <= MAX_SEGMENT
        count += 1
    # per connection: 3 handshake + data segments + pure ACKs + 3 closing
    data_segments = sum(-(-size // MAX_SEGMENT) for size in sizes)
    assert count > 2 * (6 + data_segments)


def test_the_receiver_acknowledges_before_too_much_is_in_flight(tmp_path: Path) -> None:
    def script(w: PcapngStreamWriter) -> None:
        w.open(0, 1.0, None, None)
        w.data(0, 1.0, "c2s", bytes(2 << 20))

    unacked = 0
    for _ts, eth in frames(write(tmp_path / "out.pcapng", script)):
        tcp = eth.data.data
        if tcp.sport == SERVER_PORT and tcp.flags & dpkt.tcp.TH_ACK:
            unacked = 0
        unacked += len(tcp.data)
        assert unacked <= ACK_EVERY


def test_one_four_tuple_per_connection(tmp_path: Path) -> None:
    same = ("127.0.0.1", 40000), ("127.0.0.1", 5999)
    ends: list[tuple[Endpoint, Endpoint]] = []

    def script(w: PcapngStreamWriter) -> None:
        ends.append(w.open(0, 1.0, *same))
        ends.append(w.open(1, 1.0, *same))  # concurrent, same addresses
        w.data(0, 1.1, "c2s", b"zero")
        w.data(1, 1.1, "c2s", b"one")
        w.close(0, 1.2)
        ends.append(w.open(0, 1.3, *same))  # the id and the addresses again, later
        w.data(0, 1.4, "c2s", b"again")
        ends.append(w.open(3, 1.5, None, ("::1", 5999)))
        ends.append(w.open(4, 1.5, ("::1", 5999), ("::1", 5999)))  # talks to itself

    _segments, events, streams = read_back(write(tmp_path / "out.pcapng", script))
    assert ends[0] == (Endpoint("127.0.0.1", 40000), Endpoint("127.0.0.1", 5999))
    assert [client.port for client, _server in ends] == [40000, 49152, 49153, 49154, 49155]
    assert ends[3] == (Endpoint("::1", 49154), Endpoint("::1", 5999))
    assert streams == {(0, "c2s"): b"zero", (1, "c2s"): b"one", (2, "c2s"): b"again"}
    assert len([e for e in events if isinstance(e, StreamOpened)]) == 5


def test_timestamps_never_go_back_and_keep_nanoseconds(tmp_path: Path) -> None:
    def script(w: PcapngStreamWriter) -> None:
        w.open(0, 5.000000001, None, None)
        w.data(0, 4.0, "c2s", b"late")  # clamped to 5.000000001
        w.data(0, 6.123456789, "s2c", b"x")
        w.close(0, 6.0)

    stamps = [ts for ts, _eth in frames(write(tmp_path / "out.pcapng", script))]
    assert stamps == [5.000000001] * 4 + [6.123456789] * 4


def test_writes_as_it_goes_and_keeps_the_comment() -> None:
    out = io.BytesIO()
    w = PcapngStreamWriter(out, comment="session 3")
    w.open(0, 1.0, None, None)
    before = len(out.getvalue())
    w.data(0, 1.0, "c2s", bytes(100_000))
    assert len(out.getvalue()) > before + 100_000
    w.data(0, 1.0, "c2s", b"")  # nothing to write
    w.finish()
    data = out.getvalue()
    shb_len = struct.unpack_from("<I", data, 4)[0]
    shb = dpkt.pcapng.SectionHeaderBlockLE(data[:shb_len])
    assert [o.text for o in shb.opts if o.code == 1] == ["session 3"]
    assert w.packets == 3 + 2


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda w: w.data(9, 1.0, "c2s", b"x"), "connection 9 is not open"),
        (lambda w: w.open(0, 1.0, None, None), "connection 0 is already open"),
        (lambda w: w.data(0, 1.0, "up", b"x"), "direction must be"),
        (lambda w: w.open(1, 1.0, ("::1", 1), ("127.0.0.1", 2)), "IPv4 and IPv6 mixed"),
        (lambda w: w.open(1, 1.0, ("localhost", 1), None), "not an IPv4 or IPv6 address"),
        (lambda w: w.open(1, 1.0, ("127.0.0.1", 0), None), "bad port"),
        (lambda w: w.close(0, 1.0, by="both"), "direction must be"),
    ],
)
def test_misuse_raises(call: Callable[[PcapngStreamWriter], object], message: str) -> None:
    w = PcapngStreamWriter(io.BytesIO())
    w.open(0, 1.0, None, None)
    with pytest.raises(ValueError, match=message):
        call(w)


def test_nothing_after_finish() -> None:
    w = PcapngStreamWriter(io.BytesIO())
    w.finish()
    with pytest.raises(ValueError, match="finished"):
        w.open(0, 1.0, None, None)


# -- tshark -------------------------------------------------------------------------------
LAB_CAPTURE = LAB_CAPTURES / "plain-linux-all-channels.pcapng"
LAB_PORT = 5970
EXPORT_PORT = 5999
# (channel type, direction) whose messages tshark follows (shared/lab/README.md §4): the
# link stage of every channel, main server messages, display, cursor, playback.
RELIABLE = {(1, "s2c")} | {(ch, d) for ch in (2, 4, 5) for d in ("c2s", "s2c")}
Messages = dict[tuple[int, str], list[int]]  # (client port, direction) -> message types


def tshark(*args: str) -> str:
    require(shutil.which("tshark") is not None, "tshark (Debian package tshark)")
    run = subprocess.run(["tshark", "-n", *args], capture_output=True, text=True, check=True)
    return run.stdout


def spice_messages(path: Path, port: int) -> tuple[dict[int, int], Messages]:
    """Each connection's channel type, and its message types per direction, by tshark."""
    fields = ["tcp.srcport", "tcp.dstport", "spice.channel_type", "spice.message_type"]
    out = tshark("-r", str(path), "-d", f"tcp.port=={port},spice", "-T", "fields",
                 *(arg for field in fields for arg in ("-e", field)))  # fmt: skip
    channels: dict[int, int] = {}
    messages: Messages = defaultdict(list)
    for line in out.splitlines():
        sport, dport, channel, types = line.split("\t")
        c2s = int(dport) == port
        client = int(sport) if c2s else int(dport)
        if channel and c2s:  # the client's link message (the server lists channels too)
            channels.setdefault(client, int(channel.split(",")[0]))
        if types:
            messages[(client, "c2s" if c2s else "s2c")] += map(int, types.split(","))
    return channels, messages


def tcp_ip_problems(path: Path) -> list[str]:
    """Frames whose Ethernet/IP/TCP headers tshark finds fault with. The payload is taken
    as plain data: a dissector above TCP has its own complaints (tshark 4.4's RK512
    heuristic claimed SPICE bytes and warned of an "Unknown data type")."""
    fields = ["frame.number", "tcp.checksum.status", "ip.checksum.status",
              "_ws.expert.severity", "_ws.expert.message"]  # fmt: skip
    as_data = [arg for p in (EXPORT_PORT, SERVER_PORT) for arg in ("-d", f"tcp.port=={p},data")]
    out = tshark("-r", str(path), *as_data, "-o", "tcp.check_checksum:TRUE",
                 "-o", "ip.check_checksum:TRUE", "-T", "fields",
                 *(arg for field in fields for arg in ("-e", field)))  # fmt: skip
    problems = []
    for line in out.splitlines():
        _number, tcp_ok, ip_ok, severities, _text = line.split("\t")
        warned = any(int(s) >= 0x00600000 for s in severities.split(",") if s)  # PI_WARN
        if tcp_ok != "1" or ip_ok not in ("1", "") or warned:
            problems.append(line)
    return problems


def export(source: Path, out: Path, cut: int | None = None) -> dict[int, int]:
    """Re-export a capture's streams with other addresses: client port map, old to new.

    Every client asks for the same 127.0.0.2:40000, so the writer picks the ports.
    ``cut``: write the data in pieces of this size instead of as captured.
    """
    ports: dict[int, int] = {}
    reassembler = TcpReassembler()
    with read_packets(source) as reader, out.open("wb") as f:
        w = PcapngStreamWriter(f)

        def handle(e: StreamEvent) -> None:
            if isinstance(e, StreamOpened):
                client, _ = w.open(e.conn, e.ts, ("127.0.0.2", 40000), ("127.0.0.3", EXPORT_PORT))
                ports[e.client[1]] = client.port
            elif isinstance(e, StreamData):
                step = cut or len(e.data)
                for i in range(0, len(e.data), step):
                    w.data(e.conn, e.ts, e.direction, e.data[i : i + step])
            elif isinstance(e, StreamClosed):
                w.close(e.conn, e.ts)

        for segment in reader:
            for event in reassembler.feed(segment):
                handle(event)
        for event in reassembler.finish():
            handle(event)
        w.finish()
    return ports


@pytest.fixture(scope="module")
def lab_decoded() -> tuple[dict[int, int], Messages]:
    require(LAB_CAPTURE.is_file(), f"lab capture {LAB_CAPTURE}")
    return spice_messages(LAB_CAPTURE, LAB_PORT)


@pytest.mark.parametrize("cut", [None, 1400], ids=["as-captured", "cut-1400"])
def test_tshark_decodes_the_export_as_the_original(
    tmp_path: Path, lab_decoded: tuple[dict[int, int], Messages], cut: int | None
) -> None:
    channels, messages = lab_decoded
    ports = export(LAB_CAPTURE, tmp_path / "export.pcapng", cut)
    got_channels, got_messages = spice_messages(tmp_path / "export.pcapng", EXPORT_PORT)
    assert len(channels) == 11
    assert set(ports.values()) == {40000, *range(49152, 49152 + 10)}
    assert {ports[client]: ch for client, ch in channels.items()} == got_channels
    reliable = {(ports[c], d): m for (c, d), m in messages.items() if (channels[c], d) in RELIABLE}
    assert len(reliable) == 6 and all(reliable.values())  # playback: no client messages
    assert reliable == {key: got_messages[key] for key in reliable}
    if cut is None:  # the same bytes in the same segments: even the lossy streams agree
        assert {(ports[c], d): m for (c, d), m in messages.items()} == got_messages


def test_tshark_finds_no_fault_in_our_tcp_and_ip(tmp_path: Path) -> None:
    require(LAB_CAPTURE.is_file(), f"lab capture {LAB_CAPTURE}")
    export(LAB_CAPTURE, tmp_path / "lab.pcapng")
    assert tcp_ip_problems(tmp_path / "lab.pcapng") == []
    rng = random.Random(3)

    def script(w: PcapngStreamWriter) -> None:  # IPv6, odd sizes, a large payload
        w.open(0, 1.0, ("::1", 40000), ("::1", 5930))
        w.open(1, 1.0, None, None)
        for i, size in enumerate((1, 3, 1 << 20, 65001, 2)):
            w.data(i % 2, 2.0, DIRECTIONS[size % 2], rng.randbytes(size))
        w.close(0, 3.0)

    assert tcp_ip_problems(write(tmp_path / "mixed.pcapng", script)) == []
