"""`spicetap proxy`: a transparent recording proxy in front of a SPICE server."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import math
import os
import signal
import sys
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import trio

from proxy import logs
from proxy.core import framing
from proxy.core.admission import Admission
from proxy.core.endpoint import listen_text
from proxy.core.lockout import Lockout
from proxy.core.relay import MAIN, Limits
from proxy.fronts import Fronts, build_fronts, named, pick
from proxy.io import ends
from proxy.io.certwatch import keep_certificates_current
from proxy.io.guard import connection_limit, raise_open_files_limit
from proxy.io.management import ManagementOptions, serve_management
from proxy.io.recording import STOP_TIMEOUT, Recorder, RecordingSink
from proxy.io.reloading import (
    CONNECT_FRONT,
    FrontListeners,
    Rebuild,
    Reloader,
    announce,
    listener_kind,
)
from proxy.io.resuming import ResumingRecorder
from proxy.io.sdnotify import ServiceManager
from proxy.io.server import ChannelProxy, ProxyState
from proxy.io.tokens import TokenDesk
from proxy.linksetup import add_link_options
from proxy.recorder import BACKLOG_POLICIES
from proxy.recording_options import recording_options
from proxy.targets import host_port
from proxy.tls import TlsSetupError, client_context
from proxy.viewer_certs import ViewerCertificate
from spicetap import interrupts
from spicetap.archive.keys import load_or_create_signing_key
from spicetap.config import Config, ConfigError, ProxySection, load_config
from spicetap.errors import UserError

GIL_SWITCH_INTERVAL = 100e-6  # seconds


def add_proxy_command(sub: Any) -> None:
    from spicetap.cli_inspect import add_privacy_options

    p = sub.add_parser("proxy", help="run the recording proxy in front of a SPICE server")
    p.add_argument(
        "--config",
        type=_nonempty,
        help="TOML file (see config/spicetap.example.toml), read again on SIGHUP or "
        "POST /api/reload: targets, listeners, allow-list and authentication change for "
        "new connections",
    )
    p.add_argument(
        "--listen", type=_nonempty, help="HOST:PORT viewers connect to (default 127.0.0.1:5900)"
    )
    p.add_argument("--upstream", type=_nonempty, help="HOST:PORT of the SPICE server")
    p.add_argument(
        "--proxy-protocol-from",
        action="append",
        default=[],
        metavar="NETWORK",
        help="a load balancer (an address or network: 10.0.0.0/8) in front of the reverse "
        "listeners, the WebSocket or the CONNECT front, whose connections begin with a PROXY "
        "protocol header (v1 or v2) naming the viewer; required from it (repeatable)",
    )
    p.add_argument(
        "--record", type=_nonempty, metavar="DIR", help="write one archive per session into DIR"
    )
    p.add_argument("--compress", action="store_true", default=None, help="zstd-compress archives")
    p.add_argument(
        "--flush-interval",
        type=_flush_seconds,
        help="seconds a record may wait before reaching the disk (loss window)",
    )
    p.add_argument(
        "--backlog",
        choices=BACKLOG_POLICIES,
        help="when recording falls behind: mark a gap and keep forwarding (gap), "
        "or close the session (close)",
    )
    p.add_argument(
        "--max-backlog",
        type=_positive_mb,
        metavar="MB",
        help="relayed MiB held for recording before the backlog policy applies (default 512)",
    )
    t = p.add_argument_group("TLS (either leg may be plain or TLS)")
    t.add_argument("--tls-listen", type=_nonempty, help="HOST:PORT where viewers connect with TLS")
    t.add_argument("--upstream-tls", type=_nonempty, help="HOST:PORT of the server's TLS port")
    t.add_argument(
        "--tls-subject",
        type=_nonempty,
        help="subject of the certificate spicetap presents, e.g. "
        "'C=XX,O=Example,CN=host' (default: O=spicetap,CN=<listen host>)",
    )
    t.add_argument(
        "--tls-cert",
        type=_nonempty,
        help="PEM certificate chain to present instead of one issued by spicetap's own CA",
    )
    t.add_argument("--tls-key", type=_nonempty, help="PEM private key of --tls-cert")
    t.add_argument(
        "--upstream-ca", type=_nonempty, help="CA file that signed the server's certificate"
    )
    t.add_argument(
        "--upstream-host-subject", type=_nonempty, help="subject the server's certificate must have"
    )
    t.add_argument(
        "--upstream-insecure",
        action="store_true",
        help="do not check the server's certificate at all",
    )
    c = p.add_argument_group("HTTP CONNECT front (remote-viewer --spice-proxy=http://HOST:PORT)")
    c.add_argument("--connect-listen", type=_nonempty, help="HOST:PORT of the CONNECT front")
    c.add_argument(
        "--allow",
        action="append",
        default=[],
        metavar="HOST:PORT",
        help="a target viewers may CONNECT to (repeatable): HOST a name, IP or CIDR; "
        "PORT a number, N-M or *; configured targets are always allowed",
    )
    w = p.add_argument_group("WebSocket front (spice-html5 in a browser, no websockify)")
    w.add_argument(
        "--ws-listen",
        type=_nonempty,
        help="HOST:PORT serving spice-html5's page and one WebSocket per SPICE channel",
    )
    w.add_argument(
        "--ws-tls",
        action="store_true",
        default=None,  # not given: [proxy] ws_tls decides
        help="wss:// and https:// on --ws-listen, with the certificate --tls-listen would use",
    )
    w.add_argument(
        "--ws-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="a web page origin (https://portal.example:8443) allowed to open spicetap's "
        "WebSockets besides spicetap's own page (repeatable; * allows any)",
    )
    w.add_argument(
        "--ws-trusted-proxy",
        action="append",
        default=[],
        metavar="NETWORK",
        help="a reverse proxy (an address or network: 10.0.0.0/8) in front of --ws-listen "
        "whose Forwarded or X-Forwarded-For header names the browser (repeatable)",
    )
    t.add_argument(
        "--keylog",
        type=_nonempty,
        help="append TLS secrets of both legs here (SSLKEYLOGFILE format, for Wireshark)",
    )
    p.add_argument(
        "--no-follow-migration",
        dest="follow_migration",
        action="store_false",
        default=None,
        help="let viewers follow a live migration straight to the new host (unrecorded); "
        "by default spicetap rewrites the migration messages and follows the server itself",
    )
    p.add_argument("--link-timeout", type=_positive_seconds)
    p.add_argument("--idle-timeout", type=_positive_seconds)
    p.add_argument("--max-message", type=_positive_bytes, help="bytes")
    p.add_argument(
        "--max-connections",
        type=_positive_connections,
        metavar="N",
        help="viewer connections served at once (each SPICE session opens several); past "
        "it new ones are closed at once. Default: what the open-files limit allows",
    )
    p.add_argument(
        "--lockout-failures",
        type=_failures,
        metavar="N",
        help="lock a viewer address out after N failed authentications (a wrong password "
        "or token, refused by spicetap or the server) within --lockout-window; its links "
        "are then refused for --lockout-seconds. 0: never. Default 10",
    )
    p.add_argument("--lockout-window", type=_positive_seconds, metavar="SECONDS")
    p.add_argument("--lockout-seconds", type=_positive_seconds, metavar="SECONDS")
    p.add_argument(
        "--management",
        type=_nonempty,
        metavar="HOST:PORT",
        help="serve the management HTTP API (sessions, probes, /metrics) here; without "
        "--management-token-file anyone who reaches it may use it: keep it on loopback",
    )
    p.add_argument(
        "--management-token-file",
        metavar="FILE",
        help="the API then wants 'Authorization: Bearer TOKEN', TOKEN being this file's "
        "first line (at least 16 characters; e.g. openssl rand -hex 32 > FILE)",
    )
    p.add_argument(
        "--management-tls",
        action="store_true",
        default=None,
        help="serve the API over HTTPS, with the viewer certificate (--tls-cert, or one "
        "from spicetap's CA for the API's address)",
    )
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument(
        "--log-format",
        choices=logs.FORMATS,
        help="log lines as text (default) or one JSON object each, with the event's fields "
        "(channel, viewer, upstream, bytes...) for a log shipper",
    )
    add_link_options(p)
    add_privacy_options(p)
    p.add_argument(
        "--sasl-user",
        action="store_true",
        help="read from SASL logins the user name each viewer gives (never its password) "
        "and name it in logs, the API and archives ([recording.privacy] sasl_user)",
    )
    p.set_defaults(func=cmd_proxy)


def _seconds(text: str, *, zero: bool = False) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero):
        want = "a number of seconds, 0 or more" if zero else "a positive number of seconds"
        raise argparse.ArgumentTypeError(f"{text!r}: expected {want}")
    return value


def _positive_seconds(text: str) -> float:
    return _seconds(text)


def _flush_seconds(text: str) -> float:
    return _seconds(text, zero=True)  # 0: every record is written at once


def _positive_int(text: str, unit: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a positive number of {unit}")
    return value


def _positive_bytes(text: str) -> int:
    return _positive_int(text, "bytes")


def _positive_mb(text: str) -> int:
    return _positive_int(text, "MiB")


def _positive_connections(text: str) -> int:
    return _positive_int(text, "connections")


def _failures(text: str) -> int:
    if text.strip() == "0":
        return 0
    return _positive_int(text, "failures, or 0")


def _nonempty(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a value, got an empty one")
    return text


def cmd_proxy(args: argparse.Namespace) -> int:
    try:
        config = load_config(Path(args.config)) if args.config else Config()
    except ConfigError as exc:
        raise UserError(str(exc)) from None
    log_format = pick(args.log_format, config.proxy.log_format)
    if log_format not in logs.FORMATS:
        where = named(args, "log_format", "proxy", "log_format")
        raise UserError(f"{where} {log_format!r}: expected one of {', '.join(logs.FORMATS)}")
    logs.configure(logging.DEBUG if args.verbose else logging.INFO, log_format)
    if framing.WITHOUT_C is not None:
        logging.getLogger("spicetap.proxy").warning(
            "the C framer is not built (%s): recording frames in Python, several times "
            "slower on small messages; reinstall with gcc and python3-dev",
            framing.WITHOUT_C,
        )
    if ends.WITHOUT_C is not None:
        logging.getLogger("spicetap.proxy").warning(
            "the C forwarder is not built (%s): channels forward in Python, adding "
            "latency; reinstall with gcc, python3-dev and libssl-dev",
            ends.WITHOUT_C,
        )
    elif ends.TLS_WITHOUT_C is not None:
        logging.getLogger("spicetap.proxy").warning(
            "TLS channels forward in Python, more slowly: %s", ends.TLS_WITHOUT_C
        )
    cp, cr = config.proxy, config.recording
    keylog = Path(args.keylog) if args.keylog else None
    if keylog is not None:
        try:  # OpenSSL opens it at the first handshake: a bad path is said now, by its flag
            with keylog.open("a"):
                pass
        except OSError as exc:
            raise UserError(f"--keylog {args.keylog}: {exc.strerror or exc}") from None
    # the management API may mint viewer tokens when it has a token of its own
    mintable = all(
        pick(getattr(args, dest), getattr(cp, dest))
        for dest in ("management", "management_token_file")
    )
    # caps to clear, auth mode (secrets never logged), targets, what each listener serves
    fronts = build_fronts(args, config, keylog, mintable)
    link_policy = fronts.link_policy
    limits = fronts.limits
    management = _management(args, cp, fronts.api_token, fronts.management_tls)
    # systemd's variables are this process's alone: the recording process does not
    # inherit them (sd_notify(3)'s unset_environment)
    service = ServiceManager()
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        os.environ.pop(name, None)
    recorder = None
    options = recording_options(args, cr, limits.max_message)
    fronts = replace(fronts, recording=options)
    # before the recording process starts: it inherits the raised limit (an archive per
    # session open at once)
    admission = _admission(fronts.max_connections)
    if options is not None:
        # each session adds how it came in (insertion, upstream, target); each connection's
        # open record says which legs were TLS
        meta = {"viewer": None, **link_policy.describe()}  # auth mode, masked caps
        try:
            key = load_or_create_signing_key()
        except (OSError, ValueError) as exc:
            raise UserError(f"signing key: {exc}") from None
        try:
            make = partial(Recorder, meta=meta, signing_key=key)
            recorder = ResumingRecorder(make, options)
        except (OSError, OverflowError) as exc:  # a file size limit (ulimit -f), or absurd
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else "too large"
            raise UserError(
                f"recording: cannot make its {options.max_backlog >> 20} MiB backlog ring "
                f"in shared memory ({named(args, 'max_backlog', 'recording', 'max_backlog_mb')})"
                f": {why}"
            ) from None
        recorder.start()
    # A pump thread waiting for the GIL held by the recorder gets it after this long (the
    # default 5 ms would be each forwarded message's worst case): see proxy/io/pumps.py.
    sys.setswitchinterval(GIL_SWITCH_INTERVAL)
    try:
        config_path = Path(args.config) if args.config else None
        rebuild = partial(_rebuild, args, keylog, mintable)
        trio.run(
            _serve, fronts, limits, recorder, management, keylog, admission, config,
            config_path, rebuild, service,
        )  # fmt: skip
    except BaseExceptionGroup as group:  # trio's nursery wraps what its tasks raise
        cannot = group.subgroup(ListenError)
        if cannot is not None:
            raise UserError(str(cannot.exceptions[0])) from None
        # Ctrl-C before the signal receiver was up (the proxy had just started) is a stop
        _interrupted, rest = group.split(KeyboardInterrupt)
        if rest is not None:
            raise
    except KeyboardInterrupt:
        pass
    finally:
        if recorder is not None:
            recorder.stop()
            cut = set(recorder.cut)
            for path in recorder.archives:
                note = " (cut short: recording failed; `spicetap verify` says what is intact)"
                if log_format == "json":  # every line of stderr an object, this one too
                    fields = {"event": "archive_recorded", "path": str(path), "cut": path in cut}
                    logging.getLogger("spicetap.proxy").info(
                        "recorded %s%s", path, note if path in cut else "", extra={"fields": fields}
                    )
                else:
                    print(f"recorded {path}{note if path in cut else ''}", file=sys.stderr)
    return 0


def _management(
    args: argparse.Namespace,
    cp: ProxySection,
    token: bytes | None,
    certificate: ViewerCertificate | None = None,
) -> ManagementOptions | None:
    """--management (or [proxy] management), `token` read from its token file, HTTPS with
    `certificate` (build_fronts makes both); probes with "tls": true check servers as the
    TLS upstream is checked (--upstream-ca, --upstream-insecure)."""
    listen_text = pick(args.management, cp.management)
    if listen_text is None:
        for dest in ("management_token_file", "management_tls"):
            if pick(getattr(args, dest), getattr(cp, dest)):
                where = named(args, dest, "proxy", dest)
                raise UserError(f"{where} needs --management (or [proxy] management)")
        return None
    what = named(args, "management", "proxy", "management")
    listen = host_port(listen_text, what, any_port=True)
    if token is None and not _is_loopback(listen[0]):
        logging.getLogger("spicetap.management").warning(
            "the management API on %s has no token: whoever reaches it may list sessions "
            "and make spicetap connect anywhere (--management-token-file)",
            listen_text,
        )
    https = certificate.context if certificate is not None else None
    ca = Path(args.upstream_ca) if args.upstream_ca else None
    try:
        probe_tls = client_context(ca, args.upstream_insecure, None)
    except TlsSetupError as exc:
        raise UserError(str(exc)) from None
    return ManagementOptions(listen, probe_tls, token, https)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name: only this one surely stays on the machine
        return host == "localhost"


def _admission(max_connections: int | None) -> Admission:
    files = raise_open_files_limit()
    limit = connection_limit(max_connections, files)
    if max_connections is None:
        logging.getLogger("spicetap.proxy").info(
            "serving up to %d connections at once (open files limit %d)", limit, files
        )
    return Admission(limit)


class ListenError(Exception):
    """A listener could not be opened (the message names it and why)."""


def _rebuild(
    args: argparse.Namespace, keylog: Path | None, mintable: bool, config: Config, previous: Fronts
) -> Fronts:
    """A reload's fronts: the same flags, the file as it now reads. A new recording
    directory is made here, so that one that cannot be fails the reload."""
    fronts = build_fronts(args, config, keylog, mintable, previous)
    recording = previous.recording
    if recording is not None:  # else nothing records: a restart starts it
        # no directory now: recording goes on as it was until a restart stops it
        recording = recording_options(args, config.recording, recording.max_message) or recording
        recording.directory.mkdir(parents=True, exist_ok=True)
    return replace(fronts, recording=recording)


def _status(state: ProxyState, recorder: RecordingSink | None) -> str:
    """One line for `systemctl status`."""
    channels = list(state.channels.values())
    sessions = sum(1 for ch in channels if ch.relay.guard.channel_type == MAIN)
    line = f"{sessions} session(s), {len(channels)} channel(s) open"
    if recorder is None:
        return line + "; not recording"
    if recorder.failed is not None:
        return line + f"; recording failed: {recorder.failed}"
    return line + "; recording"


def _recording_reloaded(recorder: RecordingSink, fronts: Fronts) -> None:
    if fronts.recording is not None:
        recorder.reconfigure(fronts.recording)


async def _serve(
    fronts: Fronts,
    limits: Limits,
    recorder: RecordingSink | None,
    management: ManagementOptions | None = None,
    keylog: Path | None = None,
    admission: Admission | None = None,
    config: Config | None = None,
    config_path: Path | None = None,
    rebuild: Rebuild | None = None,
    service: ServiceManager | None = None,
) -> None:
    """Serve every front until SIGINT/SIGTERM (or SIGHUP without a config file to
    re-read); SIGHUP with one reloads it. `service`: systemd, told of each step."""
    service = service or ServiceManager({})
    state = ProxyState(admission=admission, lockout=Lockout(fronts.lockout))
    logger = logging.getLogger("spicetap.proxy")
    proxy = ChannelProxy(limits, recorder, state, fronts.link_policy)
    proxy.sasl_user = fronts.sasl_user
    tokens = TokenDesk(fronts.scopes, fronts.link_policy)
    # said once every listener is up: a port that is taken then leaves no "listening" line
    # behind for one that is not served
    opened: list[tuple[str, list[trio.SocketListener], str]] = []
    async with trio.open_nursery() as nursery:

        async def start(
            kind: str, where: tuple[str, int], what: str, serve: Any, *args: Any
        ) -> None:
            try:
                serving = await serve(*args)
            except OSError as exc:
                reason = exc.strerror or str(exc)
                message = f"cannot listen ({kind}) on {listen_text(where)}: {reason}"
                raise ListenError(message) from None
            opened.append((kind, serving.listeners, what))

        listeners = FrontListeners(proxy, nursery, fronts.follow_migration, keylog)
        for route in fronts.routes:
            what = f"forwarding to {route.upstream.label}"
            await start(listener_kind(route), route.listen, what, listeners.open, route)
        if fronts.connect is not None:
            listen, front = fronts.connect
            await start("connect", listen, CONNECT_FRONT, listeners.open_connect, listen, front)
        if (websocket := fronts.websocket) is not None:
            what = f"forwarding to {websocket.upstream.label}"
            await start("websocket", websocket.listen, what, listeners.open, websocket)
        reloader = Reloader(config_path, config or Config(), fronts, rebuild, listeners, tokens)
        if recorder is not None:
            reloader.on_applied.append(partial(_recording_reloaded, recorder))
        if management is not None:
            api = "HTTPS API" if management.https is not None else "HTTP API"
            api += ", token required" if management.token is not None else ""
            paths = "/api/sessions /api/spice/connect /api/tokens /api/reload /api/lockouts "
            paths += "/metrics"
            await start(
                "management", management.listen, f"{api}: {paths}",
                nursery.start, serve_management, management, state, recorder, tokens, reloader,
            )  # fmt: skip
        if tokens.active or reloader.reloadable:  # a reload may bring tokens files
            nursery.start_soon(tokens.keep_current, state)
        # what spicetap's CA issued is issued again before it ends, reload or not
        nursery.start_soon(keep_certificates_current, reloader)
        stops = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
        # caught before "ready" is said: a script may signal as soon as it reads it
        with trio.open_signal_receiver(*stops) as signals:
            # a Ctrl-C that Python swallowed while we started (spicetap.interrupts) stops
            # us here, before "ready", as one caught now would
            if not interrupts.swallowed():
                for kind, opened_listeners, what in opened:
                    announce(kind, opened_listeners, what)
                print("spicetap proxy ready", flush=True)
                status = partial(_status, state, recorder)
                service.ready(status())
                nursery.start_soon(service.keep_alive, status)
                # SIGHUP's reloads and the management API's alike (ExecReload's wait ends
                # at READY)
                reloader.on_begin.append(service.reloading)
                reloader.on_end.append(lambda: service.ready(status()))
                async for sig in signals:
                    if sig == signal.SIGHUP and reloader.reloadable:
                        logger.info("SIGHUP: reloading %s", config_path)
                        nursery.start_soon(reloader.reload_logged)
                        continue
                    break
        service.stopping("stopping: draining archives")
        # Once stopping, another Ctrl-C or SIGTERM (an impatient user, a service manager's
        # second try) must not cut the archives short: the drain is bounded, and SIGKILL
        # remains (after which the recording process still closes every archive).
        for sig in stops:
            signal.signal(sig, signal.SIG_IGN)
        logger.info(
            "stopping: draining archives (at most %.0f s; further stop signals are ignored)",
            STOP_TIMEOUT,
        )
        nursery.cancel_scope.cancel()
