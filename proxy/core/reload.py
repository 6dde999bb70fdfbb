"""What a reload of `spicetap proxy`'s config file changes, and what only a restart can.

A reload (SIGHUP, or POST /api/reload) re-reads the file and applies, for connections that
arrive from then on: targets (added, removed, re-pointed, their TLS checks and
credentials), listeners (reverse ones, the CONNECT and WebSocket fronts: opened, closed,
moved, re-pointed), the certificates TLS listeners show (files read again: renewals), the
CONNECT front's allow-list and checks, the WebSocket front's origins and trusted proxies,
authentication (mode, passwords, tokens files, masked capabilities), timeouts, the cap on
connections, whether migrations are followed, and the management API's token. The rest is
set up once at start: the management front's address and TLS (its certificate too), the
largest message (the recording process reads up to it), and recording. Those keys are
named here so that a reload that changes them says they wait for a restart, instead of
silently doing nothing.

Pure: configs in, names and plans out.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import dataclass, fields
from typing import Any, Generic, TypeVar

from spicetap.config import Config

K = TypeVar("K", bound=Hashable)

# [proxy] keys read once at start; the others ([proxy] listen, upstream, auth, ...) reload
PROXY_AT_START = (
    "max_message",
    "management",
    "management_tls",
    "log_format",
)


# [recording] keys read once at start: the ring's size and the recording process's
# niceness. The others apply to sessions that begin after the reload; a directory given or
# taken away (recording started or stopped) waits for a restart too.
RECORDING_AT_START = (
    "max_backlog_mb",
    "nice",
)


def restart_needed(old: Config, new: Config) -> list[str]:
    """The keys that differ between the running config and the file's, and that only a
    restart applies, as "[section] key"."""
    names = [f"[proxy] {key}" for key in _differing(old.proxy, new.proxy, PROXY_AT_START)]
    if (old.recording.directory is None) != (new.recording.directory is None):
        names.append("[recording] directory")
    keys = _differing(old.recording, new.recording, RECORDING_AT_START)
    names += [f"[recording] {key}" for key in keys]
    return names


def _differing(old: Any, new: Any, keys: tuple[str, ...] | None = None) -> list[str]:
    names = keys if keys is not None else tuple(f.name for f in fields(old))
    return [name for name in names if getattr(old, name) != getattr(new, name)]


@dataclass(frozen=True)
class Plan(Generic[K]):
    """Listeners by key: which to open, which to stop, which to re-point."""

    open: list[K]
    stop: list[K]
    keep: list[K]


def plan(running: Mapping[K, object], wanted: Mapping[K, object]) -> Plan[K]:
    """Stop what is no longer wanted, open what is new, re-point the rest; in the order the
    config gives them (log lines then follow the file)."""
    return Plan(
        open=[k for k in wanted if k not in running],
        stop=[k for k in running if k not in wanted],
        keep=[k for k in wanted if k in running],
    )


@dataclass(frozen=True)
class TargetChanges:
    added: list[str]
    removed: list[str]
    changed: list[str]


def target_changes(old: Mapping[str, object], new: Mapping[str, object]) -> TargetChanges:
    """Targets by name, compared by their settings (sections of the config file)."""
    return TargetChanges(
        added=[n for n in new if n not in old],
        removed=[n for n in old if n not in new],
        changed=[n for n in new if n in old and old[n] != new[n]],
    )
