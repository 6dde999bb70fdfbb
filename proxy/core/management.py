"""The pure parts of the management API: routing, request validation, the sessions JSON and
the Prometheus text. No I/O, no clock: the shell (proxy/io/management.py) takes a snapshot
of the proxy's state, with wall-clock times already converted, and passes it in.

Sessions: SPICE groups a viewer's channel connections by connection id, but the main
channel links with connection id 0 and only learns the id from the server's MAIN INIT,
which the proxy's header-only guard does not decode. So a main channel joins its session
through the recorder's map (exact, from the INIT it dissected) when there is one, else by
a guess: the latest main channel from the same viewer host opened before the session's
first other channel (spice-gtk opens main, reads INIT, then opens the rest).
"""

from __future__ import annotations

import datetime
import hmac
import ipaddress
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, NamedTuple
from urllib.parse import parse_qsl

from dissectors.api import LINK, SPICE
from proxy.core.credentials import user_problem
from proxy.core.endpoint import endpoint_text
from proxy.core.lockout import IPV6_PREFIX, Entry, LockoutPolicy
from proxy.core.probe import check_password

DIRECTIONS = ("c2s", "s2c")
MAIN = LINK.enum_names["channel_type"]["MAIN"]
MAX_PROBE_TIMEOUT = 30.0  # seconds: an API request must stay short
DEFAULT_PROBE_TIMEOUT = 5.0

SESSION_PATH = "/api/sessions/"  # + a session's connectionId: that session
# path -> allowed methods
ROUTES = {
    "/api/sessions": ("GET", "DELETE"),
    SESSION_PATH + "{id}": ("DELETE",),
    "/api/spice/connect": ("POST",),
    "/api/tokens": ("POST",),
    "/api/reload": ("POST",),
    "/api/lockouts": ("GET", "DELETE"),
    "/metrics": ("GET",),
}


Headers = tuple[tuple[str, str], ...]


class HttpError(Exception):
    """A request we answer with an error status and a JSON {"error": message}."""

    def __init__(self, status: int, message: str, headers: Headers = ()) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers  # e.g. Allow for 405, WWW-Authenticate for 401


# -- authentication: a bearer token (RFC 6750) -------------------------------------------------
MIN_TOKEN = 16
# RFC 6750's b64token: what may follow "Bearer " in an Authorization header
_TOKEN = re.compile(r"[A-Za-z0-9._~+/-]+=*")
REALM = 'Bearer realm="spicetap"'


def token_problem(token: str) -> str | None:
    """Why `token` cannot be the API's bearer token, or None."""
    if len(token) < MIN_TOKEN:
        return f"a token needs at least {MIN_TOKEN} characters"
    if not _TOKEN.fullmatch(token):
        return "a token may hold only A-Z a-z 0-9 - . _ ~ + / (and = at its end)"
    return None


def authorize(authorization: bytes | None, token: bytes) -> None:
    """Let the request through if its Authorization header carries `token`; else HttpError
    401 with the challenge RFC 6750 asks for."""
    if authorization is None:
        raise HttpError(HTTPStatus.UNAUTHORIZED, "a bearer token is required", (
            ("www-authenticate", REALM),
        ))  # fmt: skip
    scheme, _, given = authorization.strip().partition(b" ")
    # compare_digest takes as long whatever the bytes, so timing does not reveal a prefix
    if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(), token):
        raise HttpError(HTTPStatus.UNAUTHORIZED, "wrong bearer token", (
            ("www-authenticate", f'{REALM}, error="invalid_token"'),
        ))  # fmt: skip


def route(method: str, target: str) -> str:
    """The path a request goes to; HttpError 404/405 when there is none."""
    path = target.split("?", 1)[0]
    if path.startswith(SESSION_PATH) and path != SESSION_PATH:
        path = SESSION_PATH + "{id}"
    methods = ROUTES.get(path)
    if methods is None:
        raise HttpError(HTTPStatus.NOT_FOUND, f"no such path: {path}")
    if method not in methods:
        allowed = ", ".join(methods)
        raise HttpError(
            HTTPStatus.METHOD_NOT_ALLOWED, f"{path} takes {allowed}", (("allow", allowed),)
        )
    return path


