"""Privacy switches on real traffic, and the archive commands end to end."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from spicetap.archive.reader import ArchiveReader
from spicetap.cli import main
from spicetap.show import iter_capture


@pytest.fixture
def config_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cfg = tmp_path / "config"
    monkeypatch.setenv("SPICETAP_CONFIG_DIR", str(cfg))
    return cfg


@pytest.fixture
def all_channels(lab_captures: list[Path]) -> Path:
    return next(p for p in lab_captures if p.name.startswith("plain-linux-all-channels"))


def archive_records(path: Path) -> list[dict[str, Any]]:
    with ArchiveReader(path) as r:
        return list(r.records())


SECRETS_IN_CAPTURE = [
    b"client clipboard text",
    b"guest clipboard #1",
    b"file transferred through the agent",
]


def test_privacy_switches(tmp_path: Path, config_dir: Path, all_channels: Path) -> None:
    ticket = next(r.raw for r in iter_capture(all_channels) if r.name == "ticket")
    keys = [r for r in iter_capture(all_channels) if r.name in ("key_scancode", "key_down")]
    assert keys and len(ticket) == 128
    full = tmp_path / "full.spta"
    assert main(["import", str(all_channels), "-o", str(full)]) == 0
    full_bytes = full.read_bytes()
    for secret in SECRETS_IN_CAPTURE:
        assert secret in full_bytes  # content is kept by default...
    assert ticket not in full_bytes  # ...but never the ticket

    private = tmp_path / "private.spta"
    assert (
        main(
            [
                "import",
                str(all_channels),
                "-o",
                str(private),
                "--keys",
                "events",
                "--clipboard",
                "hash",
                "--files",
                "metadata",
                "--no-audio",
            ]
        )
        == 0
    )
    data = private.read_bytes()
    for secret in SECRETS_IN_CAPTURE:
        assert secret not in data
    assert ticket not in data
    recs = archive_records(private)
    key_recs = [
        r
        for r in recs
        if r["channel"] == "inputs" and r["name"] in ("key_down", "key_up", "key_scancode")
    ]
    assert len(key_recs) == len(keys)  # each key event is still there, with its time...
    for r in key_recs:  # ...but not which key
        assert r["raw"] == b"" and r["redacted"]["reason"] == "keys"
        for value in (r["view"] or {}).values():
            assert value == {"redacted": True, "len": value["len"]}
    for r in key_recs:  # no key bytes anywhere in the file
        assert b"\x1e\x00\x00\x00" not in r.get("raw", b"")
    clip = next(r for r in recs if r["kind"] == "agent" and r["name"] == "clipboard")
    assert clip["view"]["data"]["sha256"]
    assert clip["redacted"]["reason"] == "clipboard"
    audio = [r for r in recs if r["channel"] in ("playback", "record") and r["name"] == "data"]
    assert audio and all(r["raw"] == b"" for r in audio)
    with ArchiveReader(private) as reader:
        policy = reader.header["policy"]
    assert policy["keys"] == "events" and policy["tickets"] == "never"

    none = tmp_path / "none.spta"
    assert main(["import", str(all_channels), "-o", str(none), "--keys", "none"]) == 0
    assert not [r for r in archive_records(none) if r["name"] in ("key_down", "key_scancode")]


def test_import_show_stats_export_verify(
    tmp_path: Path, config_dir: Path, all_channels: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    archive = tmp_path / "s.spta.zst"
    assert main(["import", str(all_channels), "-o", str(archive), "--compress"]) == 0
    capsys.readouterr()
    assert main(["verify", str(archive)]) == 0
    assert "intact" in capsys.readouterr().out
    # show: the archive gives the same lines as the capture it came from
    assert main(["show", str(all_channels)]) == 0
    from_capture = capsys.readouterr().out.splitlines()
    assert main(["show", str(archive)]) == 0
    from_archive = capsys.readouterr().out.splitlines()
    assert from_archive == from_capture
    assert main(["stats", "--json", str(archive)]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["coverage"]["not_fully_dissected"] == 0
    assert set(stats["channels"]) >= {"main", "display", "inputs", "playback", "main/agent"}
    # export pcap, read it back: every wire unit is there again, in the same streams
    pcap = tmp_path / "out.pcapng"
    assert main(["export", "pcap", str(archive), "-o", str(pcap)]) == 0

    def units(path: Path) -> list[tuple[int, str, str | None, bytes]]:
        return sorted(
            (r.connection, r.direction, r.name, r.raw)
            for r in iter_capture(path)
            if r.kind in ("link", "message")
        )

    again, orig = units(pcap), units(all_channels)
    # the ticket was never archived: the export holds zeros of its length in its place
    assert [u for u in again if u[2] == "ticket"] == [
        (c, d, n, bytes(len(raw))) for c, d, n, raw in orig if n == "ticket"
    ]
    assert [u for u in again if u[2] != "ticket"] == [u for u in orig if u[2] != "ticket"]
    jsonl = tmp_path / "out.jsonl"
    assert main(["export", "json", str(archive), "-o", str(jsonl)]) == 0
    assert len(jsonl.read_text().splitlines()) == len(from_archive)
    # the listing's duration is the capture's span, not the time since it was captured
    times = [r.time for r in iter_capture(all_channels)]
    before = time.time()
    capsys.readouterr()
    assert main(["sessions", "--json", str(archive)]) == 0
    (listed,) = json.loads(capsys.readouterr().out)
    assert listed["end"]["seconds"] == pytest.approx(max(times) - min(times), abs=1e-3)
    with ArchiveReader(archive) as reader:
        for _record in reader.records():
            pass
        assert reader.end is not None and before - 600 < reader.end["imported"] <= before


def test_tampered_and_truncated_exit_codes(
    tmp_path: Path, config_dir: Path, all_channels: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    archive = tmp_path / "s.spta"
    assert main(["import", str(all_channels), "-o", str(archive)]) == 0
    data = bytearray(archive.read_bytes())
    cut = tmp_path / "cut.spta"
    cut.write_bytes(data[: len(data) // 2])
    data[len(data) // 3] ^= 1
    bad = tmp_path / "bad.spta"
    bad.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["verify", str(cut)]) == 1
    assert ": truncated: " in capsys.readouterr().out
    assert main(["verify", str(bad)]) == 3
    out = capsys.readouterr().out
    assert ": tampered: record " in out
    # a truncated archive still shows, with a warning
    assert main(["show", str(cut)]) == 0
    assert "warning" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["show"], ["stats"], ["verify"], ["export", "json"]])
def test_missing_and_foreign_files_are_one_line_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str], config_dir: Path
) -> None:
    extra = ["-o", str(tmp_path / "o")] if command[0] == "export" else []
    assert main([*command, str(tmp_path / "missing.spta"), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("spicetap: error: ") and "no such file" in err
    assert len(err.splitlines()) == 1


def test_bad_privacy_value(
    tmp_path: Path, all_channels: Path, config_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["import", str(all_channels), "-o", str(tmp_path / "x"), "--keys", "all"]) == 2
    assert "privacy.keys = 'all'" in capsys.readouterr().err


@pytest.mark.parametrize("switch", ["--keys", "--clipboard", "--files"])
@pytest.mark.parametrize("value", ["", " "])
def test_an_empty_privacy_value_is_refused_not_taken_as_the_default(
    tmp_path: Path,
    all_channels: Path,
    config_dir: Path,
    capsys: pytest.CaptureFixture[str],
    switch: str,
    value: str,
) -> None:
    out = tmp_path / "x.spta"
    assert main(["import", str(all_channels), "-o", str(out), switch, value]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"spicetap: error: privacy.{switch[2:]} = {value!r}: expected one of")
    assert len(err.splitlines()) == 1 and not out.exists()
