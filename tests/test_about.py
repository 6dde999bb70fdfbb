"""`spicetap stats` says what an archive's header and end record say of its session: who,
from where, to what, when, how it ended, what was kept."""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from proxy.recorder import RecorderWorker, RecordingOptions
from spicetap.archive.privacy import PrivacyPolicy
from spicetap.archive.writer import ArchiveWriter
from spicetap.cli import main
from tests.proxy.test_framing import TICKET
from tests.proxy.test_recording import SESSION_ID, main_link

ROUTE = {
    "insertion": "websocket",
    "server": "10.1.2.3:5900",
    "target": "vm1",
    "forwarded_by": "10.0.0.2:0",
    "tls": {"viewer": True, "server": False},
}


def recorded(directory: Path, *, end: bool) -> Path:
    """A session as the proxy's recorder writes it: the viewer came through a trusted
    reverse proxy to target vm1 with a token given to alice@corp."""
    meta = {"viewer": None, "auth": "inject", "mask_caps": ["MJPEG"]}
    options = RecordingOptions(directory, policy=PrivacyPolicy(keys="events"))
    worker = RecorderWorker(options, meta, Ed25519PrivateKey.generate())
    worker.handle(("open", 1, 0.0, ("192.0.2.7", 0), ("10.1.2.3", 5900), None, ROUTE, None))
    for t, d, data in main_link():
        worker.handle(("data", 1, t, d, data))
        if data is TICKET:
            fields = {"mode": "inject", "result": "OK", "by": "server", "user": "alice@corp"}
            worker.handle(("event", 1, t, "s2c", "auth", "inject", fields, b""))
    if end:
        worker.handle(("close", 1, 2.0, "viewer closed"))
    else:  # the proxy was killed: no end record
        for session in worker.sessions.values():
            session.writer.abandon()
    (archive,) = directory.glob("*.spta")
    return archive


def stats(archive: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> str:
    assert main(["stats", *extra, str(archive)]) == 0
    out: str = capsys.readouterr().out
    return out


def test_stats_says_whose_session_it_was_and_how_it_came_and_ended(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    archive = recorded(tmp_path, end=True)
    text = stats(archive, capsys)
    lines = text.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith(f"session {SESSION_ID:08x}"))
    when, who, route, privacy = lines[first : first + 4]  # one line each, however long
    assert "; started " in when and when.endswith(": complete")  # signed: not "unsigned"
    assert who == "viewer 192.0.2.7, named by 10.0.0.2:0, user alice@corp"
    assert route == (
        "insertion websocket; server 10.1.2.3:5900 (target vm1); TLS viewer yes, server no; "
        "auth inject; masked capabilities MJPEG"
    )
    assert privacy.startswith("privacy: keys events, clipboard content, files content,")
    data = json.loads(stats(archive, capsys, "--json"))
    about = data["archive"]
    assert about["session"]["user"] == "alice@corp" and about["session"]["id"] == SESSION_ID
    assert about["end"]["status"] == "complete" and about["end"]["signed"] is True
    started = datetime.datetime.fromisoformat(about["started"])
    assert started.tzinfo is not None and about["part"] == 1
    assert started <= datetime.datetime.fromisoformat(about["end"]["ended"])
    assert about["policy"]["keys"] == "events" and about["policy"]["tickets"] == "never"
    assert data["sessions"] == [SESSION_ID]  # what the records say, as before


def test_an_archive_without_its_end_record_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    archive = recorded(tmp_path, end=False)
    assert "no end record (cut short, or still being recorded)" in stats(archive, capsys)
    assert json.loads(stats(archive, capsys, "--json"))["archive"]["end"] is None


def test_a_capture_has_no_archive_to_describe(
    lab_captures: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    capture = next(p for p in lab_captures if p.name.startswith("remote-viewer-plain"))
    assert json.loads(stats(capture, capsys, "--json"))["archive"] is None


FORGED: dict[str, Any] = {
    "started": 1.0,
    "part": "two",
    "policy": ["keys"],
    "session": {
        "id": True,
        "user": "mallory\n[bold]forged line",
        "viewer": 5,
        "tls": "yes",
        "mask_caps": [b"\x00", "MJPEG", {"x": 1}],
        "server": b"\xff",
        7: "a key that is no string",
    },
}


def test_a_forged_header_is_shown_for_what_it_is_on_its_own_lines(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Whatever a damaged or forged header holds: no traceback, nothing that breaks a line
    or reads as markup, and JSON that holds only JSON's types."""
    archive = tmp_path / "forged.spta"
    writer = ArchiveWriter(archive, FORGED)
    writer.close("weird")
    text = stats(archive, capsys)
    assert "user mallory\\n[bold]forged line" in text.replace("\n", "")
    assert "connections of no session" in text and ": weird (unsigned)" in text
    assert "privacy" not in text  # not a map: left out
    about = json.loads(stats(archive, capsys, "--json"))["archive"]
    assert about["part"] == 1 and about["policy"] == {}
    assert about["session"]["mask_caps"] == ["MJPEG"] and "server" not in about["session"]
    assert about["session"]["user"] == "mallory\n[bold]forged line"  # JSON escapes it
