"""The management HTTP API of `spicetap proxy` (h11 on trio; the pure parts live in
proxy/core/management.py):

    GET  /api/sessions        live sessions, their channels and counters, totals
                              (?user=NAME: that user's only)
    DELETE /api/sessions/ID   end a session (and revoke the viewer token it linked with)
    DELETE /api/sessions?user=NAME   end every session of that user
    POST /api/spice/connect   probe a SPICE server, as `spicetap probe --json` answers
    POST /api/tokens          mint a one-time viewer token (inject mode; needs the API token)
    POST /api/reload          re-read the config file (as SIGHUP does), say what changed
    GET  /api/lockouts        viewer addresses locked out after failed authentications
    DELETE /api/lockouts?address=ADDRESS   release one (without the query: every one)
    GET  /metrics             Prometheus text

One request per connection (answered with "Connection: close"): the API is small and
rarely called, and it keeps every connection's life bounded by one request timeout.

With a token every request must carry it (Authorization: Bearer, RFC 6750), checked as soon
as the request's head is in, before its body is read; a request without it gets 401 and
the refusals are logged, throttled. With TLS the API speaks HTTPS only, so the token does
not cross the network in clear. Without a token the API trusts whoever reaches it, and
`POST /api/spice/connect` opens connections where it is told: the CLI warns when such an
API listens beyond loopback.
"""

from __future__ import annotations

import json
import logging
import math
import os
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from http import HTTPStatus
from pathlib import Path
from typing import Any

import h11
import trio

from proxy.core.admission import Admission
from proxy.core.endpoint import endpoint_text
from proxy.core.framing import C2S, S2C
from proxy.core.http import MAX_HEAD, BoundedServer
from proxy.core.lockout import Lockout, LockoutPolicy, address_key
from proxy.core.management import (
    SESSION_PATH,
    CertificateView,
    ChannelView,
    ConnectionCounts,
    Headers,
    HttpError,
    LockoutCounts,
    RecorderView,
    Totals,
    address_query,
    authorize,
    error_body,
    group_sessions,
    lockouts_json,
    metrics_text,
    minted_json,
    parse_connect,
    parse_mint,
    parse_reload,
    route,
    session_id,
    session_user,
    sessions_json,
    user_query,
)
from proxy.core.probe import to_json
from proxy.core.throttle import LogThrottle
from proxy.fronts import Fronts
from proxy.io.guard import guarded
from proxy.io.probe import ProbeTarget, probe
from proxy.io.recording import RecordingSink
from proxy.io.reloading import Reloader, ReloadFailed
from proxy.io.server import ChannelStats, ProxyState, Serving, peer_address, serve_listening
from proxy.io.tokens import MintError, TokenDesk
from proxy.tls import client_context

log = logging.getLogger("spicetap.management")

# what an ended session's channels close with (their log lines, their archive)
SESSION_ENDED = "ended by the operator (management API)"
ENDING_WAIT = 5.0  # seconds; a channel a pump holds is ended by its ticker (every 0.5 s)

MAX_BODY = 64 * 1024
REQUEST_TIMEOUT = 10.0  # to receive a whole request
SEND_TIMEOUT = 10.0  # to hand over a response
# after it, what the client still sends is read and dropped for this long, up to this much
LINGER_SECONDS = 2.0
LINGER_BYTES = 16 << 20
MAX_PROBES = 4  # probes running at once; more wait their turn (within their timeout)
MAX_CONNECTIONS = 32  # API connections at once; more are closed at once
RECEIVE_SIZE = 16 * 1024
JSON = "application/json"
PROMETHEUS = "text/plain; version=0.0.4; charset=utf-8"


@dataclass(frozen=True)
class ManagementOptions:
    listen: tuple[str, int]
    tls: ssl.SSLContext | None = None  # how probes with "tls": true check the server
    token: bytes | None = field(default=None, repr=False)  # None: no authentication
    https: ssl.SSLContext | None = None  # serve the API over TLS with this context


@dataclass(frozen=True)
class Reply:
    status: int
    body: bytes
    content_type: str = JSON
    headers: Headers = ()


