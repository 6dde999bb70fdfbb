"""Inspector commands reading a pipe: `-` (standard input) and named pipes, through real
pipes into a real `spicetap` process. A capture is shown as it comes; an archive is copied
and read as a file would be; Ctrl-C ends the input, not the command."""

from __future__ import annotations

import gzip
import json
import os
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest

from spicetap.archive.reader import ArchiveReader
from spicetap.capture.piped import INTERRUPT_GRACE
from tests.capture.builders import stream_frames, write_pcap
from tests.harness.procs import OutputLines
from tests.proxy.test_framing import OK, TICKET, caps_word, link_mess, link_reply, mini
from tests.proxy.test_recording import init

SPICETAP = [sys.executable, "-m", "spicetap"]
PING = 4  # SPICE_MSG_PING: id u32, timestamp u64
PINGS = 40
LIMIT = 30.0  # seconds any one command may take


def _ping(i: int) -> bytes:
    return mini(PING, struct.pack("<IQ", i, i * 1000))


@pytest.fixture(scope="module")
def capture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A main channel: link stage, INIT, PINGS pings."""
    bits = caps_word(1, 3)
    chunks = [(True, link_mess(bits, channel_type=1, conn=0)), (False, link_reply(bits))]
    chunks += [(True, TICKET), (False, OK), (False, init(0x77))]
    chunks += [(False, _ping(i)) for i in range(PINGS)]
    path = tmp_path_factory.mktemp("piped") / "main.pcap"
    return write_pcap(path, stream_frames(chunks))


def run(argv: Sequence[str], stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [*SPICETAP, *argv], input=stdin, capture_output=True, timeout=LIMIT, check=False
    )
    return subprocess.CompletedProcess(
        result.args, result.returncode, result.stdout.decode(), result.stderr.decode()
    )


def test_a_capture_on_standard_input_shows_as_the_file_does(capture: Path) -> None:
    from_file = run(["show", str(capture)])
    assert from_file.returncode == 0 and from_file.stdout.count("ping") == PINGS
    piped = run(["show", "-"], capture.read_bytes())
    assert (piped.returncode, piped.stdout, piped.stderr) == (0, from_file.stdout, "")
    zipped = run(["show", "--json", "-"], gzip.compress(capture.read_bytes()))
    assert zipped.stdout == run(["show", "--json", str(capture)]).stdout


def test_a_named_pipe_is_read_as_it_is_written(capture: Path, tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    writer = threading.Thread(target=fifo.write_bytes, args=(capture.read_bytes(),))
    writer.start()
    piped = run(["stats", "--json", str(fifo)])
    writer.join(LIMIT)
    assert piped.returncode == 0, piped.stderr
    assert json.loads(piped.stdout) == json.loads(run(["stats", "--json", str(capture)]).stdout)


def test_an_archive_on_standard_input_is_read_and_verified(
    capture: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SPICETAP_CONFIG_DIR", str(tmp_path / "config"))
    archive = tmp_path / "main.spta"
    imported = subprocess.run(
        [*SPICETAP, "import", "-", "-o", str(archive)],
        input=capture.read_bytes(), capture_output=True, timeout=LIMIT, check=False,
    )  # fmt: skip
    assert imported.returncode == 0, imported.stderr
    with ArchiveReader(archive) as reader:
        assert reader.header["session"]["source"] == "standard input"
        assert sum(1 for r in reader.records() if r.get("name") == "ping") == PINGS
    data = archive.read_bytes()
    shown = run(["show", "-"], data)
    assert shown.returncode == 0 and shown.stdout == run(["show", str(archive)]).stdout
    verdict = run(["verify", "-"], data)
    assert verdict.returncode == 0
    assert verdict.stdout.startswith("standard input: intact: ")
    cut = run(["verify", "-"], data[: len(data) // 2])
    assert cut.returncode != 0 and cut.stdout.startswith("standard input: truncated: ")
    assert str(tmp_path) not in cut.stdout + cut.stderr  # the copy's name is never shown
    not_one = run(["verify", "-"], capture.read_bytes())
    assert (not_one.returncode, not_one.stderr.strip()) == (
        2, "spicetap: error: standard input: not a spicetap archive"
    )  # fmt: skip


def _spicetap(argv: Sequence[str]) -> subprocess.Popen[bytes]:
    # its output buffered as a user's is when it goes into a pipe (some CI sets this)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    return subprocess.Popen(
        [*SPICETAP, *argv],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )  # fmt: skip


@contextmanager
def _killed(proc: subprocess.Popen[bytes]) -> Iterator[None]:
    """The process is ended (by its PID) if the test fails while it runs."""
    try:
        yield
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_records_show_while_the_writer_still_writes(capture: Path) -> None:
    """Into a pipe too (stdout is one here): each message is printed as it comes."""
    data = capture.read_bytes()
    with _spicetap(["show", "-"]) as proc, _killed(proc):
        assert proc.stdin is not None
        lines = OutputLines(proc, LIMIT)
        half = len(data) // 2  # the link stage, INIT and some pings
        proc.stdin.write(data[:half])
        proc.stdin.flush()
        lines.until("init")
        assert proc.poll() is None  # still reading: the rest has not come
        proc.stdin.write(data[half:])
        proc.stdin.close()
        assert proc.wait(LIMIT) == 0


def test_ctrl_c_ends_the_input_and_the_command_finishes_with_what_came(capture: Path) -> None:
    """A writer that goes on after Ctrl-C (a named pipe's, elsewhere) is left after the
    grace; what came is all shown, and the end says why it stopped. A second Ctrl-C quits
    at once."""
    data = capture.read_bytes()
    for second in (False, True):
        with _spicetap(["show", "-"]) as proc, _killed(proc):
            assert proc.stdin is not None and proc.stderr is not None
            lines = OutputLines(proc, LIMIT)
            proc.stdin.write(data)  # all of it, but the pipe is never closed
            proc.stdin.flush()
            lines.until("init")  # reading, its Ctrl-C handling in place
            proc.send_signal(signal.SIGINT)
            if second:
                time.sleep(0.1)
                proc.send_signal(signal.SIGINT)
                assert proc.wait(INTERRUPT_GRACE / 2) == 130
                continue
            started = time.monotonic()
            assert proc.wait(LIMIT) == 0
            assert time.monotonic() - started >= INTERRUPT_GRACE * 0.9
            lines.rest()
            assert sum("ping" in line for line in lines.seen) == PINGS
            warning = "standard input: read until Ctrl-C (its writer had not ended it)"
            assert warning in proc.stderr.read().decode()


def test_ctrl_c_then_the_writer_ending_finishes_at_once(capture: Path) -> None:
    """In a terminal's pipeline Ctrl-C reaches the writer too, which writes its last
    packets and closes the pipe: they are read and shown, and nothing is said missing."""
    data = capture.read_bytes()
    half = len(data) // 2
    with _spicetap(["show", "-"]) as proc, _killed(proc):
        assert proc.stdin is not None and proc.stderr is not None
        lines = OutputLines(proc, LIMIT)
        proc.stdin.write(data[:half])
        proc.stdin.flush()
        lines.until("init")
        proc.send_signal(signal.SIGINT)
        time.sleep(0.1)
        proc.stdin.write(data[half:])
        proc.stdin.close()
        assert proc.wait(INTERRUPT_GRACE + LIMIT) == 0
        lines.rest()
        assert lines.text() == run(["show", str(capture)]).stdout
        assert proc.stderr.read() == b""


def test_a_terminal_on_standard_input_is_refused() -> None:
    main_end, tty_end = os.openpty()
    try:
        result = subprocess.run(
            [*SPICETAP, "show", "-"], stdin=tty_end, capture_output=True, timeout=LIMIT,
            check=False,
        )  # fmt: skip
    finally:
        os.close(main_end)
        os.close(tty_end)
    assert result.returncode == 2
    assert result.stderr.decode().strip() == (
        "spicetap: error: standard input is a terminal: pipe a capture or an archive in "
        "(tcpdump -U -w - port 5900 | spicetap show -)"
    )
