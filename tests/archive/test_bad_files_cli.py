"""Files the user names that the commands cannot use: one line each, and nothing destroyed."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import msgpack
import pytest

from spicetap.archive.reader import ArchiveReader
from spicetap.archive.writer import ArchiveWriter
from spicetap.capture import read_packets
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


INSPECT = [
    ["show"],
    ["show", "-V"],
    ["show", "--json"],
    ["stats"],
    ["stats", "--json"],
    ["export", "pcap"],
    ["export", "json"],
]


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
        (EXPORT, "in.pcapng/x.jsonl", "in.pcapng", "not a directory"),  # both make
        (IMPORT, "in.pcapng/x.spta", "in.pcapng", "not a directory"),  # missing dirs
        (EXPORT, "in.pcapng/d/x.jsonl", "in.pcapng/d", "Not a directory"),
        (IMPORT, "in.pcapng/d/x.spta", "in.pcapng/d", "Not a directory"),
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


@pytest.mark.parametrize(
    "command", [["import"], ["export", "json"], ["export", "pcap"]], ids=" ".join
)
def test_outputs_go_into_missing_directories_which_are_made(
    capture: Path, tmp_path: Path, command: list[str]
) -> None:
    out = tmp_path / "new" / "deeper" / "out"
    assert main([*command, str(capture), "-o", str(out)]) == 0
    assert out.stat().st_size > 1000
    assert [p.name for p in out.parent.iterdir()] == ["out"]


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
    assert one_error_line(capsys).endswith(": is a directory")


@pytest.mark.parametrize("command", [*INSPECT, ["import"], ["verify"]], ids=" ".join)
@pytest.mark.parametrize("kind", ["socket", "device"])
def test_a_socket_or_a_device_as_input_is_named_and_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str], kind: str
) -> None:
    """Pipes are read (tests/test_piped_input.py); these are not captures a user saves."""
    with socket.socket(socket.AF_UNIX) as sock:
        if kind == "socket":
            path = tmp_path / "sock"
            sock.bind(str(path))
        else:
            path = Path("/dev/zero")
        extra = ["-o", str(tmp_path / "out")] if command[0] in ("export", "import") else []
        assert main([*command, str(path), *extra]) == 2
    assert one_error_line(capsys) == (
        f"spicetap: error: {path}: is a {kind}, not a regular file or a pipe: save it to a "
        "file first"
    )


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


def run_inspector(command: list[str], archive: Path) -> int:
    extra = ["-o", str(archive.with_suffix(".out"))] if command[0] == "export" else []
    return main([*command, str(archive), *extra])


def archive_of(path: Path, records: list[dict[str, Any]], header: dict[str, Any]) -> Path:
    """A finished archive, its hash chain as valid as the writer makes it."""
    writer = ArchiveWriter(path, header)
    for rec in records:
        writer.write(rec)
    writer.close()
    return path


# An open record's view names the addresses; a message with empty raw keeps its stored view
# (nothing to decode again), so the renderers read the view as stored.
OPEN = {"kind": "open", "ch": [1, 0, 1], "dir": "c2s", "t": 0, "seq": 0, "session": 1,
        "view": {"client": "127.0.0.1:40000", "server": "127.0.0.1:5930"}}  # fmt: skip
MESSAGE = {**OPEN, "kind": "message", "seq": 1, "type": 1, "name": "ping", "raw": b"",
           "view": {"a": 1, "box": {"left": 1, "top": 2, "right": 3, "bottom": 4}}}  # fmt: skip


def deep(levels: int) -> dict[str, Any]:
    view: dict[str, Any] = {"x": 1}
    for _ in range(levels):
        view = {"x": view}
    return view


@pytest.mark.parametrize(
    ("field", "value", "named"),
    [
        ("view", "x", "view is str, not a map"),
        ("view", [1, 2], "view is list, not a map"),
        ("view", {"a": {1: 2}}, "view has a key that is int, not str"),
        ("view", {"a": [msgpack.ExtType(5, b"x")]}, "view holds ExtType"),
        ("view", deep(40), "view nests deeper than 32 levels"),
        ("name", 7, "name is int, not str or nil"),
        ("session", "abc", "session is str, not int or nil"),
        ("channel", 5, "channel is int, not str"),
        ("err", {"a": 1}, "err is dict, not str or nil"),
        ("type", "x", "type is str, not int or nil"),
        ("t", 2**64 - 1, "its time is 1.84467e+10 s since 1970, not within 584 years of it"),
        ("t", 1.5, "t is float, not int"),
        ("t", "5", "t is str, not int"),
        ("ch", [1, "0", 1], "ch's channel id is str, not int"),
        ("dir", "sideways", "dir is 'sideways', not 'c2s' or 's2c'"),
        ("kind", "bogus", "kind is 'bogus', not a record kind"),
        ("redacted", {"reason": "x", "len": 1 << 40}, "redacted is dict, not {reason, len}"),
    ],
)
@pytest.mark.parametrize("command", INSPECT, ids=" ".join)
def test_a_record_of_odd_types_under_a_valid_chain_is_skipped_with_a_warning(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    command: list[str],
    field: str,
    value: Any,
    named: str,
) -> None:
    odd = {**MESSAGE, "seq": 2, field: value}
    archive = archive_of(tmp_path / "odd.spta", [OPEN, MESSAGE, odd], {"started": 1.0})
    assert main(["verify", str(archive)]) == 0  # the chain holds: only the content is odd
    capsys.readouterr()
    assert run_inspector(command, archive) == 0
    err = capsys.readouterr().err.strip()
    assert err == f"spicetap: warning: {archive}: a malformed record was skipped ({named})"


def test_records_of_every_kind_and_the_widest_times_are_shown(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    kinds = ["open", "link", "message", "agent", "auth", "rewrite", "tls", "error", "gap", "close"]
    records = [{**MESSAGE, "kind": kind, "seq": i} for i, kind in enumerate(kinds)]
    records += [{**MESSAGE, "seq": 10, "t": -(10**18)}, {**MESSAGE, "seq": 11, "t": 10**19}]
    archive = archive_of(tmp_path / "all.spta", records, {"started": 1.0})
    assert main(["show", "--json", str(archive)]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert [json.loads(line)["kind"] for line in out.splitlines()] == [*kinds, *["message"] * 2]


@pytest.mark.parametrize("started", [1e300, float("nan"), -1e20, "yesterday", True])
@pytest.mark.parametrize("command", INSPECT, ids=" ".join)
def test_a_header_start_that_is_no_time_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str], started: Any
) -> None:
    archive = archive_of(tmp_path / "odd.spta", [OPEN, MESSAGE], {"started": started})
    assert run_inspector(command, archive) == 2
    assert "damaged archive header (started " in one_error_line(capsys)


NOT_IP = "is not an IP address and port"
SERVER = ("server", NOT_IP)


@pytest.mark.parametrize(
    ("client", "server", "written", "replaced"),
    [
        ("127.0.0.1:40000", "localhost:5976", ("127.0.0.1", "127.0.0.1", 5930), [SERVER]),
        ("127.0.0.1:40000", "300.1.1.1:99999", ("127.0.0.1", "127.0.0.1", 5930), [SERVER]),
        ("127.0.0.1:40000", "10.0.0.1:0", ("127.0.0.1", "127.0.0.1", 5930), [SERVER]),
        ("viewer.example:1", "[::1]:5976", ("::1", "::1", 5976), [("client", NOT_IP)]),
        ("[::1]:40000", "[::2]:5976", ("::1", "::2", 5976), []),
        (
            "[::1]:40000",
            "10.0.0.1:5976",
            ("::1", "::1", 5930),
            [("server", "is not of its client's IP version")],
        ),
    ],
)
def test_export_pcap_writes_a_stand_in_for_an_address_that_is_not_an_ip(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    client: str,
    server: str,
    written: tuple[str, str, int],
    replaced: list[tuple[str, str]],
) -> None:
    opened = {**OPEN, "view": {"client": client, "server": server}}
    link = {**MESSAGE, "kind": "link", "raw": b"REDQ", "seq": 1}
    archive = archive_of(tmp_path / "a.spta", [opened, link], {"started": 1.0})
    out = tmp_path / "a.pcapng"
    assert main(["export", "pcap", str(archive), "-o", str(out)]) == 0
    texts = {"client": client, "server": server}
    assert capsys.readouterr().err.splitlines() == [
        f"spicetap: warning: {archive}: connection 1: {side} {texts[side]!r} {why}; "
        f"exported as {written[side == 'server']}:{written[2] if side == 'server' else 49152}"
        for side, why in replaced
    ]
    with read_packets(out) as reader:
        segments = list(reader)
    data = [s for s in segments if s.payload]
    assert [(s.src, s.dst, s.dport) for s in data] == [written]


@pytest.mark.parametrize("name", ["a\nb", "a\rb", "a\x1b[31mb", "a\u2028b", "a\udcffb"])
def test_a_path_with_control_characters_stays_on_its_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    """Errors, warnings and verdicts name it escaped, as repr() would."""
    shown = repr(name)[1:-1]
    missing = tmp_path / name
    assert main(["show", str(missing)]) == 2
    assert one_error_line(capsys) == f"spicetap: error: {tmp_path}/{shown}: no such file"
    archive = archive_of(tmp_path / f"{name}.spta", [OPEN, MESSAGE], {"started": 1.0})
    archive.write_bytes(archive.read_bytes()[:-5])
    assert main(["show", str(archive)]) == 0
    err = capsys.readouterr().err
    assert err.startswith(f"spicetap: warning: {tmp_path}/{shown}.spta: truncated at byte ")
    assert len(err.splitlines()) == 1
    assert main(["verify", str(archive)]) == 1
    out = capsys.readouterr().out
    assert out.startswith(f"{tmp_path}/{shown}.spta: truncated: ") and out.count("\n") == 1


def test_show_json_stays_strict_json_whatever_a_stored_view_holds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """msgpack carries NaN and infinities; JSON has neither, and strict parsers (jq,
    browsers) refuse the bare NaN json.dumps writes by default."""
    odd = {**MESSAGE, "seq": 2, "view": {"a": float("nan"), "b": [float("-inf")]}}
    archive = archive_of(tmp_path / "nan.spta", [OPEN, odd], {"started": 1.0})
    capsys.readouterr()
    assert main(["show", "--json", str(archive)]) == 0
    lines = capsys.readouterr().out.splitlines()
    last = json.loads(lines[-1], parse_constant=lambda c: pytest.fail(f"bare {c}"))
    assert last["fields"] == {"a": "nan", "b": ["-inf"]}
