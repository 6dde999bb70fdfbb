"""The recording process and the proxy's handle on it: a real child process, fed as the
pump threads feed it; the backlog bound and policy; a recording process that dies; a proxy
that vanishes (its archives still end signed)."""

from __future__ import annotations

import mmap
import os
import random
import signal
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bench.spice_peers import init_message
from dissectors.api import encode
from proxy.core import recwire
from proxy.core.framing import DEFAULT_MAX_MESSAGE
from proxy.io.recording import MIN_RING, Recorder, RecordingSink
from proxy.recorder import UNLINKED, RecorderWorker, RecordingOptions
from spicetap.archive.privacy import PrivacyPolicy
from spicetap.archive.reader import ArchiveReader
from spicetap.archive.verify import verify
from spicetap.inputs import iter_records
from tests.proxy.test_framing import OK, TICKET, caps_word, link_mess, link_reply, mini
from tests.proxy.test_ring import racing

MAIN = 1
SESSION_ID = 0x5EC7


def init(session_id: int = SESSION_ID) -> bytes:
    return init_message(session_id)  # a main channel's INIT, as the benchmark's server sends


def main_link(session_id: int = SESSION_ID) -> list[tuple[float, str, bytes]]:
    """A main channel's bytes up to its INIT, with times."""
    bits = caps_word(1, 3)
    return [
        (0.1, "c2s", link_mess(bits, channel_type=MAIN, conn=0)),
        (0.1, "s2c", link_reply(bits)),
        (0.2, "c2s", TICKET),
        (0.2, "s2c", OK),
        (0.3, "s2c", init(session_id)),
    ]


def main_channel(rec: RecordingSink, conn: int = 0, pings: int = 3) -> None:
    """A main channel as the pumps report it: link stage, INIT, a few unknown-to-us bytes."""
    rec.opened(conn, 0.0, ("127.0.0.1", 40000 + conn), ("127.0.0.1", 5900))
    for t, direction, data in main_link():
        rec.data(conn, t, direction, data)
    for i in range(pings):
        rec.data(conn, 0.4 + i, "s2c", mini(4, bytes(8)))  # PING: id, timestamp... short