def _one_query(target: str, key: str, placeholder: str) -> str | None:
    """The value of `target`'s query `key=VALUE` (None without a query); HttpError 400 for
    any other query."""
    query = target.partition("?")[2]
    if not query:
        return None
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=True, max_num_fields=2)
    except ValueError:
        pairs = []
    if len(pairs) != 1 or pairs[0][0] != key:
        raise _bad(f"the query: expected {key}={placeholder}, and nothing else")
    return pairs[0][1]


def user_query(target: str) -> str | None:
    """NAME in /api/sessions?user=NAME (None without a query); HttpError 400 for any
    other query."""
    user = _one_query(target, "user", "NAME")
    if user is not None and (problem := user_problem(user)) is not None:
        raise _bad(f"user: {problem}")
    return user


def address_query(target: str) -> str | None:
    """ADDRESS in /api/lockouts?address=ADDRESS (None without a query): an IP address, or
    an IPv6 /64 as GET /api/lockouts lists it; HttpError 400 for anything else."""
    address = _one_query(target, "address", "ADDRESS")
    if address is None:
        return None
    try:
        if "/" in address:
            network = ipaddress.IPv6Network(address)
            if network.prefixlen != IPV6_PREFIX:
                raise ValueError(address)
        else:
            ipaddress.ip_address(address)
    except ValueError:
        raise _bad(f"address: {address[:60]!r} is no IP address (nor an IPv6 /64)") from None
    return address


def lockouts_json(
    entries: Sequence[Entry],
    policy: LockoutPolicy,
    counts: LockoutCounts,
    api: Sequence[Entry] = (),
) -> dict[str, Any]:
    """GET /api/lockouts: the viewer addresses locked out, and those with failures
    counted; `api`: the same for addresses sending this API wrong tokens."""
    return {
        "policy": {
            "failures": policy.failures,
            "window": policy.window,
            "duration": policy.duration,
        },
        "addresses": [_entry_json(e) for e in entries],
        "api": [_entry_json(e) for e in api],
        "totals": {
            "failures": counts.failures,
            "lockouts": counts.lockouts,
            "refused": counts.refused,
            "lockedNow": counts.locked_now,
        },
    }


def _entry_json(e: Entry) -> dict[str, Any]:
    left = math.ceil(e.locked_for)
    return {"address": e.address, "failures": e.failures, "locked": left > 0, "lockedFor": left}


def session_user(members: Iterable[ChannelView]) -> str | None:
    """Whose a session is: the user its channels' token names, if any."""
    return next((c.user for c in members if c.user is not None), None)


def session_id(target: str) -> int:
    """The connectionId in /api/sessions/ID (as GET /api/sessions gives it); HttpError
    404 when it is not one (SPICE's ids are 32-bit, never 0)."""
    text = target.split("?", 1)[0].removeprefix(SESSION_PATH)
    if not (text.isascii() and text.isdigit() and len(text) <= 10 and 0 < int(text) < 1 << 32):
        raise HttpError(HTTPStatus.NOT_FOUND, f"no such session: {text[:40]!r}")
    return int(text)


def error_body(message: str) -> bytes:
    return json.dumps({"error": message}).encode()


# -- POST /api/spice/connect -----------------------------------------------------------------
@dataclass(frozen=True)
class ConnectRequest:
    host: str
    port: int
    timeout: float = DEFAULT_PROBE_TIMEOUT
    tls: bool = False
    host_subject: str | None = None
    password: str | None = None


_CONNECT_KEYS = {"host", "port", "timeout", "tls", "hostSubject", "password"}


def _bad(message: str) -> HttpError:
    return HttpError(HTTPStatus.BAD_REQUEST, message)


