"""`spicetap import`: a pcap/pcapng capture to an archive (TCP reassembled, channels grouped
into sessions, TLS streams marked undecryptable)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from dissectors.api import AGENT, LINK, SPICE
from spicetap.archive.privacy import PrivacyPolicy
from spicetap.archive.records import to_archive
from spicetap.archive.sasllogins import SaslLogins
from spicetap.archive.writer import ArchiveWriter, FlushPolicy
from spicetap.capture.piped import STDIN, shown_name
from spicetap.records import Record
from spicetap.show import iter_capture

# Records keep their time as signed 64-bit nanoseconds after the archive's start (msgpack's
# widest integer): about 292 years either way. Stay a little inside it.
MAX_OFFSET = 9.2e9


@dataclass(frozen=True)
class ImportResult:
    path: Path
    records: int
    dropped: int  # records the privacy policy left out
    sessions: list[int]
    problems: list[str]


def dissector_hashes() -> dict[str, str]:
    return {
        "spice": SPICE.module.SOURCE_SHA256,
        "link": LINK.module.SOURCE_SHA256,
        "agent": AGENT.module.SOURCE_SHA256,
    }


def import_capture(
    capture: Path,
    out: Path,
    *,
    policy: PrivacyPolicy,
    signing_key: Ed25519PrivateKey | None,
    compress: bool = False,
    progress: Callable[[int], None] | None = None,
) -> ImportResult:
    problems: list[str] = []
    writer: ArchiveWriter | None = None
    t0 = last = 0.0
    count = dropped = clamped = 0
    sessions: list[int] = []
    tls_conns: set[int] = set()
    logins = SaslLogins() if policy.sasl_user else None

    def keep(writer: ArchiveWriter, rec: Record) -> bool:
        """Write `rec` unless the policy drops it; whether it was written."""
        obj = to_archive(rec, t0, policy)
        if obj is not None:
            writer.write(obj)
        return obj is not None

    for rec in iter_capture(capture, problems):
        if writer is None:
            t0 = rec.time
            first = rec.fields or {}
            header: dict[str, Any] = {
                "dissector": dissector_hashes(),
                "session": {
                    "viewer": first.get("client"),
                    "server": first.get("server"),
                    "insertion": "import",
                    # a file's name (a named pipe's too); standard input said as such
                    "source": shown_name(capture) if str(capture) == STDIN else capture.name,
                    "tls": {"viewer": None, "server": None},
                    "auth": None,
                },
                "policy": policy.describe(),
                "started": t0,
            }
            writer = ArchiveWriter(
                out,
                header,
                signing_key=signing_key,
                compress=compress,
                flush=FlushPolicy(interval=1.0, max_buffer=4 << 20),
            )
        if rec.session is not None and rec.session not in sessions:
            sessions.append(rec.session)
        if rec.kind == "tls":
            tls_conns.add(rec.connection)
        if not -MAX_OFFSET < rec.time - t0 < MAX_OFFSET:  # a damaged capture's timestamp
            if not clamped:
                problems.append(
                    f"{shown_name(capture)}: a packet's time is centuries from the first one's "
                    f"({rec.time:.0f} s); such times are recorded as the nearest that fits"
                )
            clamped += 1
            rec = rec._replace(time=t0 + max(-MAX_OFFSET, min(MAX_OFFSET, rec.time - t0)))
        last = rec.time
        login = None if logins is None else logins.feed(rec)  # before SASL is redacted
        for one in (rec,) if login is None else (rec, login):
            kept = keep(writer, one)
            count, dropped = count + kept, dropped + (not kept)
        if progress is not None and count % 512 == 0:
            progress(count)
    if writer is None:  # the caller says there was no SPICE traffic
        return ImportResult(out, 0, 0, [], problems)
    extra: dict[str, Any] = {
        # the capture's last packet ended the session, not the import: the listing's
        # "complete after" is the capture's span; when it was imported is said apart
        "ended": last,
        "imported": time.time(),
        "sessions": sessions,
        "tls_connections": sorted(tls_conns),
        "problems": problems,
    }
    if logins is not None:
        count += sum(keep(writer, login) for login in logins.finish())
        extra["users"] = logins.users  # names of accepted SASL logins: a header has none
    writer.close(extra=extra)
    return ImportResult(out, count, dropped, sessions, problems)
