"""Files the user names that the commands cannot use: one line each, and nothing destroyed."""

from __future__ import annotations

from pathlib import Path

import pytest

from spicetap.archive.reader import ArchiveReader
from spicetap.archive.writer import ArchiveWriter
from spicetap.cli import main


@pytest.fixture(autouse=True)
def config_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cfg = tmp_path / "config"
    monkeypatch.setenv("SPICETAP_CONFIG_DIR", str(cfg))
    return cfg


@pytest.fixture
def capture(lab_captures: list[Path], tmp_path: Path) -> Path:
    src = next(p for p in lab_captures if p.name.startswith("plain-linux-all-channels"))
    copy = tmp_path / "in.pcapng"
    copy.write_bytes(src.read_bytes())
    return copy


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("spicetap: error: "), err
    return err


@pytest.mark.parametrize("command", [["import"], ["export", "json"], ["export", "pcap"]])
def test_the_input_as_output_is_refused_and_kept(
    capture: Path, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    before = capture.read_bytes()
    assert main([*command, str(capture), "-o", str(capture)]) == 2
    assert "is the input too" in one_error_line(capsys)
    assert capture.read_bytes() == before


def test_a_failed_export_leaves_the_earlier_output_as_it_was(
    capture: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out.jsonl"
    out.write_text("an earlier export\n")
    # the filter is compiled once records are read, after the output was opened
    assert main(["export", "json", str(capture), "-o", str(out), "-f", "bogus"]) == 2
    one_error_line(capsys)
    assert out.read_text() == "an earlier export\n"
    assert [p.name for p in tmp_path.iterdir() if "partial" in p.name] == []
    assert main(["export", "json", str(capture), "-o", str(out)]) == 0
    assert out.read_text().count("\n") > 1000


IMPORT, EXPORT = ["import"], ["export", "json"]


@pytest.mark.parametrize(
    ("command", "output", "named", "reason"),
    [
        (EXPORT, "missing-dir/x.jsonl", "missing-dir/x.jsonl", "No such file or directory"),
        (EXPORT, "in.pcapng/x.jsonl", "in.pcapng/x.jsonl", "Not a directory"),
        (IMPORT, "in.pcapng/x.spta", "in.pcapng", "File exists"),  # it makes missing dirs
        (EXPORT, ".", ".", "is a directory"),
        (IMPORT, ".", ".", "is a directory"),
        (EXPORT, "x" * 300, "x" * 300, "File name too long"),
        (IMPORT, "x" * 300, "x" * 300, "File name too long"),
        (EXPORT, "/dev/full", "/dev/full", "No space left on device"),
        (IMPORT, "/dev/full", "/dev/full", "No space left on device"),
    ],
)
def test_unusable_outputs_are_one_line_errors(
    capture: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    command: list[str],
    output: str,
    named: str,
    reason: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main([*command, str(capture), "-o", output]) == 2
    assert one_error_line(capsys) == f"spicetap: error: {named}: {reason}" + (
        "; give a file name" if reason == "is a directory" else ""
    )


def test_unusable_inputs_are_one_line_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["show", "y" * 300]) == 2
    assert "File name too long" in one_error_line(capsys)


def forged_archive(path: Path) -> None:
    """A well-signed archive whose records have fields of the wrong types: what a damaged
    file that still parses as msgpack, or a forged one, gives a reader."""
    writer = ArchiveWriter(path, {"started": 1.0})
    good = {"kind": "message", "ch": [1, 0, 1], "dir": "s2c", "t": 5, "raw": b"", "seq": 0}
    writer.write(good)
    writer.write({**good, "ch": {"a": 1}})
    writer.write({**good, "t": "soon"})
    writer.write({**good, "raw": 5})  # bytes(5) would be five zero bytes
    writer.write({**good, "ch": [1, 0]})
    writer.write({**good, "kind": "agent", "raw": b"\x00" * 30, "hdr": 6, "type": 1})
    writer.write(good)
    writer.close()


@pytest.mark.parametrize("command", [["show"], ["stats"], ["export", "json"]])
def test_malformed_records_are_skipped_with_a_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    archive = tmp_path / "forged.spta"
    forged_archive(archive)
    with ArchiveReader(archive) as reader:
        assert len(list(reader.records())) == 7
    extra = ["-o", str(tmp_path / "o.jsonl")] if command[0] == "export" else []
    assert main([*command, str(archive), *extra]) == 0
    err = capsys.readouterr().err
    assert err.count("a malformed record was skipped") == 4, err
    if command[0] == "export":
        assert len((tmp_path / "o.jsonl").read_text().splitlines()) == 3


def test_a_capture_time_out_of_range_is_imported_with_a_warning(
    capture: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Damaged timestamps centuries away: msgpack cannot hold such an offset in nanoseconds,
    yet every record is kept."""
    assert main(["import", str(capture), "-o", str(tmp_path / "good.spta")]) == 0
    counted = capsys.readouterr().out
    data = bytearray(capture.read_bytes())
    pos, blocks = 0, []
    while pos + 8 <= len(data):  # pcapng blocks: type u32, total length u32 (little-endian)
        btype = int.from_bytes(data[pos : pos + 4], "little")
        if btype == 6:  # an Enhanced Packet Block: interface u32, then the timestamp's high
            blocks.append(pos)
        pos += int.from_bytes(data[pos + 4 : pos + 8], "little")
    for block in blocks[len(blocks) // 2 :]:
        data[block + 12 : block + 16] = b"\xff\xff\xff\xff"
    damaged = tmp_path / "damaged.pcapng"
    damaged.write_bytes(bytes(data))
    assert main(["import", str(damaged), "-o", str(tmp_path / "d.spta")]) == 0
    out, err = capsys.readouterr()
    assert err.count("time is centuries from the first one") == 1, err
    assert out.split(":")[1] == counted.split(":")[1]  # " N records, sessions [...]"
    assert main(["verify", str(tmp_path / "d.spta")]) == 0


def test_verify_names_what_is_not_an_archive(
    capture: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["verify", str(capture)]) == 2  # not "tampered": it never was an archive
    assert one_error_line(capsys).endswith("in.pcapng: not a spicetap archive")
    assert main(["verify", str(tmp_path)]) == 2
    assert one_error_line(capsys).endswith(": not a file")


def test_show_names_both_kinds_it_reads(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("root:x:0:0\n")
    assert main(["show", str(text)]) == 2
    assert "neither a spicetap archive nor a pcap or pcapng capture" in one_error_line(capsys)


def test_packets_of_an_unread_link_type_are_reported(
    capture: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = bytearray(capture.read_bytes())
    pos = 0
    while pos + 8 <= len(data):  # each Interface Description Block (type 1): link type u16
        if int.from_bytes(data[pos : pos + 4], "little") == 1:
            data[pos + 8 : pos + 10] = (999).to_bytes(2, "little")
        pos += int.from_bytes(data[pos + 4 : pos + 8], "little")
    capture.write_bytes(bytes(data))
    assert main(["show", str(capture)]) == 0
    out, err = capsys.readouterr()
    assert out == ""
    assert "packets of link type 999 were skipped (not read)" in err