def _json_dict(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: [[[[...
        raise _bad("the body is not JSON") from None
    if not isinstance(data, dict):
        raise _bad("the body must be a JSON object")
    return data


def _json_object(body: bytes, known: set[str]) -> dict[str, Any]:
    """A request's JSON object; HttpError 400 naming the problem. Unknown keys are refused:
    a misspelt key must not silently fall back to its default."""
    data = _json_dict(body)
    unknown = sorted(set(data) - known)
    if unknown:
        raise _bad(f"unknown key {unknown[0]!r} (known: {', '.join(sorted(known))})")
    return data


def _seconds(data: dict[str, Any], key: str, default: float, maximum: float) -> float:
    value = data.get(key, default)
    # NaN and infinity fail the range check too
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= maximum:
        raise _bad(f'"{key}" must be a number of seconds, above 0 and at most {maximum:g}')
    return float(value)


def parse_connect(body: bytes) -> ConnectRequest:
    """Validate a connect request's JSON body; HttpError 400 naming the problem (a
    misspelt "password" must not silently probe without one)."""
    data = _json_object(body, _CONNECT_KEYS)
    host, port = data.get("host"), data.get("port")
    if not isinstance(host, str) or not host_is_valid(host.strip("[]")):
        raise _bad('"host" must be a host name or address')
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port < 65536:
        raise _bad('"port" must be an integer from 1 to 65535')
    timeout = _seconds(data, "timeout", DEFAULT_PROBE_TIMEOUT, MAX_PROBE_TIMEOUT)
    tls = data.get("tls", False)
    if not isinstance(tls, bool):
        raise _bad('"tls" must be true or false')
    subject = data.get("hostSubject")
    if subject is not None and (not isinstance(subject, str) or not tls):
        raise _bad('"hostSubject" must be a string, and needs "tls": true')
    password = data.get("password")
    if password is not None and not isinstance(password, str):
        raise _bad('"password" must be a string')
    problem = check_password(password)
    if problem is not None:
        raise _bad(problem)
    return ConnectRequest(host.strip("[]"), port, timeout, tls, subject, password)


# -- POST /api/tokens ------------------------------------------------------------------------
DEFAULT_TOKEN_TTL = 120.0  # seconds to start the session (oVirt's console tickets: 120 s)
MAX_TOKEN_TTL = 7 * 24 * 3600.0
_MINT_KEYS = {"target", "ttl", "user"}


@dataclass(frozen=True)
class MintRequest:
    target: str | None  # None: the main upstream
    ttl: float = DEFAULT_TOKEN_TTL
    user: str | None = None  # whom the broker gives it to: its sessions say so


def parse_mint(body: bytes) -> MintRequest:
    """A token request's JSON body (empty: the defaults); HttpError 400 naming the
    problem."""
    if not body.strip():
        return MintRequest(None)
    data = _json_object(body, _MINT_KEYS)
    target = data.get("target")
    if target is not None and (not isinstance(target, str) or not target):
        raise _bad('"target" must be a target\'s name (or absent: the main upstream)')
    user = data.get("user")
    if user is not None:
        problem = user_problem(user) if isinstance(user, str) else "a user name is a string"
        if problem is not None:
            raise _bad(f'"user": {problem}')
    ttl = _seconds(data, "ttl", DEFAULT_TOKEN_TTL, MAX_TOKEN_TTL)
    return MintRequest(target, ttl, user)


def minted_json(
    token: str, target: str | None, expires: float, ttl: float, user: str | None = None
) -> dict[str, Any]:
    return {"token": token, "target": target, "expires": _iso(expires), "ttl": ttl, "user": user}


# -- POST /api/reload --------------------------------------------------------------------------


def parse_reload(body: bytes) -> None:
    """Nothing to ask: an empty body, or an empty JSON object."""
    if body.strip() and _json_dict(body):
        raise _bad("POST /api/reload takes no parameters: it re-reads the config file")


def host_is_valid(host: str) -> bool:
    """An IP address, or a name the resolver can be given as it is: no spaces or control
    characters (a NUL would cut it short), at most 253 characters, each label IDNA can
    encode."""
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        pass
    if not host or len(host) > 253 or any(c.isspace() or not c.isprintable() for c in host):
        return False
    try:
        host.encode("idna")
    except UnicodeError:
        return False
    return True


# -- snapshots of the proxy's state ----------------------------------------------------------
@dataclass(frozen=True)
class ChannelView:
    conn: int  # the proxy's connection number
    connection_id: int | None  # from the link message; None while it has not arrived
    channel_type: int | None
    channel_id: int
    viewer: tuple[str, int]
    upstream: str
    started: float  # wall clock, epoch seconds
    linked: bool
    bytes: Mapping[str, int]
    messages: Mapping[str, int]
    user: str | None = None  # inject: whom its token was given to, if it says
    forwarded_by: tuple[str, int] | None = None  # the proxy or balancer that named the viewer


def _address(address: tuple[str, int] | None) -> str | None:
    return None if address is None else endpoint_text(address)


class ConnectionCounts(NamedTuple):
    """Under a cap on connections (proxy/core/admission.py)."""

    open: int  # admitted and open now
    refused: int  # closed at once past the cap
    limit: int  # the cap
    sessions_refused: int  # new sessions refused in the reserve kept for running ones


class LockoutCounts(NamedTuple):
    """Failed authentications and lockouts (proxy/core/lockout.py), since start."""

    failures: int  # viewers' credentials refused, by spicetap or a server
    lockouts: int  # addresses locked out
    refused: int  # connections refused while their address was locked out
    locked_now: int


@dataclass(frozen=True)
class Totals:
    channels_open: int
    channels_total: int
    errors: int
    bytes: Mapping[str, int]  # every channel so far, open or closed
    messages: Mapping[str, int]
    connections: ConnectionCounts | None = None  # None: no cap
    lockout: LockoutCounts | None = None


@dataclass(frozen=True)
class RecorderView:
    backlog: int  # items waiting for room in the recording ring
    backlog_bytes: int  # relayed bytes among them (bounded by max_backlog)
    lost_bytes: int  # bytes not recorded because the worker fell behind
    failed: bool
    resumed: int = 0  # recording processes started again after a failure


def channel_name(channel_type: int | None) -> str | None:
    return None if channel_type is None else SPICE.channel_name(channel_type)


def group_sessions(
    channels: Iterable[ChannelView], known: Mapping[int, int] | None = None
) -> list[tuple[int | None, list[ChannelView]]]:
    """(connection id or None, channels) per session, oldest first. `known` maps a proxy
    connection number to its session id where that is known for sure (the recorder)."""
    known = known or {}
    by_id: dict[int, list[ChannelView]] = {}
    mains: list[ChannelView] = []
    alone: list[ChannelView] = []
    for ch in sorted(channels, key=lambda c: (c.started, c.conn)):
        sid = known.get(ch.conn) or ch.connection_id or None
        if sid is not None:
            by_id.setdefault(sid, []).append(ch)
        elif ch.channel_type == MAIN:
            mains.append(ch)
        else:
            alone.append(ch)  # still linking: nothing says where it belongs yet
    for members in sorted(by_id.values(), key=lambda group: group[0].started):
        if any(c.channel_type == MAIN for c in members):
            continue
        first = members[0]
        candidates = [
            m for m in mains if m.viewer[0] == first.viewer[0] and m.started <= first.started
        ]
        if candidates:
            main = candidates[-1]
            mains.remove(main)
            members.insert(0, main)
    groups: list[tuple[int | None, list[ChannelView]]] = list(by_id.items())
    groups += [(None, [ch]) for ch in mains + alone]
    groups.sort(key=lambda g: (g[1][0].started, g[1][0].conn))
    return groups


def _iso(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.UTC).isoformat(timespec="milliseconds")


def _both(values: Iterable[Mapping[str, int]]) -> dict[str, int]:
    out = dict.fromkeys(DIRECTIONS, 0)
    for v in values:
        for d in DIRECTIONS:
            out[d] += v.get(d, 0)
    return out


def _channel_json(ch: ChannelView) -> dict[str, Any]:
    return {
        "conn": ch.conn,
        "channel": channel_name(ch.channel_type),
        "channelType": ch.channel_type,
        "channelId": ch.channel_id,
        "viewer": _address(ch.viewer),
        "forwardedBy": _address(ch.forwarded_by),
        "upstream": ch.upstream,
        "started": _iso(ch.started),
        "linked": ch.linked,
        "bytes": dict(ch.bytes),
        "messages": dict(ch.messages),
    }


def sessions_json(
    channels: list[ChannelView],
    totals: Totals,
    known: Mapping[int, int] | None = None,
    user: str | None = None,
) -> dict[str, Any]:
    """GET /api/sessions: live sessions (`user`'s only, if named) with their channels and
    counters, plus totals (the proxy's). Directions: c2s is viewer to server, s2c server
    to viewer."""
    sessions = []
    grouped = group_sessions(channels, known)
    for sid, members in grouped:
        whose = session_user(members)
        if user is not None and whose != user:
            continue
        first = members[0]
        sessions.append(
            {
                "connectionId": sid,
                "user": whose,
                "viewer": _address(first.viewer),
                "forwardedBy": _address(first.forwarded_by),
                "upstream": first.upstream,
                "started": _iso(first.started),
                "bytes": _both(c.bytes for c in members),
                "messages": _both(c.messages for c in members),
                "channels": [_channel_json(c) for c in members],
            }
        )
    # a connection that has not sent its link message yet is listed on its own, but is no
    # session: counting each would make a viewer opening its channels look like several
    begun = sum(1 for sid, members in grouped if sid is not None or members[0].channel_type)
    return {
        "sessions": sessions,
        "totals": {
            "sessions": begun,
            "channelsOpen": totals.channels_open,
            "channelsTotal": totals.channels_total,
            "channelErrors": totals.errors,
            "bytes": dict(totals.bytes),
            "messages": dict(totals.messages),
        },
    }


# -- GET /metrics ----------------------------------------------------------------------------
def _number(value: float) -> str:
    if isinstance(value, int) or (math.isfinite(value) and value == int(value)):
        return str(int(value))
    return repr(float(value))


class _Metrics:
    """Prometheus text exposition format 0.0.4: HELP and TYPE once per family."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str) -> None:
        self.lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]

    def sample(self, name: str, value: float, **labels: str) -> None:
        if labels:
            inner = ",".join(f'{k}="{_label(v)}"' for k, v in labels.items())
            name = f"{name}{{{inner}}}"
        self.lines.append(f"{name} {_number(value)}")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


@dataclass(frozen=True)
class CertificateView:
    """A TLS front's certificate, as an operator's alerts watch it."""

    listener: str  # "KIND HOST:PORT"
    subject: str
    not_after: float  # Unix time


def metrics_text(
    channels: list[ChannelView],
    totals: Totals,
    recorder: RecorderView | None,
    rss_bytes: int | None,
    certificates: Sequence[CertificateView] = (),
) -> str:
    m = _Metrics()
    m.family("spicetap_channels_open", "gauge", "Channel connections being relayed now.")
    m.sample("spicetap_channels_open", totals.channels_open)
    m.family("spicetap_channels_total", "counter", "Channel connections relayed since start.")
    m.sample("spicetap_channels_total", totals.channels_total)
    m.family(
        "spicetap_channel_errors_total",
        "counter",
        "Channels that failed: upstream unreachable, TLS, protocol errors, limits.",
    )
    m.sample("spicetap_channel_errors_total", totals.errors)
    m.family(
        "spicetap_bytes_total",
        "counter",
        "Bytes delivered (and recorded); c2s is viewer to server.",
    )
    for d in DIRECTIONS:
        m.sample("spicetap_bytes_total", totals.bytes.get(d, 0), direction=d)
    m.family("spicetap_messages_total", "counter", "SPICE messages relayed after the link stage.")
    for d in DIRECTIONS:
        m.sample("spicetap_messages_total", totals.messages.get(d, 0), direction=d)
    m.family(
        "spicetap_channels_open_by_type",
        "gauge",
        "Open channel connections per channel type (linking: type not known yet).",
    )
    counts = dict.fromkeys([name for name, *_ in SPICE.channels.values()], 0)
    counts["linking"] = 0
    for ch in channels:
        key = channel_name(ch.channel_type) or "linking"
        counts[key] = counts.get(key, 0) + 1
    for name, count in counts.items():
        m.sample("spicetap_channels_open_by_type", count, channel=name)
    if totals.connections is not None:
        now, refused, limit, sessions_refused = totals.connections
        m.family(
            "spicetap_connections_open",
            "gauge",
            "Connections the listeners hold now (viewers, CONNECT and WebSocket clients).",
        )
        m.sample("spicetap_connections_open", now)
        m.family("spicetap_connections_limit", "gauge", "The most held at once.")
        m.sample("spicetap_connections_limit", limit)
        m.family(
            "spicetap_connections_refused_total",
            "counter",
            "Connections closed at once because the limit was reached.",
        )
        m.sample("spicetap_connections_refused_total", refused)
        m.family(
            "spicetap_sessions_refused_total",
            "counter",
            "New sessions refused in the connections kept for sessions already begun.",
        )
        m.sample("spicetap_sessions_refused_total", sessions_refused)
    if totals.lockout is not None:
        failures, lockouts, refused, locked_now = totals.lockout
        m.family(
            "spicetap_auth_failures_total",
            "counter",
            "Viewers' credentials refused (by spicetap's inject check or by a server).",
        )
        m.sample("spicetap_auth_failures_total", failures)
        m.family(
            "spicetap_lockouts_total", "counter", "Viewer addresses locked out after failures."
        )
        m.sample("spicetap_lockouts_total", lockouts)
        m.family(
            "spicetap_lockout_refused_total",
            "counter",
            "Connections refused because their address was locked out.",
        )
        m.sample("spicetap_lockout_refused_total", refused)
        m.family("spicetap_addresses_locked_out", "gauge", "Viewer addresses locked out now.")
        m.sample("spicetap_addresses_locked_out", locked_now)
    if recorder is not None:
        m.family(
            "spicetap_recorder_backlog", "gauge", "Items waiting for room in the recording ring."
        )
        m.sample("spicetap_recorder_backlog", recorder.backlog)
        m.family(
            "spicetap_recorder_backlog_bytes",
            "gauge",
            "Relayed bytes waiting for the recording process.",
        )
        m.sample("spicetap_recorder_backlog_bytes", recorder.backlog_bytes)
        m.family(
            "spicetap_recorder_lost_bytes_total",
            "counter",
            "Bytes relayed but not recorded because recording fell behind.",
        )
        m.sample("spicetap_recorder_lost_bytes_total", recorder.lost_bytes)
        m.family("spicetap_recorder_failed", "gauge", "1 when recording stopped on an error.")
        m.sample("spicetap_recorder_failed", int(recorder.failed))
        m.family(
            "spicetap_recorder_resumed_total",
            "counter",
            "Recording processes started again after one failed (a full disk, a crash).",
        )
        m.sample("spicetap_recorder_resumed_total", recorder.resumed)
    if certificates:
        m.family(
            "spicetap_tls_certificate_expiry_timestamp_seconds",
            "gauge",
            "When the certificate a TLS front shows viewers expires (Unix time).",
        )
        for cert in certificates:
            m.sample(
                "spicetap_tls_certificate_expiry_timestamp_seconds",
                cert.not_after,
                listener=cert.listener,
                subject=cert.subject,
            )
    if rss_bytes is not None:
        m.family("process_resident_memory_bytes", "gauge", "Resident memory size in bytes.")
        m.sample("process_resident_memory_bytes", rss_bytes)
    return m.text()