class ManagementApi:
    def __init__(
        self,
        options: ManagementOptions,
        state: ProxyState,
        recorder: RecordingSink | None,
        tokens: TokenDesk | None = None,
        reloader: Reloader | None = None,
    ) -> None:
        self.options = options
        self.state = state
        self.recorder = recorder
        self.tokens = tokens
        self.reloader = reloader
        self.probes = trio.CapacityLimiter(MAX_PROBES)
        self.refusals = LogThrottle()  # requests without the token
        # addresses that keep sending wrong tokens, apart from viewers' (an operator whose
        # viewer is locked out may still release it here); the viewers' policy
        policy = state.lockout.policy if state.lockout is not None else LockoutPolicy()
        self.guesses = Lockout(policy)

    # -- snapshots -------------------------------------------------------------------------
    def channels(self) -> list[ChannelView]:
        offset = time.time() - time.monotonic()  # ChannelStats times are monotonic
        views = []
        for stats in list(self.state.channels.values()):
            relay, guard = stats.relay, stats.relay.guard
            views.append(
                ChannelView(
                    conn=stats.conn,
                    connection_id=guard.connection_id if guard.channel_type is not None else None,
                    channel_type=guard.channel_type,
                    channel_id=guard.channel_id,
                    viewer=stats.viewer,
                    upstream=stats.upstream,
                    started=stats.started + offset,
                    linked=relay.linked,
                    bytes=dict(relay.bytes),
                    messages=dict(relay.messages),
                    user=relay.user,
                    forwarded_by=stats.forwarded_by,
                )
            )
        return views

    def totals(self, channels: list[ChannelView]) -> Totals:
        s = self.state
        return Totals(
            channels_open=len(channels),
            channels_total=s.total_channels,
            errors=s.errors,
            bytes={d: s.closed_bytes[d] + sum(c.bytes[d] for c in channels) for d in (C2S, S2C)},
            messages={
                d: s.closed_messages[d] + sum(c.messages[d] for c in channels) for d in (C2S, S2C)
            },
            connections=None
            if (a := s.admission) is None
            else ConnectionCounts(a.open, a.refused, a.limit, a.sessions_refused),
            lockout=None if s.lockout is None else self.lockout_counts(),
        )

    def lockout_counts(self) -> LockoutCounts:
        lockout = self.state.lockout
        assert lockout is not None
        now = time.monotonic()
        return LockoutCounts(
            lockout.failures_total,
            lockout.lockouts_total,
            lockout.refused_total,
            lockout.locked_count(now),
        )

    def known_sessions(self) -> dict[int, int]:
        """Connection -> session id, as the recorder learnt it from MAIN INIT."""
        if self.recorder is None:
            return {}
        mapping = dict(self.recorder.conn_session)  # one C-level copy: safe across threads
        return {conn: key for conn, key in mapping.items() if isinstance(key, int)}

    def certificates(self) -> list[CertificateView]:
        if self.reloader is None:
            return []
        shown = self.reloader.listeners.certificates()
        own = self.reloader.fronts.management_tls
        if own is not None and self.options.https is not None:
            shown.append(("management {}:{}".format(*self.options.listen), own))
        return [
            CertificateView(where, cert.subject, cert.not_after.timestamp())
            for where, cert in shown
        ]

    def recorder_view(self) -> RecorderView | None:
        rec = self.recorder
        if rec is None:
            return None
        return RecorderView(
            rec.backlog_items,
            rec.backlog_bytes,
            rec.lost_total,
            rec.failed is not None,
            rec.resumed,
        )

    # -- requests --------------------------------------------------------------------------
    async def answer(self, method: str, target: str, body: bytes) -> Reply:
        path = route(method, target)
        if path == "/api/sessions":
            user = user_query(target)
            if method == "DELETE":
                if user is None:
                    raise HttpError(
                        HTTPStatus.BAD_REQUEST,
                        "name a session (/api/sessions/ID) or a user (/api/sessions?user=NAME)",
                    )
                return await self.end_user_sessions(user)
            channels = self.channels()
            data = sessions_json(channels, self.totals(channels), self.known_sessions(), user)
            return Reply(HTTPStatus.OK, json.dumps(data).encode())
        if path == SESSION_PATH + "{id}":
            return await self.end_session(session_id(target))
        if path == "/metrics":
            channels = self.channels()
            totals, certificates = self.totals(channels), self.certificates()
            text = metrics_text(channels, totals, self.recorder_view(), _rss_bytes(), certificates)
            return Reply(HTTPStatus.OK, text.encode(), PROMETHEUS)
        if path == "/api/tokens":
            return self.mint(body)
        if path == "/api/reload":
            return await self.reload(body)
        if path == "/api/lockouts":
            return self.lockouts(method, address_query(target))
        request = parse_connect(body)
        tls = None
        if request.tls:
            tls = self.options.tls or client_context(None, insecure=False, keylog=None)
        deadline = trio.current_time() + request.timeout  # for the wait and the probe
        try:  # a free slot is taken at once, however short the timeout
            self.probes.acquire_nowait()
        except trio.WouldBlock:
            with trio.move_on_at(deadline) as waited:
                await self.probes.acquire()
            if waited.cancelled_caught:
                raise HttpError(HTTPStatus.SERVICE_UNAVAILABLE, "too many probes running") from None
        target_ = ProbeTarget(
            request.host,
            request.port,
            password=request.password,
            tls=tls,
            host_subject=request.host_subject,
            timeout=max(deadline - trio.current_time(), 0.0),
        )
        try:
            outcome = await probe(target_)
        finally:
            self.probes.release()
        where = endpoint_text((request.host, request.port))
        log.info("probe %s: %s", where, outcome.error or "link ok")
        return Reply(
            HTTPStatus.OK, json.dumps(to_json(request.host, request.port, outcome)).encode()
        )

    async def end_session(self, sid: int) -> Reply:
        """DELETE /api/sessions/ID: every channel of the session is closed, its archive
        saying why, and the viewer token it linked with revoked (inject mode); 200 once
        they are gone ("success" false when one outlasted the wait), 404 when there is no
        such session."""
        grouped = group_sessions(self.channels(), self.known_sessions())
        members = next((m for s, m in grouped if s == sid), None)
        if members is None:
            raise HttpError(HTTPStatus.NOT_FOUND, f"no session {sid} (GET /api/sessions)")
        (data,) = await self._end_sessions([(sid, members)])
        return Reply(HTTPStatus.OK, json.dumps(data).encode())

    async def end_user_sessions(self, user: str) -> Reply:
        """DELETE /api/sessions?user=NAME: every session whose token names that user, as
        DELETE /api/sessions/ID ends one (none is no error: the user is out)."""
        grouped = group_sessions(self.channels(), self.known_sessions())
        picked = [(s, m) for s, m in grouped if session_user(m) == user]
        ended = await self._end_sessions(picked)
        data = {"success": all(e["success"] for e in ended), "user": user, "sessions": ended}
        return Reply(HTTPStatus.OK, json.dumps(data).encode())

    async def _end_sessions(
        self, sessions: list[tuple[int | None, list[ChannelView]]]
    ) -> list[dict[str, Any]]:
        """End these sessions together, each answered as DELETE /api/sessions/ID is (a
        session still without its id: None)."""
        ending: list[tuple[int | None, list[int], list[ChannelStats], int]] = []
        for sid, members in sessions:
            conns = [ch.conn for ch in members]
            stats = [st for conn in conns if (st := self.state.channels.get(conn))]
            # first, so that no channel links with it as the session goes (inject mode)
            tokens = [t for st in stats if (t := st.relay.token) is not None]
            revoked = self.tokens.revoke(tokens) if self.tokens is not None else 0
            user = session_user(members)
            fields = {
                "event": "session_ended", "session": sid, "channels": len(conns),
                "tokens_revoked": revoked, "user": user,
            }  # fmt: skip
            log.info(
                "management API: ending session %s (%s%d channel(s)%s) at the operator's "
                "request",
                sid, f"user {user}, " if user is not None else "", len(conns),
                ", its token revoked" if revoked else "", extra={"fields": fields},
            )  # fmt: skip
            ending.append((sid, conns, stats, revoked))
        # each marked first: the server, seeing the main channel go, may close the others
        # before they are ended here, and that is this end too
        marked = [st for _sid, _conns, stats, _revoked in ending for st in stats]
        for st in marked:
            st.relay.ending = SESSION_ENDED
        for st in marked:
            st.end(SESSION_ENDED)
        every = [conn for _sid, conns, _stats, _revoked in ending for conn in conns]
        for _ in range(round(ENDING_WAIT / 0.05)):  # a poll, bounded: the pumps are threads
            if not any(conn in self.state.channels for conn in every):
                break
            await trio.sleep(0.05)
        answers = []
        for sid, conns, _stats, revoked in ending:
            still = [conn for conn in conns if conn in self.state.channels]
            answers.append({
                "success": not still, "connectionId": sid, "channels": conns, "open": still,
                "tokensRevoked": revoked,
            })  # fmt: skip
        return answers

    def mint(self, body: bytes) -> Reply:
        """POST /api/tokens. Minting hands out access to a VM, so the API must have a token
        of its own: without one, whoever reaches it could mint."""
        if self.options.token is None:
            raise HttpError(
                HTTPStatus.FORBIDDEN,
                "minting viewer tokens needs the API's own token (management_token_file)",
            )
        request = parse_mint(body)
        if self.tokens is None:
            raise HttpError(HTTPStatus.CONFLICT, "no route injects credentials (auth inject)")
        try:
            minted = self.tokens.mint(request.target, request.ttl, request.user)
        except MintError as exc:
            status = {
                "unknown": HTTPStatus.NOT_FOUND,
                "not_inject": HTTPStatus.CONFLICT,
                "full": HTTPStatus.SERVICE_UNAVAILABLE,
            }[exc.kind]
            raise HttpError(status, str(exc)) from None
        data = minted_json(minted.token, request.target, minted.expires, minted.ttl, request.user)
        return Reply(HTTPStatus.CREATED, json.dumps(data).encode(), headers=(
            ("cache-control", "no-store"),  # a credential: no cache keeps it
        ))  # fmt: skip

    def lockouts(self, method: str, address: str | None) -> Reply:
        """GET /api/lockouts: addresses locked out or with failures counted (`address`'s
        only, if named); DELETE: release `address` (or every address), 200 saying which
        were locked."""
        lockout = self.state.lockout
        if lockout is None:
            raise HttpError(HTTPStatus.CONFLICT, "no lockout in this proxy")
        if method == "DELETE":
            released = sorted({*lockout.release(address), *self.guesses.release(address)})
            fields = {"event": "lockout_released", "addresses": released}
            log.info(
                "management API: %s released from lockout",
                ", ".join(released) or "no locked address", extra={"fields": fields},
            )  # fmt: skip
            data = {"success": True, "released": released}
            return Reply(HTTPStatus.OK, json.dumps(data).encode())
        now = time.monotonic()
        entries, api = lockout.entries(now), self.guesses.entries(now)
        if address is not None:
            key = address_key(address)
            entries = [e for e in entries if e.address == key]
            api = [e for e in api if e.address == key]
        data = lockouts_json(entries, lockout.policy, self.lockout_counts(), api)
        return Reply(HTTPStatus.OK, json.dumps(data).encode())

    async def reload(self, body: bytes) -> Reply:
        """POST /api/reload: 200 with what changed ("success" false when a listener could
        not be opened), 422 when the file cannot be used (nothing changed), 409 without
        a config file."""
        parse_reload(body)
        if self.reloader is None or not self.reloader.reloadable:
            raise HttpError(HTTPStatus.CONFLICT, "no --config file to re-read")
        log.info("management API: reloading %s", self.reloader.config_path)
        try:
            report = await self.reloader.reload()
        except ReloadFailed as exc:
            log.error("reload failed, the running config stays: %s", exc)
            raise HttpError(HTTPStatus.UNPROCESSABLE_ENTITY, str(exc)) from None
        return Reply(HTTPStatus.OK, json.dumps(report.json()).encode())

    def reconfigure(self, fronts: Fronts) -> None:
        """After a reload: the token file as it now reads (rotated, added or removed), and
        the lockout's settings."""
        self.guesses.policy = fronts.lockout
        token = fronts.api_token
        if token == self.options.token:
            return
        self.options = replace(self.options, token=token)
        if token is not None:  # never the token itself
            log.info("management API: its token changed; requests need the new one")
            return
        log.warning(
            "management API on %s: no token any more, whoever reaches it is answered",
            endpoint_text(self.options.listen),
        )

    def authorize(self, request: h11.Request, client: tuple[str, int]) -> None:
        """HttpError 401 unless the request carries the token (when there is one); 429
        from an address locked out for sending wrong ones (proxy/core/lockout.py)."""
        token = self.options.token
        if token is None:
            return
        now = time.monotonic()
        left = math.ceil(self.guesses.locked_for(client[0], now))
        if left:
            raise HttpError(
                HTTPStatus.TOO_MANY_REQUESTS,
                f"too many wrong tokens from {address_key(client[0])}: try again in {left} s",
                (("retry-after", str(left)),),
            )
        given = dict(request.headers).get(b"authorization")
        try:
            authorize(given, token)
        except HttpError as exc:
            if given is not None:  # a wrong token (none at all is no guess)
                self._guessed(client[0], now)
            self.refusals.happened()
            count = self.refusals.to_log(trio.current_time())
            if count:
                log.warning(
                    "management API: %d request(s) refused (%s), the last from %s",
                    count, exc.message, endpoint_text(client),
                )  # fmt: skip
            raise

    def _guessed(self, host: str, now: float) -> None:
        locked = self.guesses.failed(host, now)
        if locked is not None:
            fields = {"event": "api_locked_out", "address": locked.address}
            log.warning(
                "management API: address %s locked out for %g s: %d wrong tokens within %g s",
                locked.address, locked.seconds, locked.failures, self.guesses.policy.window,
                extra={"fields": fields},
            )  # fmt: skip

    def https(self) -> ssl.SSLContext | None:
        """What a new connection is served with: None for plain HTTP (as the proxy
        started), else the certificate as the last reload or renewal left it."""
        if self.options.https is None:
            return None
        latest = self.reloader.fronts.management_tls if self.reloader is not None else None
        return latest.context if latest is not None else self.options.https

    async def handle(self, stream: trio.abc.Stream) -> None:
        client = peer_address(stream)
        https = self.https()
        if https is not None:
            # https_compatible: HTTP clients may hang up without TLS's close_notify
            stream = trio.SSLStream(stream, https, server_side=True, https_compatible=True)
        conn = BoundedServer()
        method = ""
        try:
            try:
                with trio.fail_after(REQUEST_TIMEOUT):
                    method, target, body = await _read_request(
                        stream, conn, lambda request: self.authorize(request, client)
                    )
                reply = await self.answer(method, target, body)
            except HttpError as exc:
                reply = Reply(exc.status, error_body(exc.message), headers=exc.headers)
            except h11.RemoteProtocolError as exc:
                reply = Reply(exc.error_status_hint, error_body(f"bad request: {exc}"))
            except trio.TooSlowError:
                reply = Reply(HTTPStatus.REQUEST_TIMEOUT, error_body("request too slow"))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                raise  # the client went away: nothing to answer (below)
            except Exception:  # a bug here must cost one request, never the proxy
                log.exception("management request failed")
                reply = Reply(HTTPStatus.INTERNAL_SERVER_ERROR, error_body("internal error"))
            with trio.fail_after(SEND_TIMEOUT):
                await _send_reply(stream, conn, reply, head_only=method == "HEAD")
            await _linger(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError):
            pass  # the client went away or stopped reading: nothing left to tell it
        finally:
            await trio.aclose_forcefully(stream)


