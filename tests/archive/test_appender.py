"""The archive file's appender: around the page cache where it can, exact bytes always."""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spicetap.archive.appender import BLOCK, IN_FLIGHT, STAGE, Appender

SIZES = st.sampled_from(
    [0, 1, 7, BLOCK - 1, BLOCK, BLOCK + 1, 70_000, STAGE - 3, STAGE, 3 * STAGE + 5]
)
# a run: pieces to append, each then pushed or not
RUNS = st.lists(st.tuples(SIZES, st.booleans()), min_size=1, max_size=12)


def refuse_direct_writes(monkeypatch: pytest.MonkeyPatch, appender: Appender) -> list[int]:
    """A filesystem that takes O_DIRECT at open but refuses its writes (EINVAL)."""
    refused: list[int] = []
    real = os.pwrite

    def pwrite(fd: int, data: Any, offset: int) -> int:
        if fd == appender._direct_fd:
            refused.append(offset)
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    return refused


def append_and_check(path: Path, appender: Appender, run: list[tuple[int, bool]]) -> None:
    expected = bytearray()
    try:
        for i, (size, push) in enumerate(run):
            piece = bytes([i % 251]) * size
            appender.write(piece if i % 2 else memoryview(piece))
            expected += piece
            assert appender.size == len(expected)
            if push:
                appender.push()
                assert appender.held == 0
                # the kernel has every byte, and the file ends where the archive does
                assert path.read_bytes() == expected
            else:
                # full stages are written as they fill (the last ones may be in flight)
                assert appender.held < (IN_FLIGHT + 1) * STAGE
                assert path.stat().st_size + appender.held >= len(expected)
    finally:
        appender.close()
    assert path.read_bytes() == expected


@settings(max_examples=40, deadline=None)
@given(run=RUNS, direct=st.booleans())
def test_every_byte_reads_back_whatever_the_writes_and_pushes(
    tmp_path_factory: pytest.TempPathFactory, run: list[tuple[int, bool]], direct: bool
) -> None:
    path = tmp_path_factory.mktemp("a") / "a.spta"
    append_and_check(path, Appender(path, direct=direct), run)


def test_the_archive_goes_around_the_page_cache_where_the_filesystem_allows(
    tmp_path: Path,
) -> None:
    """ext4 and XFS take O_DIRECT, and so does tmpfs since Linux 6.6: where this test runs,
    the appender must use it, or the recording process pays the page cache for nothing."""
    probe = tmp_path / "probe"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o600))
    except OSError as exc:
        assert exc.errno == errno.EINVAL
        allowed = False
    else:
        allowed = True
    appender = Appender(tmp_path / "a.spta")
    try:
        assert appender.direct == allowed
        if allowed:
            assert fcntl.fcntl(appender._direct_fd, fcntl.F_GETFL) & os.O_DIRECT
            appender.write(b"x" * (3 * STAGE + 10))
            assert appender.held <= IN_FLIGHT * STAGE + 10  # the last full stages in flight
    finally:
        appender.close()
    assert (tmp_path / "a.spta").read_bytes() == b"x" * ((3 * STAGE + 10) if allowed else 0)


def test_a_filesystem_refusing_o_direct_at_open_is_written_through_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = os.open

    def open_(path: Any, flags: int, mode: int = 0o777) -> int:
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return real(path, flags, mode)

    monkeypatch.setattr(os, "open", open_)
    path = tmp_path / "a.spta"
    appender = Appender(path)
    assert not appender.direct
    append_and_check(path, appender, [(70_000, False), (STAGE + 1, True), (5, False)])


@pytest.mark.parametrize("first", [5, STAGE + 5])
def test_a_filesystem_refusing_direct_writes_loses_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, first: int
) -> None:
    """Refused at the first direct write (on a push, or as a stage fills): what was staged
    goes through the page cache, and so does everything after."""
    path = tmp_path / "a.spta"
    appender = Appender(path)
    if not appender.direct:
        pytest.skip("this filesystem refuses O_DIRECT at open (the test above covers it)")
    refused = refuse_direct_writes(monkeypatch, appender)
    append_and_check(path, appender, [(first, True), (2 * STAGE + 7, False), (BLOCK, True)])
    # tried on the stages in flight when the first refusal came back, then never again
    assert refused[0] == 0 and len(refused) <= IN_FLIGHT
    assert not appender.direct


def test_a_full_disk_names_the_archive_and_keeps_what_is_staged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "a.spta"
    appender = Appender(path)
    appender.write(b"a" * 100)
    appender.push()

    def full(fd: int, data: Any, offset: int) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(OSError) as failed:
        appender.write(b"b" * 50)  # staged, when direct
        appender.push()
    assert failed.value.errno == errno.ENOSPC and failed.value.filename == str(path)
    monkeypatch.undo()
    staged = appender.direct
    appender.close()  # the disk has room again: nothing staged was dropped
    assert path.read_bytes() == b"a" * 100 + (b"b" * 50 if staged else b"")


@pytest.mark.parametrize("direct", [True, False])
def test_fsync_reaches_the_disk_on_every_push(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, direct: bool
) -> None:
    synced: list[int] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        synced.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    path = tmp_path / "a.spta"
    appender = Appender(path, direct=direct, fsync=True)
    appender.write(b"x" * 10)
    appender.push()
    assert synced  # through the cache each write syncs; direct, each push
    count = len(synced)
    appender.write(b"y" * 10)
    appender.close()
    assert len(synced) > count
    assert path.read_bytes() == b"x" * 10 + b"y" * 10


# Python 3.12+ warns that forking a process with threads may deadlock: that is the point
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_forked_child_writes_archives_too(tmp_path: Path) -> None:
    """The parent's write thread is not in the child: the child must get its own."""
    parent = Appender(tmp_path / "parent.spta")
    parent.write(b"p" * (2 * STAGE))  # the write thread exists now, if direct
    parent.close()
    pid = os.fork()
    if pid == 0:  # the child: exit code 0 only if its archive is whole
        code = 1
        try:
            child = Appender(tmp_path / "child.spta")
            child.write(b"c" * (2 * STAGE + 1))
            child.close()
            code = 0 if (tmp_path / "child.spta").read_bytes() == b"c" * (2 * STAGE + 1) else 2
        finally:
            os._exit(code)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.05)
    else:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail("the forked child hung writing its archive")
    assert os.waitstatus_to_exitcode(status) == 0
