"""What an archive says of its session, for `spicetap stats`: who (the viewer's address,
the balancer or reverse proxy that named it, the user a token was given to), how it came
in and where it went (insertion, server, target, TLS on each leg, the auth mode, masked
capabilities), when it started and how it ended, and what the recording kept (privacy).

The header and the end record are written by spicetap, but a damaged or forged archive
may hold anything there: every value is checked for its type and shown escaped, on one
line, and what is missing or odd is left out rather than guessed."""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spicetap.errors import one_line


@dataclass
class ArchiveSeen:
    """Filled by iter_records while it reads an archive: its header, then its end record
    (None when the archive ends without one: cut short, or still being written)."""

    header: dict[str, Any] | None = None
    end: dict[str, Any] | None = None


def about(seen: ArchiveSeen) -> dict[str, Any] | None:
    """The archive's session as plain JSON-ready values; None for a capture."""
    header = seen.header
    if header is None:
        return None
    session = header.get("session")
    out: dict[str, Any] = {
        "session": _plain(session) if isinstance(session, dict) else {},
        "started": _time(header.get("started")),
        "part": header.get("part") if _is_int(header.get("part")) else 1,
        "policy": _plain(header["policy"]) if isinstance(header.get("policy"), dict) else {},
        "end": None,
    }
    out["users"] = _users(out["session"].get("user"), seen.end)
    end = seen.end
    if end is not None:
        status = end.get("status")
        started, ended = _seconds(header.get("started")), _seconds(end.get("ended"))
        out["end"] = {
            "status": status if isinstance(status, str) else None,
            "ended": _time(ended),
            "signed": isinstance(end.get("signature"), bytes),
            "seconds": ended - started if started is not None and ended is not None else None,
        }
    return out


def _users(user: Any, end: dict[str, Any] | None) -> list[str]:
    """Whose the archive's sessions were: the header's user (the proxy's archives), or the
    end record's `users`, the names of accepted SASL logins (`spicetap import`)."""
    named = [user] if isinstance(user, str) else []
    told = end.get("users") if end is not None else None
    if isinstance(told, list):
        named += [u for u in told if isinstance(u, str) and u not in named]
    return named


def describe(info: dict[str, Any]) -> list[str]:
    """`about`'s answer as a few lines for people."""
    session = info["session"]
    sid = session.get("id")
    if session.get("unlinked"):
        who = "connections that never linked a SPICE channel (one archive per proxy run)"
    elif _is_int(sid):
        who = f"session {sid:08x}"
    else:
        who = "connections of no session (refused or cut before the server named one)"
    if info["part"] != 1:
        who += f", part {info['part']}"
    end = info["end"]
    if end is None:
        ending = "no end record (cut short, or still being recorded)"
    else:
        ending = f"ended {end['ended'] or '(time unknown)'}"
        if end["seconds"] is not None:
            ending += f" ({duration(end['seconds'])})"
        ending += f": {end['status'] or '?'}"
        ending += "" if end["signed"] else " (unsigned)"
    lines = [f"{who}; started {info['started'] or '(time unknown)'}; {ending}"]
    lines.append(_who(session, info["users"]))
    lines.append(_route(session))
    policy = info["policy"]
    if policy:
        kept = ", ".join(f"{k} {_word(v)}" for k, v in policy.items())
        lines.append(f"privacy: {kept}")
    return [one_line(line) for line in lines if line]


def row(info: dict[str, Any]) -> tuple[str, ...]:
    """`about`'s answer as `spicetap sessions`' columns: started, session, user, viewer,
    route, ended, archive (when `info` has its path)."""
    session, end = info["session"], info["end"]
    sid = session.get("id")
    route = " ".join(
        str(v) for v in (session.get("insertion"), session.get("server")) if v is not None
    )
    if session.get("target") is not None:
        route += f" ({session['target']})"
    viewer = str(session.get("viewer") or "")
    if session.get("forwarded_by") is not None:
        viewer += f" via {session['forwarded_by']}"
    ended = "no end record"
    if end is not None:
        ended = str(end["status"])
        if end["seconds"] is not None:
            ended += f" after {duration(end['seconds'])}"
    return (
        str(info["started"]),
        f"{sid:08x}" if _is_int(sid) else "-",
        ", ".join(info["users"]),
        viewer,
        route,
        ended,
        Path(str(info.get("path", ""))).name,
    )


def duration(seconds: float) -> str:
    """12.3 s, 5 min 03 s, 2 h 04 min."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    whole = int(seconds)
    if whole < 3600:
        return f"{whole // 60} min {whole % 60:02d} s"
    return f"{whole // 3600} h {whole % 3600 // 60:02d} min"


def _who(session: dict[str, Any], users: list[str]) -> str:
    parts = []
    if session.get("viewer") is not None:
        parts.append(f"viewer {session['viewer']}")
    if session.get("forwarded_by") is not None:
        parts.append(f"named by {session['forwarded_by']}")
    if users:
        parts.append(f"user{'s' if len(users) > 1 else ''} {', '.join(users)}")
    if session.get("source") is not None:  # `spicetap import`
        parts.append(f"imported from {session['source']}")
    return ", ".join(parts)


def _route(session: dict[str, Any]) -> str:
    parts = []
    if session.get("insertion") is not None:
        parts.append(f"insertion {session['insertion']}")
    if session.get("server") is not None:
        to = f"server {session['server']}"
        if session.get("target") is not None:
            to += f" (target {session['target']})"
        parts.append(to)
    tls = session.get("tls")
    if isinstance(tls, dict):
        parts.append(f"TLS viewer {_word(tls.get('viewer'))}, server {_word(tls.get('server'))}")
    if session.get("auth") is not None:
        parts.append(f"auth {session['auth']}")
    masked = session.get("mask_caps")
    if isinstance(masked, list) and masked:
        parts.append("masked capabilities " + " ".join(str(m) for m in masked))
    return "; ".join(parts)


def _word(value: Any) -> str:
    if value is None:
        return "unknown"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def _plain(obj: dict[Any, Any]) -> dict[str, Any]:
    """`obj` with string keys and JSON-ready values only (bytes and odd types dropped)."""
    out: dict[str, Any] = {}
    for key, value in obj.items():
        if not isinstance(key, str):
            continue
        if isinstance(value, dict):
            out[key] = _plain(value)
        elif isinstance(value, list):
            out[key] = [v for v in value if isinstance(v, str | int | float | bool)]
        elif value is None or isinstance(value, str | int | float | bool):
            out[key] = value
    return out


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _seconds(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _time(value: Any) -> str | None:
    """Seconds since the epoch as ISO 8601 local time with its offset; None if not a sane
    time."""
    if _seconds(value) is None:
        return None
    try:
        moment = datetime.datetime.fromtimestamp(value).astimezone()
    except (OverflowError, OSError, ValueError):
        return None
    return moment.isoformat(timespec="seconds")
