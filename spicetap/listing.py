"""`spicetap sessions`: the recorded sessions in archives and folders of them, one line each
(when, whose, from where, to what, how long, how it ended), from each archive's header and
end record alone. An uncompressed archive's end record is read from its last bytes
(spicetap.archive.tail), a compressed one's from its last zstd frame
(spicetap.archive.zstdtail); one whose frames are damaged is read through. Integrity is
`spicetap verify`'s: a listing trusts what the files say."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from spicetap.about import ArchiveSeen, about
from spicetap.archive import format as fmt
from spicetap.archive.reader import ArchiveError, ArchiveReader, migrate
from spicetap.archive.shape import MalformedRecord, started_of
from spicetap.archive.tail import end_at_tail
from spicetap.archive.zstdtail import TailUnreadable, compressed_end_at_tail

SUFFIXES = (fmt.SUFFIX, fmt.ZSTD_SUFFIX)


class ListingError(Exception):
    """An archive that cannot be listed (the message names it): skipped with a warning."""


def archive_files(paths: Iterable[Path]) -> list[Path]:
    """The archives named, and those under the folders named (recursively, by suffix);
    each once. OSError names a path that does not exist."""
    found: dict[Path, None] = {}
    for path in paths:
        if path.is_dir():
            inside = (p for p in path.rglob("*") if p.name.endswith(SUFFIXES) and p.is_file())
            found.update(dict.fromkeys(sorted(inside)))
        elif path.exists():
            found[path] = None
        else:
            raise FileNotFoundError(f"{path}: no such file or folder")
    return list(found)


def summary(path: Path) -> tuple[float, dict[str, Any]]:
    """When the archive's session started (seconds since the epoch, to sort by) and what
    it says of it (spicetap.about), with its path and size. ListingError when it is no
    readable archive."""
    try:
        with ArchiveReader(path) as reader:
            seen = ArchiveSeen(header=reader.header)
            started = started_of(reader.header)
            try:
                end = compressed_end_at_tail(path) if reader.compressed else end_at_tail(path)
                seen.end = None if end is None else migrate(reader.version, reader.header, end)
            except TailUnreadable:  # damaged frames: what the reader makes of them
                for _record in reader.records():
                    pass
                seen.end = reader.end
    except (ArchiveError, MalformedRecord) as exc:
        why = str(exc) if isinstance(exc, ArchiveError) else f"{path}: {exc}"
        raise ListingError(why) from None
    except OSError as exc:
        raise ListingError(f"{path}: cannot read ({exc.strerror or exc})") from None
    info = about(seen)
    assert info is not None  # an archive has a header
    return started, {"path": str(path), "bytes": path.stat().st_size, **info}


def matches(info: dict[str, Any], user: str | None) -> bool:
    return user is None or user in info["users"]