async def _linger(stream: trio.abc.Stream) -> None:
    """After the reply: stop sending, and read what the client still sends until it closes
    (bounded: LINGER_SECONDS, LINGER_BYTES). Closing with its bytes unread would reset the
    connection, and a client still sending a body refused with 413 would see the reset,
    not the answer."""
    if not isinstance(stream, trio.abc.HalfCloseableStream):
        return
    await stream.send_eof()
    drained = 0
    with trio.move_on_after(LINGER_SECONDS):
        while drained < LINGER_BYTES:
            data = await stream.receive_some(RECEIVE_SIZE)
            if not data:
                break
            drained += len(data)


async def _read_request(
    stream: trio.abc.Stream, conn: BoundedServer, check: Callable[[h11.Request], None]
) -> tuple[str, str, bytes]:
    """One whole request (method, target, body); the body bounded by MAX_BODY. `check`
    sees the head first and raises HttpError to refuse the request before its body."""
    request: h11.Request | None = None
    body = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive_some(RECEIVE_SIZE)
            conn.receive_data(bytes(data))  # b"" is EOF: h11 then says what is missing
            continue
        if isinstance(event, h11.Request):
            if conn.head_too_big():
                raise HttpError(
                    HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, f"head over {MAX_HEAD} bytes"
                )
            request = event
            check(event)
            length = dict(event.headers).get(b"content-length")
            if length is not None and int(length) > MAX_BODY:  # h11 checked it is a number
                raise HttpError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body over {MAX_BODY} bytes")
            if conn.they_are_waiting_for_100_continue:  # curl's Expect: 100-continue
                interim = h11.InformationalResponse(status_code=100, headers=[])
                await stream.send_all(conn.send(interim) or b"")
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > MAX_BODY:
                raise HttpError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body over {MAX_BODY} bytes")
        elif isinstance(event, h11.EndOfMessage) and request is not None:
            return request.method.decode(), request.target.decode("ascii", "replace"), bytes(body)
        elif isinstance(event, h11.ConnectionClosed):
            raise trio.BrokenResourceError("the client closed before a whole request")


