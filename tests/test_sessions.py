"""`spicetap sessions`: the sessions in archives and folders of them, from each archive's
header and end record alone (an uncompressed one's end read from its last bytes)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from proxy.recorder import RecorderWorker, RecordingOptions
from spicetap.archive.reader import ArchiveReader
from spicetap.archive.tail import end_at_tail
from spicetap.archive.writer import ArchiveWriter, Rotation
from spicetap.cli import main
from tests.proxy.test_framing import TICKET, mini
from tests.proxy.test_recording import main_link

ROUTE = {"insertion": "reverse", "server": "10.1.2.3:5900", "target": "vm1"}


def record(
    directory: Path, session_id: int, user: str | None, *, end: bool = True, **options: Any
) -> None:
    """One session as the proxy's recorder writes it, its token given to `user`."""
    worker = RecorderWorker(
        RecordingOptions(directory, **options), {"auth": "inject"}, Ed25519PrivateKey.generate()
    )
    now = time.monotonic()  # the proxy's clock: the header's start is told from it
    where = (("192.0.2.7", 40000), ("10.1.2.3", 5900), None, ROUTE, None)
    worker.handle(("open", 1, now, *where))
    for t, d, data in main_link(session_id):
        worker.handle(("data", 1, now + t, d, data))
        if data is TICKET and user is not None:
            fields = {"mode": "inject", "result": "OK", "by": "server", "user": user}
            worker.handle(("event", 1, now + t, "s2c", "auth", "inject", fields, b""))
    for i in range(50):  # PINGs: some bytes between the header and the end
        worker.handle(("data", 1, now + 0.4 + i / 100, "s2c", mini(4, bytes(12))))
    if end:
        worker.handle(("close", 1, now + 1.0, "viewer closed"))
    else:  # the proxy was killed: no end record
        for session in worker.sessions.values():
            session.writer.abandon()


def listed(capsys: pytest.CaptureFixture[str], *args: str) -> Any:
    assert main(["sessions", "--json", *args]) == 0
    return json.loads(capsys.readouterr().out)


def test_sessions_in_folders_are_listed_in_order_with_whose_they_were(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rec = tmp_path / "rec"
    record(rec, 0x111, "alice@corp")
    record(rec / "older", 0x222, None, end=False)
    record(rec, 0x333, "bob", compress=True)
    (rec / "notes.txt").write_text("not an archive, not listed\n")
    (rec / "junk.spta").write_bytes(b"\x92\xc4\x01x")  # an archive by name only
    sessions = listed(capsys, str(rec))
    assert [s["session"]["id"] for s in sessions] == [0x111, 0x222, 0x333]  # by start time
    alice, cut, bob = sessions
    assert alice["session"]["user"] == "alice@corp" and alice["session"]["target"] == "vm1"
    assert alice["end"]["status"] == "complete" and alice["end"]["signed"] is True
    assert 0 <= alice["end"]["seconds"] < 60 and alice["bytes"] > 1000
    assert cut["end"] is None and "user" not in cut["session"]
    assert bob["end"]["status"] == "complete" and bob["path"].endswith(".spta.zst")
    warned = capsys.readouterr().err  # nothing more: the warning came with the listing
    assert main(["sessions", str(rec), "--user", "bob"]) == 0
    out, err = capsys.readouterr()
    assert "00000333" in out and "00000111" not in out and "1 of 4 archives (user bob)" in out
    assert "junk.spta" in err and err.count("\n") == 1 and "skipped" in err, (warned, err)
    assert main(["sessions", str(rec / "older"), str(rec / "older")]) == 0  # once each
    out = capsys.readouterr().out
    assert "no end record" in out and "1 of 1 archives" in out


def test_sessions_needs_a_path() -> None:
    with pytest.raises(SystemExit) as stop:
        main(["sessions"])
    assert stop.value.code == 2


def test_a_missing_path_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sessions", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"spicetap: error: {tmp_path / 'nowhere'}: no such file or folder"


def test_the_end_read_from_the_tail_is_the_one_read_through(tmp_path: Path) -> None:
    """Every end record the writer makes, found from the last bytes alone: signed or not,
    rotated parts, records of every size before it; none in a file cut anywhere in it."""
    key = Ed25519PrivateKey.generate()
    for n, (signed, size) in enumerate([(True, 0), (False, 1), (True, 300), (True, 70000)]):
        path = tmp_path / f"a{n}.spta"
        writer = ArchiveWriter(
            path, {"session": {}}, signing_key=key if signed else None,
            rotation=Rotation(max_bytes=1 << 20),
        )  # fmt: skip
        for i in range(40):
            writer.write({"kind": "message", "raw": bytes([i]) * size, "t": i})
        writer.close("complete", {"note": "\x92\xc4" * 40})  # array/bin bytes inside it
        with ArchiveReader(path) as reader:
            for _record in reader.records():
                pass
            assert reader.end is not None
        assert end_at_tail(path) == reader.end
        whole = path.read_bytes()
        cut = tmp_path / "cut.spta"
        for at in range(1, 120):
            cut.write_bytes(whole[:-at])
            assert end_at_tail(cut) is None, (n, at)
