"""What `spicetap proxy` records, and how: its flags over the config file's [recording].

Built at start and again at each reload; a reload's options apply to the archives of
sessions that begin from then on (proxy/io/recording.py, Recorder.reconfigure).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from proxy.fronts import named, pick
from proxy.recorder import RecordingOptions
from spicetap.archive.writer import FlushPolicy, Rotation
from spicetap.config import RecordingSection
from spicetap.errors import UserError


def recording_options(
    args: argparse.Namespace, cr: RecordingSection, max_message: int
) -> RecordingOptions | None:
    """None: not recording (no --record, no [recording] directory). UserError names what
    cannot be used."""
    # not at the top: every command's parser imports this module, and rich is slow to load
    from spicetap.cli_inspect import policy_from  # noqa: PLC0415

    directory = pick(args.record, cr.directory)
    if not directory:
        return None
    if Path(directory).exists() and not Path(directory).is_dir():
        where = named(args, "record", "recording", "directory")
        raise UserError(f"{where} {directory}: not a directory")
    return RecordingOptions(
        Path(directory),
        policy=policy_from(args, cr.privacy),
        flush=FlushPolicy(
            interval=pick(args.flush_interval, cr.flush_interval),
            max_buffer=cr.max_buffer,
            fsync=cr.fsync,
            direct=cr.direct_io,
        ),
        rotation=Rotation(max_bytes=cr.rotate_bytes, max_seconds=cr.rotate_seconds),
        compress=bool(pick(args.compress, cr.compress)),
        chain_hash=cr.chain_hash,
        backlog=pick(args.backlog, cr.backlog),
        max_backlog=pick(args.max_backlog, cr.max_backlog_mb) << 20,
        nice=cr.nice,
        max_message=max_message,
        resume_after=cr.resume_after,
    )
