"""Real traffic from our own harness (QEMU spice-server + Linux guest with an agent, and a
spice-gtk client exchanging keys, mouse, clipboard, files, port data, audio and a USB CD)
decodes fully: all 11 channel connections, zero "not fully dissected", zero errors."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import pytest

from dissectors.api import LINK
from spicetap.cli import main
from spicetap.inputs import iter_records
from spicetap.records import Record
from spicetap.show import iter_capture
from tests.conftest import ELEVEN_CHANNELS
from tests.harness import PeerMissing, SessionCapture, record_full_session

pytestmark = pytest.mark.peers

CHANNEL_NUMBERS = dict(LINK.enums["channel_type"][1])
CHANNELS = ELEVEN_CHANNELS


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory) -> SessionCapture:
    out = tmp_path_factory.mktemp("session")
    try:
        return record_full_session(out / "full.pcapng")
    except PeerMissing as exc:
        if os.environ.get("CI"):
            pytest.fail(f"peer missing in CI: {exc}")
        pytest.skip(f"peer missing: {exc}")


@pytest.fixture(scope="module")
def records(session: SessionCapture) -> list[Record]:
    return list(iter_capture(session.pcapng))


def test_eleven_channel_connections_in_one_session(records: list[Record]) -> None:
    conns = {(r.connection, r.channel, r.channel_id) for r in records}
    assert {c[1] for c in conns} == CHANNELS
    assert len(conns) == 11
    sessions = {r.session for r in records}
    assert len(sessions) == 1 and None not in sessions


def test_every_message_fully_dissected(records: list[Record]) -> None:
    msgs = [r for r in records if r.kind in ("message", "agent")]
    assert len(msgs) > 500
    bad = [(r.channel, r.direction, r.name, r.error) for r in msgs if r.not_fully_dissected]
    assert bad == []
    errors = [(r.channel, r.kind, r.error) for r in records if r.kind in ("error", "gap")]
    assert errors == []


def test_the_c_framer_records_what_the_python_one_does(
    session: SessionCapture, records: list[Record], monkeypatch: pytest.MonkeyPatch
) -> None:
    """proxy/core/_fastframe.c made most of these records (every input); without it, the
    same capture gives the same records."""
    from dissectors.api import SPICE
    from proxy.core import _fastframe, framing
    from spicetap import records as records_module

    assert framing.FRAME is _fastframe.frame
    monkeypatch.setattr(framing, "FRAME", framing.frame_messages)
    monkeypatch.setattr(records_module, "FLAT_BUILDER", None)
    assert list(iter_capture(session.pcapng)) == records
    flat = [r for r in records if r.kind == "message" and r.struct in SPICE.flat]
    assert {"inputs", "display", "cursor"} <= {r.channel for r in flat}


def test_the_exchange_is_visible(records: list[Record]) -> None:
    seen = Counter((r.channel, r.direction, r.kind, r.name) for r in records)
    for key in [
        ("inputs", "c2s", "message", "key_down"),
        ("inputs", "c2s", "message", "key_up"),
        ("playback", "s2c", "message", "data"),
        ("record", "c2s", "message", "data"),
        ("usbredir", "c2s", "message", "data"),
        ("usbredir", "s2c", "message", "data"),
        ("port", "c2s", "message", "data"),
        ("port", "s2c", "message", "data"),
        ("smartcard", "c2s", "message", "data"),
        ("display", "s2c", "message", "draw_copy"),
        ("main", "c2s", "agent", "clipboard"),
        ("main", "s2c", "agent", "clipboard"),
        ("main", "c2s", "agent", "file_xfer_start"),
        ("main", "c2s", "agent", "file_xfer_data"),
        ("main", "s2c", "agent", "file_xfer_status"),
        ("main", "c2s", "agent", "monitors_config"),
    ]:
        assert seen[key] > 0, key


RELIABLE = {1: "main", 2: "display", 4: "cursor", 5: "playback"}  # tshark decodes these s2c


def _tshark_view(pcap: Path, server_ports: set[int]) -> Counter[tuple[int, tuple[int, ...]]]:
    """(channel type, server message types) per TCP stream, as tshark's dissector sees it."""
    cmd = ["tshark", "-n", "-r", str(pcap)]
    for port in sorted(server_ports):
        cmd += ["-d", f"tcp.port=={port},spice"]
    cmd += [
        "-T",
        "fields",
        "-E",
        "separator=;",
        "-e",
        "tcp.stream",
        "-e",
        "tcp.srcport",
        "-e",
        "spice.channel_type",
        "-e",
        "spice.message_type",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=300).stdout
    channel: dict[str, int] = {}
    types: dict[str, list[int]] = {}
    for line in out.splitlines():
        stream, sport, ctype, mtypes = line.split(";")
        if ctype:
            channel.setdefault(stream, int(ctype.split(",")[0]))
        if mtypes and int(sport) in server_ports:
            types.setdefault(stream, []).extend(int(t) for t in mtypes.split(","))
    return Counter((channel[s], tuple(types.get(s, ()))) for s in channel)


def test_archive_exports_to_a_pcapng_tshark_agrees_with(
    session: SessionCapture, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if shutil.which("tshark") is None:
        if os.environ.get("CI"):
            pytest.fail("tshark missing in CI")
        pytest.skip("tshark missing")
    monkeypatch.setenv("SPICETAP_CONFIG_DIR", str(tmp_path / "cfg"))
    archive = tmp_path / "s.spta"
    assert main(["import", str(session.pcapng), "-o", str(archive)]) == 0
    assert main(["verify", str(archive)]) == 0
    pcap = tmp_path / "export.pcapng"
    assert main(["export", "pcap", str(archive), "-o", str(pcap)]) == 0
    recs = list(iter_records(archive, []))
    ports = {
        int(str((r.fields or {}).get("server", ":0")).rsplit(":", 1)[1])
        for r in recs
        if r.kind == "open"
    }
    theirs = _tshark_view(pcap, ports)
    # spicetap's view of the same archive: channel of every connection, server message types
    channel_of: dict[int, int] = {}
    ours_types: dict[int, list[int]] = {}
    for r in recs:
        if r.kind == "link" and r.name == "link_mess" and r.fields:
            channel_of[r.connection] = CHANNEL_NUMBERS[r.fields["channel_type"]]
        if r.kind == "message" and r.direction == "s2c" and r.msg_type is not None:
            ours_types.setdefault(r.connection, []).append(r.msg_type)
    ours = Counter((ch, tuple(ours_types.get(c, ()))) for c, ch in channel_of.items())
    assert sorted(ch for ch, _ in theirs.elements()) == sorted(channel_of.values())
    assert len(channel_of) == 11
    reliable_ours = Counter({k: v for k, v in ours.items() if k[0] in RELIABLE})
    reliable_theirs = Counter({k: v for k, v in theirs.items() if k[0] in RELIABLE})
    assert reliable_theirs == reliable_ours
    assert sum(len(k[1]) * v for k, v in reliable_ours.items()) > 100