def wait_for(check: object, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.mark.parametrize("chain_hash", ["blake3", "sha256"])
def test_a_session_is_recorded_by_the_process_and_signed(tmp_path: Path, chain_hash: str) -> None:
    key = Ed25519PrivateKey.generate()
    rec = Recorder(RecordingOptions(tmp_path, chain_hash=chain_hash), {"viewer": None}, key)
    rec.start()
    assert rec.process is not None and rec.process.pid != os.getpid()
    main_channel(rec)
    wait_for(lambda: rec.conn_session.get(0) == SESSION_ID)  # learnt back from the process
    rec.closed(0, 9.0, "viewer closed")
    wait_for(lambda: 0 not in rec.conn_session)  # forgotten once the connection is recorded closed
    rec.stop()
    assert rec.process.returncode == 0
    (archive,) = rec.archives
    assert f"{SESSION_ID:08x}" in archive.name
    with ArchiveReader(archive) as r:
        records = list(r.records())
        assert r.end is not None and r.end["status"] == "complete"
        assert r.header["chain_hash"] == chain_hash  # the option reached the process
    assert [x for x in records if x.get("name") == "init"]
    assert verify(archive, key.public_key()).status == "intact"


def test_the_backlog_is_bounded_in_bytes_and_marked_as_a_gap(tmp_path: Path) -> None:
    rec = Recorder(RecordingOptions(tmp_path, max_backlog=2, backlog="gap"), {}, None)
    # not started: nothing ships, so the backlog fills up
    assert rec.data(0, 0.0, "c2s", b"a")
    assert rec.data(0, 0.0, "c2s", b"b")
    assert rec.backlog_bytes == 2
    assert rec.data(0, 0.0, "c2s", b"ccc")  # not queued, but forwarding goes on
    assert rec.lost[(0, "c2s")] == 3 and rec.lost_total == 3
    before = rec.backlog_items
    rec.error(0, 0.5, "c2s", "test error")  # control items never wait and are never dropped
    assert rec.backlog_items == before + 1
    closing = Recorder(RecordingOptions(tmp_path, max_backlog=1, backlog="close"), {}, None)
    assert closing.data(0, 0.0, "c2s", b"a")
    assert not closing.data(0, 0.0, "c2s", b"b")  # the policy says: close the session
    rec.start()
    wait_for(lambda: rec.backlog_bytes == 0)  # shipped: room again
    rec.data(0, 1.0, "c2s", b"d")
    rec.closed(0, 2.0, "viewer closed")
    rec.stop()
    assert rec.lost[(0, "c2s")] == 0
    (archive,) = rec.archives
    recs = list(iter_records(archive, []))
    assert [r.error for r in recs if r.kind == "gap"] == [
        "3 bytes missing from the recording (backlog)"
    ]
    assert [r.error for r in recs if r.kind == "error" and r.error == "test error"]


def test_a_recording_process_that_dies_stops_recording_not_forwarding(tmp_path: Path) -> None:
    rec = Recorder(RecordingOptions(tmp_path), {}, None)
    rec.start()
    assert rec.process is not None
    main_channel(rec)
    wait_for(lambda: rec.archives)
    os.kill(rec.process.pid, signal.SIGKILL)  # our own child, by its PID
    wait_for(lambda: rec.failed is not None)
    assert "exited" in (rec.failed or "") or "gone" in (rec.failed or "")
    for i in range(100):  # forwarding goes on: nothing raises, nothing piles up
        assert rec.data(0, 5.0 + i, "s2c", b"x" * 1000)
    assert rec.backlog_items == 0 and rec.backlog_bytes == 0
    rec.stop()  # returns: nothing left to wait for


def test_a_stop_the_process_obeys_at_once_is_no_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The recording process may handle the stop item, close its archives and exit before
    stop() goes on from putting it there: the end it reads then is the stop, not a crash
    ("the recording process exited (status 0)" was logged at one stop in the proxy)."""
    rec = Recorder(RecordingOptions(tmp_path), {}, None)
    rec.start()
    main_channel(rec)
    wait_for(lambda: rec.archives)
    put = rec._put

    def put_then_wait_for_the_end(item: tuple[object, ...]) -> None:
        put(item)
        if item[0] == "stop":  # the slowest stop(): the process's end read meanwhile
            rec._reader.join(10)
            assert not rec._reader.is_alive()

    monkeypatch.setattr(rec, "_put", put_then_wait_for_the_end)
    rec.stop()
    assert rec.failed is None
    assert rec.process is not None and rec.process.returncode == 0
    assert "recording process exited" not in caplog.text


def test_with_the_close_policy_no_session_goes_on_unrecorded(tmp_path: Path) -> None:
    rec = Recorder(RecordingOptions(tmp_path, backlog="close"), {}, None)
    rec.start()
    assert rec.process is not None
    main_channel(rec)
    assert rec.data(0, 4.0, "s2c", b"x")
    os.kill(rec.process.pid, signal.SIGKILL)
    wait_for(lambda: rec.failed is not None)
    assert not rec.data(0, 5.0, "s2c", b"x")  # the channel is to be closed
    assert not rec.data(7, 5.0, "c2s", b"y")  # and so is any new one
    rec.stop()


def test_a_disk_error_in_the_recording_process_is_reported_not_fatal(tmp_path: Path) -> None:
    where = tmp_path / "archives"
    rec = Recorder(RecordingOptions(where), {}, None)
    rec.start()
    assert rec.process is not None
    where.rmdir()
    where.write_text("not a directory any more")  # the first archive cannot be created
    main_channel(rec)
    wait_for(lambda: rec.failed is not None)
    assert "FileExistsError" in (rec.failed or "") and str(where) in (rec.failed or "")
    assert rec.process.wait(10) == 1  # it said why, then ended
    assert rec.data(0, 9.0, "s2c", b"x" * 100)  # forwarding goes on
    assert rec.archives == []
    rec.stop()


def test_when_the_proxy_vanishes_the_archives_still_end_signed(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    rec = Recorder(RecordingOptions(tmp_path), {}, key)
    rec.start()
    assert rec.process is not None and rec._sock is not None
    main_channel(rec)
    wait_for(lambda: rec.archives)
    wait_for(lambda: rec.backlog_bytes == 0 and not rec.backlog_items)
    # what the recording process sees when the proxy is SIGKILLed: end-of-file, no stop
    rec._stopping = True
    rec._sock.shutdown(2)
    assert rec.process.wait(10) == 0
    rec._sock.close()
    (archive,) = rec.archives
    with ArchiveReader(archive) as r:
        list(r.records())
        assert r.end is not None and r.end["status"] == "proxy vanished"
    assert verify(archive, key.public_key()).status == "intact"


def test_a_proxy_gone_before_its_items_are_recorded_loses_none_of_them(tmp_path: Path) -> None:
    """The proxy died (SIGKILL, or a second Ctrl-C) with items in the ring: the recording
    process's first report then fails. It once took that for a disk error: each
    connection's records then went to a new empty archive of their own, and were lost."""
    key = Ed25519PrivateKey.generate()
    rec = Recorder(RecordingOptions(tmp_path), {}, key)
    rec.start()
    assert rec.process is not None and rec._sock is not None
    os.kill(rec.process.pid, signal.SIGSTOP)  # our own child, by its PID
    try:
        main_channel(rec)
        header = link_mess(caps_word(1, 3), channel_type=2)[:16]
        for conn in range(1, 6):  # viewers stalled mid-link: records wait for the link
            rec.opened(conn, 0.5, ("127.0.0.1", 41000 + conn), ("127.0.0.1", 5900))
            rec.data(conn, 0.6, "c2s", header)
        wait_for(lambda: rec.backlog_items == 0)  # all of it in the ring
        rec._stopping = True
        rec._sock.shutdown(2)  # the proxy's end is gone: reports fail with EPIPE
    finally:
        os.kill(rec.process.pid, signal.SIGCONT)
    assert rec.process.wait(10) == 0
    rec._sock.close()
    archives = sorted(tmp_path.glob("*.spta"))
    assert [a.name.rsplit("-", 1)[1] for a in archives] == [f"{SESSION_ID:08x}.spta",
                                                            "unlinked.spta"]  # fmt: skip
    for archive in archives:
        assert verify(archive, key.public_key()).status == "intact"
        with ArchiveReader(archive) as r:
            recs = list(r.records())
            assert r.end is not None and r.end["status"] == "proxy vanished"
        if archive.name.endswith("unlinked.spta"):
            assert sorted(rec["ch"][2] for rec in recs if rec["kind"] == "open") == [1, 2, 3, 4, 5]
        else:
            assert [rec["name"] for rec in recs if rec["kind"] == "message"] == [
                "init", "ping", "ping", "ping"
            ]  # fmt: skip


def test_archives_of_one_second_and_label_are_numbered_in_turn(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("proxy.recorder.time.strftime", lambda *_a: "20261122-101010")
    worker = RecorderWorker(RecordingOptions(tmp_path), {}, None)
    for conn in range(3):  # a session id seen again in the same second (a server restart)
        main_channel_worker(worker, conn)
        worker.handle(("close", conn, 2.0, "viewer closed"))
    assert {p.name for p in tmp_path.iterdir()} == {
        f"20261122-101010-{SESSION_ID:08x}{n}.spta" for n in ("", "-2", "-3")
    }


def test_the_recording_process_yields_the_cpu_to_forwarding(tmp_path: Path) -> None:
    rec = Recorder(RecordingOptions(tmp_path, nice=7), {}, None)
    rec.start()
    assert rec.process is not None
    main_channel(rec)
    wait_for(lambda: rec.archives)  # the settings item has been applied
    fields = Path(f"/proc/{rec.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
    # after "pid (comm)": field 19 of stat(5) is nice, field 41 the scheduling policy
    nice, policy = int(fields[16]), int(fields[38])
    assert nice == os.nice(0) + 7
    assert policy == os.SCHED_BATCH
    rec.stop()


def test_a_recording_process_ignores_the_terminals_interrupt(tmp_path: Path) -> None:
    rec = Recorder(RecordingOptions(tmp_path), {}, None)
    rec.start()
    assert rec.process is not None
    main_channel(rec)
    wait_for(lambda: rec.archives)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # the proxy drains, then says stop
        os.kill(rec.process.pid, sig)
    time.sleep(0.3)
    assert rec.process.poll() is None and rec.failed is None
    rec.closed(0, 9.0, "viewer closed")
    rec.stop()
    with ArchiveReader(rec.archives[0]) as r:
        list(r.records())
        assert r.end is not None and r.end["status"] == "complete"


# -- the reports' byte format ------------------------------------------------------------------
def test_reports_survive_any_split() -> None:
    reports = [("session", 3, 77), ("archive", "/x/y.spta"), ("gone", 3)]
    stream = b"".join(recwire.control(r) for r in reports)  # framed as control items
    for step in (1, 2, 5, 64):
        parser = recwire.ItemParser(64 * 1024)
        got: list[tuple[object, ...]] = []
        for pos in range(0, len(stream), step):
            piece = stream[pos : pos + step]
            with parser.space(len(piece)) as room:
                room[: len(piece)] = piece
            parser.received(len(piece))
            got.extend(parser.items())
        assert got == reports


def test_a_foreign_byte_stream_is_a_wire_error() -> None:
    parser = recwire.ItemParser()
    junk = b"Xjunk-junk"
    with parser.space() as room:
        room[: len(junk)] = junk
    parser.received(len(junk))
    with pytest.raises(recwire.WireError, match="unknown item tag"):
        list(parser.items())


def test_every_byte_arrives_in_order_when_the_ring_overflows_into_spill(tmp_path: Path) -> None:
    """A small ring and a fast producer: items go to spill while the ring is full, and
    later ones wait behind them; the archive holds the stream as it was fed."""
    rec = Recorder(RecordingOptions(tmp_path, nice=0), {}, None, ring_capacity=MIN_RING)
    rec.start()
    main_channel(rec, pings=0)
    rng = random.Random(3)
    fed = bytearray()
    spilled = 0
    for i in range(600):  # about 60 MiB of PINGs, body sizes at random
        body = rng.randbytes(rng.randrange(8, 200_000))
        chunk = mini(4, body)
        assert rec.data(0, 1.0 + i, "s2c", chunk)
        fed += chunk
        spilled = max(spilled, rec.backlog_items)
    huge = mini(4, rng.randbytes(3 * (1 << 20)))  # bigger than MAX_CHUNK: goes in pieces
    assert rec.data(0, 700.0, "s2c", huge)
    fed += huge
    rec.closed(0, 800.0, "viewer closed")
    rec.stop()
    assert spilled > 0, "the ring never filled: the test did not test spill"
    (archive,) = rec.archives
    got = bytearray()
    names = []
    for r in iter_records(archive, []):
        if r.kind == "message" and r.direction == "s2c" and r.name != "init":
            got += r.raw
            names.append(r.name)
    assert set(names) == {"ping"}
    assert got == fed


def burst_while_stopped(
    rec: Recorder, until: int, chunk: Callable[[int], bytes], then: Callable[[], None]
) -> bytearray:
    """PINGs of `until` bytes in all, the recording process stopped (SIGSTOP) meanwhile;
    then() looks at the Recorder before it goes on."""
    assert rec.process is not None
    fed = bytearray()
    os.kill(rec.process.pid, signal.SIGSTOP)
    try:
        while len(fed) < until:
            piece = mini(4, chunk(len(fed)))
            assert rec.data(0, 1.0 + len(fed), "s2c", piece)
            fed += piece
        then()
    finally:
        os.kill(rec.process.pid, signal.SIGCONT)
    return fed


def trickle_until(rec: Recorder, fed: bytearray, done: Callable[[], bool], what: str) -> None:
    """Small PINGs every 50 ms (the producer goes back to the ring's hot part) until done()."""
    deadline = time.monotonic() + 30
    while not done():
        assert time.monotonic() < deadline, what
        piece = mini(4, b"small")
        assert rec.data(0, 2e8 + len(fed), "s2c", piece)
        fed += piece
        time.sleep(0.05)


def archived_pings(rec: Recorder) -> bytes:
    rec.closed(0, 3e8, "viewer closed")
    rec.stop()
    (archive,) = rec.archives
    return b"".join(
        r.raw for r in iter_records(archive, [])
        if r.kind == "message" and r.direction == "s2c" and r.name == "ping"
    )  # fmt: skip


def test_the_ring_grows_for_a_burst_and_gives_the_memory_back_after(tmp_path: Path) -> None:
    """The recording process stopped while 10 MiB come: the elastic ring holds them all
    past its hot part, nothing spills. Once it has caught up and the cold part has been
    unused for cold_keep seconds, those pages are given back (they read as zeros). The
    archive holds every byte in order."""
    ring_hot = 2 << 20
    rec = Recorder(
        RecordingOptions(tmp_path, nice=0), {}, None,
        ring_capacity=16 << 20, ring_hot=ring_hot, cold_keep=0.3,
    )  # fmt: skip
    rec.start()
    assert rec.ring.hot == ring_hot
    main_channel(rec, pings=0)
    rng = random.Random(5)
    cold = rec.ring._data[ring_hot + mmap.PAGESIZE :]

    def grown() -> None:
        assert rec.backlog_items == 0, "spilled: the ring did not grow"
        assert rec.ring.cold_puts > 0 and any(cold)

    fed = burst_while_stopped(
        rec, 10 << 20, lambda _n: rng.randbytes(rng.randrange(8, 200_000)), grown
    )
    trickle_until(rec, fed, lambda: not any(cold), "the cold part was never given back")
    cold.release()
    assert archived_pings(rec) == fed


def test_memory_that_cannot_be_given_back_is_kept_and_recording_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A kernel refusing MADV_REMOVE must not end the shipper thread: it says so once,
    keeps the memory, and items waiting in spill still reach the archive."""
    rec = Recorder(
        RecordingOptions(tmp_path, nice=0), {}, None,
        ring_capacity=8 << 20, ring_hot=1 << 20, cold_keep=0.0,
    )  # fmt: skip
    tries: list[int] = []

    def refuse() -> None:
        tries.append(1)
        raise OSError(22, "Invalid argument")

    monkeypatch.setattr(rec.ring, "release_cold", refuse)
    rec.start()
    main_channel(rec, pings=0)

    def spilled() -> None:  # past the ring: the rest waits there
        assert rec.backlog_items > 0

    fed = burst_while_stopped(rec, 9 << 20, lambda n: bytes([n % 251]) * 150_000, spilled)
    trickle_until(rec, fed, lambda: bool(tries), "no release was tried")
    time.sleep(0.3)
    assert len(tries) == 1 and rec.cold_keep == float("inf")
    assert "cannot give memory back" in caplog.text
    assert archived_pings(rec) == fed


def test_forwarding_threads_may_record_at_once(tmp_path: Path) -> None:
    """Several pump threads call data() together, with the GIL handed over as often as the
    interpreter allows: nothing raises, and every message is recorded."""
    rec = Recorder(RecordingOptions(tmp_path, nice=0), {}, None)
    rec.start()
    main_channel(rec, pings=0)

    def pump(n: int) -> None:
        for i in range(3000):
            rec.data(0, 2.0 + i, "s2c", mini(4, n.to_bytes(4, "little") * 3))

    errors = racing(pump, 4)
    rec.closed(0, 9000.0, "viewer closed")
    rec.stop()
    assert not errors, errors[:3]
    (archive,) = rec.archives
    pings = [r for r in iter_records(archive, []) if r.name == "ping"]
    assert len(pings) == 4 * 3000


@pytest.mark.parametrize("max_message", [DEFAULT_MAX_MESSAGE, 64])
def test_the_recording_process_frames_with_the_proxys_message_limit(
    tmp_path: Path, max_message: int
) -> None:
    """A message the proxy relayed is one the recording process accepts: both use the
    limit of --max-message (the process once had a fixed one, and refused larger ones)."""
    rec = Recorder(RecordingOptions(tmp_path, max_message=max_message), {}, None)
    rec.start()
    main_channel(rec, pings=0)
    rec.data(0, 5.0, "s2c", mini(4, bytes(100)))  # a 100-byte PING body
    rec.closed(0, 9.0, "viewer closed")
    rec.stop()
    (archive,) = rec.archives
    with ArchiveReader(archive) as r:
        records = list(r.records())
    errors = [x.get("err") for x in records if x.get("kind") == "error"]
    if max_message == 64:
        assert errors == ["message type 4 of 100 bytes exceeds the limit"]
    else:
        assert errors == [] and records[-2].get("name") == "ping"


def test_connections_that_never_link_share_one_archive_until_the_proxy_stops(
    tmp_path: Path,
) -> None:
    """A health check every few seconds must not leave an archive each, nor a growing set
    of connections in memory: one `unlinked` archive holds them all, open until the stop."""
    reports: list[tuple[object, ...]] = []
    worker = RecorderWorker(RecordingOptions(tmp_path), {"listen": "x"}, None, reports.append)
    for conn in range(50):
        worker.handle(("open", conn, 0.0, ("127.0.0.1", 40000 + conn), ("127.0.0.1", 5900),
                       None, {"insertion": "reverse"}, None))  # fmt: skip
        if conn % 2:
            worker.handle(("data", conn, 0.1, "c2s", b"SSH-2.0-OpenSSH_9.2p1\r\n"))
        worker.handle(("close", conn, 0.2, "viewer closed"))
    assert list(worker.sessions) == [UNLINKED]
    assert worker.sessions[UNLINKED].conns == set() and worker.conn_keys == {}
    main_channel_worker(worker, conn=99)  # a real session meanwhile: an archive of its own
    worker.handle(("close", 99, 9.0, "viewer closed"))
    assert list(worker.sessions) == [UNLINKED]  # the session's archive closed, this one not
    worker.close_all("proxy stopped")
    (unlinked,) = tmp_path.glob("*-unlinked.spta")
    (session,) = tmp_path.glob(f"*-{SESSION_ID:08x}.spta")
    with ArchiveReader(unlinked) as reader:
        recs = list(reader.records())
        assert reader.end is not None and reader.end["status"] == "proxy stopped"
        assert reader.header["session"] == {"listen": "x", "viewer": None, "unlinked": True,
                                            "id": None}  # fmt: skip
    assert len({tuple(r["ch"]) for r in recs}) == 50
    assert sum(1 for r in recs if r["kind"] == "error") == 25  # not SPICE: bad magic
    assert verify(session).status == "intact"
    assert [r for r in reports if r[0] == "archive"] == [
        ("archive", str(unlinked)), ("archive", str(session))
    ]  # fmt: skip


def main_channel_worker(worker: RecorderWorker, conn: int) -> None:
    """main_channel(), fed to a worker in this process."""
    _main_channel_without_init(worker, conn, [])
    worker.handle(("data", conn, 1.3, "s2c", init()))


def _main_channel_without_init(worker: RecorderWorker, conn: int, pings: list[bytes]) -> None:
    """A main channel through its link stage, then PINGs with these bodies; no INIT."""
    worker.handle(("open", conn, 1.0, ("127.0.0.1", 41000), ("127.0.0.1", 5900), None, None,
                   None))  # fmt: skip
    bits = caps_word(1, 3)
    for t, d, data in (
        (1.1, "c2s", link_mess(bits, channel_type=MAIN, conn=0)),
        (1.1, "s2c", link_reply(bits)),
        (1.2, "c2s", TICKET),
        (1.2, "s2c", OK),
        *((1.3, "s2c", mini(4, body)) for body in pings),
    ):
        worker.handle(("data", conn, t, d, data))


@pytest.mark.parametrize("second_init", [False, True])
def test_every_archive_a_connection_wrote_to_closes_with_it(
    tmp_path: Path, second_init: bool
) -> None:
    """INIT after 70 messages (the records held for it were let go without a session), or a
    second INIT naming another session: the connection's records span two archives, and
    both close, complete, when it does (the first stayed open until the proxy stopped)."""
    worker = RecorderWorker(RecordingOptions(tmp_path), {}, None)
    _main_channel_without_init(worker, 0, [bytes(12)] * (3 if second_init else 70))
    worker.handle(("data", 0, 1.4, "s2c", init()))
    if second_init:
        worker.handle(("data", 0, 1.5, "s2c", init(SESSION_ID + 1)))
    worker.handle(("data", 0, 1.6, "s2c", mini(4, bytes(12))))
    worker.handle(("close", 0, 2.0, "server closed"))
    assert worker.sessions == {} and worker.conn_keys == {}
    archives = sorted(tmp_path.glob("*.spta"))
    assert len(archives) == 2
    records = 0
    for archive in archives:
        assert verify(archive).status == "intact"
        with ArchiveReader(archive) as reader:
            records += len(list(reader.records()))
            assert reader.end is not None and reader.end["status"] == "complete"
    # open, six link units, the PINGs and INITs, the last PING, the close
    assert records == 1 + 6 + (3 + 2 if second_init else 70 + 1) + 1 + 1


def test_a_main_channel_waiting_for_init_holds_at_most_a_mebibyte(tmp_path: Path) -> None:
    """A server may send up to --max-message per message before INIT: held, 64 of them
    would be gigabytes in the recording process."""
    worker = RecorderWorker(RecordingOptions(tmp_path, max_message=4 << 20), {}, None)
    _main_channel_without_init(worker, 0, [bytes(3 << 20)] * 5)
    (conn,) = worker.builder.conns.values()
    assert conn.held is not None and conn.held_bytes < 1 << 20 and len(conn.held) < 2
    (archive,) = tmp_path.glob("*-unassigned-0.spta")
    worker.close_all("proxy stopped")
    assert len(list(iter_records(archive, []))) == 1 + 6 + 5 + 1  # open, link, PINGs, close


def test_what_waits_for_a_session_is_written_when_the_proxy_vanishes(tmp_path: Path) -> None:
    """A main channel still waiting for INIT, and a link header still waiting for its link
    message, were dropped when the proxy died: their records now end the archives, each
    connection closed with the status."""
    worker = RecorderWorker(RecordingOptions(tmp_path), {}, None)
    worker.handle(("open", 1, 1.0, ("127.0.0.1", 41001), ("127.0.0.1", 5900), None, None,
                   None))  # fmt: skip
    bits = caps_word(1, 3)
    worker.handle(("data", 1, 1.1, "c2s", link_mess(bits, channel_type=MAIN, conn=0)))
    worker.handle(("data", 1, 1.1, "s2c", link_reply(bits)))  # no INIT will come
    worker.handle(("open", 2, 1.2, ("127.0.0.1", 41002), ("127.0.0.1", 5900), None, None,
                   None))  # fmt: skip
    worker.handle(("data", 2, 1.3, "c2s", link_mess(bits, channel_type=2)[:16]))  # header only
    assert worker.sessions == {}  # nothing could be written yet
    worker.close_all("proxy vanished")
    by_conn: dict[int, list[dict[str, object]]] = {}
    for archive in tmp_path.glob("*.spta"):
        assert verify(archive).status == "intact"
        with ArchiveReader(archive) as reader:
            for r in reader.records():
                ch = r["ch"]
                assert isinstance(ch, list)
                by_conn.setdefault(ch[2], []).append(r)
            assert reader.end is not None and reader.end["status"] == "proxy vanished"
    assert [(r["kind"], r["name"]) for r in by_conn[1]] == [
        ("open", None), ("link", "header"), ("link", "link_mess"), ("link", "header"),
        ("link", "link_reply"), ("close", "proxy vanished"),
    ]  # fmt: skip
    assert [(r["kind"], r["name"]) for r in by_conn[2]] == [
        ("open", None), ("link", "header"), ("close", "proxy vanished")
    ]  # fmt: skip


@pytest.mark.parametrize("policy", ["gap", "close"])
def test_recording_resumes_for_connections_opened_after_a_failure(
    tmp_path: Path, policy: str
) -> None:
    """The recording process dies; a connection opened before retry_after is answered by
    the policy, as before; one opened after it gets a new recording process and a whole
    signed archive, while the connection that began on the dead one stays unrecorded."""
    from proxy.io.resuming import ResumingRecorder

    options = RecordingOptions(tmp_path, backlog=policy, resume_after=30.0)
    clock = [0.0]
    rec = ResumingRecorder(lambda o: Recorder(o, {}, None), options, lambda: clock[0])
    rec.start()
    first = rec.current
    assert first.process is not None
    main_channel(rec, conn=0)
    wait_for(lambda: rec.archives)
    os.kill(first.process.pid, signal.SIGKILL)  # our own child, by its PID
    wait_for(lambda: rec.failed is not None)
    assert first.failed_at is not None
    clock[0] = first.failed_at + 10.0  # too soon: no new process yet
    rec.opened(1, 1.0, ("127.0.0.1", 40001), ("127.0.0.1", 5900))
    assert rec.current is first and rec.resumed == 0
    assert rec.data(1, 1.1, "c2s", b"x") == (policy == "gap")
    # a reload meanwhile: the new recording process follows it, when it says
    (tmp_path / "later").mkdir()
    rec.reconfigure(replace(options, directory=tmp_path / "later", resume_after=60.0))
    clock[0] = first.failed_at + 31.0
    rec.opened(3, 1.0, ("127.0.0.1", 40003), ("127.0.0.1", 5900))
    assert rec.current is first and rec.resumed == 0
    clock[0] = first.failed_at + 61.0
    main_channel(rec, conn=2, pings=2)
    assert rec.current is not first and rec.resumed == 1 and rec.failed is None
    assert rec.data(0, 5.0, "s2c", b"y") == (policy == "gap")  # still the dead one's
    assert rec.refusal(0) == "recording failed" and rec.refusal(2) == "recording backlog"
    wait_for(lambda: rec.conn_session.get(2) == SESSION_ID)
    for conn in (0, 1, 2, 3):
        rec.closed(conn, 9.0, "viewer closed")
    rec.stop()
    assert first.process.returncode is not None  # reaped in the background
    resumed = [a for a in rec.archives if a not in first.archives]
    (archive,) = resumed
    assert archive.parent == tmp_path / "later"
    assert verify(archive).status == "intact"
    records = list(iter_records(archive, []))
    assert {r.connection for r in records} == {2}  # nothing of the dead recorder's
    assert [r for r in records if r.name == "init"]


INPUTS, KEY_DOWN = 3, 101


def inputs_channel(rec: RecordingSink, conn: int, session_id: int, t: float) -> None:
    """An inputs channel of a session through its link stage, then one key press."""
    rec.opened(conn, t, ("127.0.0.1", 40000 + conn), ("127.0.0.1", 5900))
    bits = caps_word(1, 3)
    rec.data(conn, t, "c2s", link_mess(bits, channel_type=INPUTS, conn=session_id))
    rec.data(conn, t, "s2c", link_reply(bits))
    rec.data(conn, t, "c2s", TICKET)
    rec.data(conn, t, "s2c", OK)
    key_down(rec, conn, t)


def key_down(rec: RecordingSink, conn: int, t: float) -> None:
    rec.data(conn, t, "c2s", mini(KEY_DOWN, encode(INPUTS, "c2s", KEY_DOWN, {"code": 0x1E})))


def test_a_reconfigured_recording_changes_new_sessions_archives_only(tmp_path: Path) -> None:
    """What a reload changes in [recording] applies to sessions that begin after it: their
    archives go to the new directory, compressed, with the new privacy switches. A session
    begun before keeps its archive's settings, for its later channels too: its header
    describes the policy every record in it follows."""
    before = RecordingOptions(tmp_path / "before")
    rec = Recorder(before, {}, None)
    rec.start()
    main_channel(rec, conn=0)  # session A
    inputs_channel(rec, 1, SESSION_ID, 1.0)
    after = replace(before, directory=tmp_path / "after", compress=True,
                    policy=PrivacyPolicy(keys="none"))  # fmt: skip
    (tmp_path / "after").mkdir()  # as a reload does, before it applies
    rec.reconfigure(after)
    key_down(rec, 1, 2.0)
    inputs_channel(rec, 2, SESSION_ID, 2.0)  # a later channel of session A
    other = 0x0B
    rec.opened(3, 3.0, ("127.0.0.1", 40003), ("127.0.0.1", 5900))  # session B
    for t, direction, data in main_link(other):
        rec.data(3, t, direction, data)
    inputs_channel(rec, 4, other, 3.0)
    for conn in range(5):
        rec.closed(conn, 9.0, "viewer closed")
    rec.stop()
    first, second = rec.archives
    assert first.parent == tmp_path / "before" and first.suffix == ".spta"
    assert second.parent == tmp_path / "after" and second.name.endswith(".spta.zst")
    keys = {}
    for archive in (first, second):
        with ArchiveReader(archive) as reader:
            keys[archive] = reader.header["policy"]["keys"]
        pressed = [r for r in iter_records(archive, []) if r.name == "key_down"]
        keys[archive] = (keys[archive], len(pressed))
    assert keys == {first: ("text", 3), second: ("none", 0)}


def test_the_archive_header_names_the_user_a_token_was_given_to(tmp_path: Path) -> None:
    """Under inject a token may name its user (POST /api/tokens "user"), and with
    sasl_user the relay reads whom a SASL login was for: the main channel's auth event says
    so before INIT, so the session's archive header carries it; a session whose viewers
    named nobody, or only a name the server refused, has no user in its header."""
    worker = RecorderWorker(RecordingOptions(tmp_path), {}, None)
    inject = {"mode": "inject", "result": "OK", "by": "server"}
    sasl = {"sasl_mechanism": "PLAIN", "user": "bob"}
    said = {
        1: ("inject", {**inject, "user": "alice@corp"}),
        2: ("inject", inject),
        3: ("sasl_login", {**sasl, "outcome": "accepted"}),
        4: ("sasl_login", {**sasl, "user": "mallory", "outcome": "refused"}),
    }
    for conn, (name, fields) in said.items():
        worker.handle(("open", conn, 1.0, ("127.0.0.1", 41000 + conn), ("127.0.0.1", 5900),
                       None, {"auth": "inject"}, None))  # fmt: skip
        for t, d, data in main_link(SESSION_ID + conn):
            worker.handle(("data", conn, t, d, data))
            if d == "c2s" and data is TICKET:
                worker.handle(("event", conn, t, "s2c", "auth", name, fields, b""))
        worker.handle(("close", conn, 2.0, "viewer closed"))
    assert worker.users == {}  # forgotten with the connection
    users = {}
    for archive in tmp_path.glob("*.spta"):
        with ArchiveReader(archive) as reader:
            session = reader.header["session"]
            users[session["id"]] = session.get("user")
    assert users == {
        SESSION_ID + 1: "alice@corp", SESSION_ID + 2: None, SESSION_ID + 3: "bob",
        SESSION_ID + 4: None,
    }  # fmt: skip