async def _send_reply(
    stream: trio.abc.Stream, conn: h11.Connection, reply: Reply, head_only: bool = False
) -> None:
    """The reply; to a HEAD request its headers only (h11 refuses a body there, and the
    client got nothing at all)."""
    headers: list[tuple[str, str]] = [
        ("content-type", reply.content_type),
        ("content-length", str(len(reply.body))),
        ("connection", "close"),
        ("cache-control", "no-store"),
    ]
    headers += reply.headers
    try:
        phrase = HTTPStatus(reply.status).phrase.encode()
        data = conn.send(h11.Response(status_code=reply.status, headers=headers, reason=phrase))
        if not head_only:
            data = (data or b"") + (conn.send(h11.Data(data=reply.body)) or b"")
        data += conn.send(h11.EndOfMessage()) or b""
    except h11.LocalProtocolError:
        return  # h11 cannot answer in this state (e.g. a response already began)
    await stream.send_all(data)


def _rss_bytes() -> int | None:
    """Resident set size now (Linux /proc; None elsewhere)."""
    try:
        resident_pages = int(Path("/proc/self/statm").read_bytes().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


async def serve_management(
    options: ManagementOptions,
    state: ProxyState,
    recorder: RecordingSink | None,
    tokens: TokenDesk | None = None,
    reloader: Reloader | None = None,
    task_status: trio.TaskStatus[Serving] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen on options.listen and answer API requests until cancelled."""
    api = ManagementApi(options, state, recorder, tokens, reloader)
    if reloader is not None:
        reloader.on_applied.append(api.reconfigure)
    host, port = options.listen
    listeners = await trio.open_tcp_listeners(port, host=host)
    # Its own cap, apart from --max-connections: an idle client holds its connection up
    # to REQUEST_TIMEOUT, and uncounted, a few hundred of them used up the open files the
    # channels need (admission.RESERVED_FILES keeps room for these)
    handle = guarded(api.handle, "management API", _ApiConnections(), "the API's own")
    await serve_listening(listeners, handle, task_status)


@dataclass
class _ApiConnections:
    errors: int = 0
    admission: Admission | None = field(
        default_factory=lambda: Admission(MAX_CONNECTIONS, reserve=0)
    )
