"""Files that import and export write: whole or not at all, and never over their input."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from spicetap.errors import UserError


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.samefile(b)
    except OSError:  # either one missing (or unreadable): not the same existing file
        return False


@contextmanager
def output_file(path: Path, source: Path) -> Iterator[Path]:
    """The path to write `path`'s content to. A regular file is written beside it under a
    temporary name and renamed over it only when the block ends without an error, so a
    failed or interrupted run leaves an earlier file of that name as it was. A device or
    pipe (/dev/stdout) is written in place. The input named as the output is refused
    before anything is opened: writing would destroy it while it is read. Missing
    directories on the way to `path` are made."""
    if _same_file(path, source):
        raise UserError(f"{path}: is the input too; give another output file")
    if path.is_dir():
        raise UserError(f"{path}: is a directory; give a file name")
    in_place = path.exists() and not path.is_file()
    if not in_place:
        try:  # missing directories are made, as import's archive writer and --record do
            path.parent.mkdir(parents=True, exist_ok=True)
        except FileExistsError as exc:  # a file of that name is in the way
            raise UserError(f"{exc.filename}: not a directory") from None
    # short, so that any name that fits the directory fits it too
    partial = path if in_place else path.with_name(f".spicetap-{os.getpid()}.partial")
    try:
        yield partial
        if not in_place:
            partial.replace(path)
    except OSError as exc:
        # errors writing (ENOSPC carries no file name) or naming the temporary file belong
        # to the output the user named
        if exc.filename is None or str(exc.filename) == str(partial):
            raise UserError(f"{path}: {exc.strerror or exc}") from None
        raise
    finally:
        if not in_place:  # gone already after the rename, or never made
            with contextlib.suppress(OSError):
                partial.unlink()
