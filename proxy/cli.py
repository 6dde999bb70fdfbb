"""`spicetap proxy`: a transparent recording proxy in front of a SPICE server."""

from __future__ import annotations

import argparse
import logging
import signal
import ssl
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from proxy.core.relay import Limits
from proxy.io.server import (
    ChannelProxy,
    ProxyState,
    Upstream,
    serve_tcp,
    tcp_opener,
    tls_opener,
)
from proxy.recorder import BACKLOG_POLICIES, Recorder, RecordingOptions
from proxy.tls import (
    TlsSetupError,
    client_context,
    issue_server_cert,
    load_or_create_ca,
    server_context,
)
from spicetap.archive.keys import config_dir, load_or_create_signing_key
from spicetap.archive.writer import FlushPolicy, Rotation
from spicetap.config import Config, ConfigError, ProxySection, load_config
from spicetap.errors import UserError


def host_port(text: str, what: str, *, any_port: bool = False) -> tuple[str, int]:
    """HOST:PORT; with any_port, port 0 (the system picks one) is allowed."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not (0 if any_port else 1) <= int(port) < 65536:
        raise UserError(f"{what} {text!r}: expected HOST:PORT")
    return host.strip("[]") or "127.0.0.1", int(port)


def add_proxy_command(sub: Any) -> None:
    from spicetap.cli_inspect import add_privacy_options

    p = sub.add_parser("proxy", help="run the recording proxy in front of a SPICE server")
    p.add_argument("--config", help="TOML file (see config/spicetap.example.toml)")
    p.add_argument("--listen", help="HOST:PORT viewers connect to (default 127.0.0.1:5900)")
    p.add_argument("--upstream", help="HOST:PORT of the SPICE server")
    p.add_argument("--record", metavar="DIR", help="write one archive per session into DIR")
    p.add_argument("--compress", action="store_true", default=None, help="zstd-compress archives")
    p.add_argument(
        "--flush-interval",
        type=float,
        help="seconds a record may wait before reaching the disk (loss window)",
    )
    p.add_argument(
        "--backlog",
        choices=BACKLOG_POLICIES,
        help="when recording falls behind: mark a gap and keep forwarding (gap), "
        "or close the session (close)",
    )
    t = p.add_argument_group("TLS (either leg may be plain or TLS)")
    t.add_argument("--tls-listen", help="HOST:PORT where viewers connect with TLS")
    t.add_argument("--upstream-tls", help="HOST:PORT of the server's TLS port")
    t.add_argument(
        "--tls-subject",
        help="subject of the certificate spicetap presents, e.g. "
        "'C=XX,O=Example,CN=host' (default: O=spicetap,CN=<listen host>)",
    )
    t.add_argument(
        "--tls-cert",
        help="PEM certificate chain to present instead of one issued by spicetap's own CA",
    )
    t.add_argument("--tls-key", help="PEM private key of --tls-cert")
    t.add_argument("--upstream-ca", help="CA file that signed the server's certificate")
    t.add_argument("--upstream-host-subject", help="subject the server's certificate must have")
    t.add_argument(
        "--upstream-insecure",
        action="store_true",
        help="do not check the server's certificate at all",
    )
    t.add_argument(
        "--keylog",
        help="append TLS secrets of both legs here (SSLKEYLOGFILE format, for Wireshark)",
    )
    p.add_argument("--link-timeout", type=float)
    p.add_argument("--idle-timeout", type=float)
    p.add_argument("--max-message", type=int, help="bytes")
    p.add_argument("-v", "--verbose", action="store_true")
    add_privacy_options(p)
    p.set_defaults(func=cmd_proxy)


def _pick(flag: Any, configured: Any) -> Any:
    return configured if flag is None else flag


def cmd_proxy(args: argparse.Namespace) -> int:
    from spicetap.cli_inspect import policy_from

    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        config = load_config(Path(args.config)) if args.config else Config()
    except ConfigError as exc:
        raise UserError(str(exc)) from None
    cp, cr = config.proxy, config.recording
    routes = _routes(args, cp)
    limits = Limits(
        link_timeout=_pick(args.link_timeout, cp.link_timeout),
        idle_timeout=_pick(args.idle_timeout, cp.idle_timeout),
        max_message=_pick(args.max_message, cp.max_message),
    )
    recorder = None
    directory = _pick(args.record, cr.directory)
    if directory:
        options = RecordingOptions(
            Path(directory),
            policy=policy_from(args, cr.privacy),
            flush=FlushPolicy(
                interval=_pick(args.flush_interval, cr.flush_interval),
                max_buffer=cr.max_buffer,
                fsync=cr.fsync,
            ),
            rotation=Rotation(max_bytes=cr.rotate_bytes, max_seconds=cr.rotate_seconds),
            compress=bool(_pick(args.compress, cr.compress)),
            backlog=_pick(args.backlog, cr.backlog),
        )
        # each session adds how it came in (insertion, upstream, target); each connection's
        # open record says which legs were TLS
        meta = {"viewer": None, "auth": "pass-through"}
        try:
            key = load_or_create_signing_key()
        except (OSError, ValueError) as exc:
            raise UserError(f"signing key: {exc}") from None
        recorder = Recorder(options, meta, key)
        recorder.start()
    try:
        trio.run(_serve, routes, limits, recorder)
    except OSError as exc:
        raise UserError(f"cannot listen on {args.listen}: {exc.strerror or exc}") from None
    except KeyboardInterrupt:
        pass
    finally:
        if recorder is not None:
            recorder.stop()
            for path in recorder.archives:
                print(f"recorded {path}", file=sys.stderr)
    return 0


@dataclass(frozen=True)
class Route:
    """One listener and where its viewers go."""

    listen: tuple[str, int]
    viewer_tls: ssl.SSLContext | None
    upstream: Upstream


def _routes(args: argparse.Namespace, cp: ProxySection) -> list[Route]:
    plain_up = _pick(args.upstream, cp.upstream)
    tls_up = args.upstream_tls
    if plain_up is None and tls_up is None:
        raise UserError(
            "no upstream: give --upstream HOST:PORT, --upstream-tls HOST:PORT or [proxy] upstream"
        )
    keylog = Path(args.keylog) if args.keylog else None
    openers: dict[bool, Upstream] = {}
    if plain_up is not None:
        host, port = host_port(plain_up, "--upstream")
        openers[False] = Upstream(tcp_opener(host, port), f"{host}:{port}")
    if tls_up is not None:
        host, port = host_port(tls_up, "--upstream-tls")
        try:
            ctx = client_context(
                Path(args.upstream_ca) if args.upstream_ca else None, args.upstream_insecure, keylog
            )
        except TlsSetupError as exc:
            raise UserError(str(exc)) from None
        openers[True] = Upstream(
            tls_opener(host, port, ctx, args.upstream_host_subject), f"{host}:{port} (tls)"
        )
    routes: list[Route] = []
    if args.listen or (cp.listen and not args.tls_listen):
        listen = host_port(_pick(args.listen, cp.listen), "--listen", any_port=True)
        routes.append(Route(listen, None, openers.get(False) or openers[True]))
    if args.tls_listen:
        listen = host_port(args.tls_listen, "--tls-listen", any_port=True)
        context = _viewer_context(args, listen, keylog)
        routes.append(Route(listen, context, openers.get(True) or openers[False]))
    return routes


def _viewer_context(
    args: argparse.Namespace, listen: tuple[str, int], keylog: Path | None
) -> ssl.SSLContext:
    try:
        if args.tls_cert or args.tls_key:
            if not (args.tls_cert and args.tls_key):
                raise UserError("--tls-cert and --tls-key go together")
            return server_context(Path(args.tls_cert), Path(args.tls_key), keylog)
        ca = load_or_create_ca()
        host = listen[0] if listen[0] not in ("", "0.0.0.0", "::") else "127.0.0.1"
        subject = args.tls_subject or f"O=spicetap,CN={host}"
        cert, key = issue_server_cert(ca, subject, [host, "localhost"], config_dir() / "issued")
        return server_context(cert, key, keylog)
    except TlsSetupError as exc:
        raise UserError(str(exc)) from None


def announce(kind: str, listeners: list[trio.SocketListener], what: str) -> None:
    """One log line, and one stdout line scripts and tests read: the bound port (port 0 in
    --listen lets the system pick one). "spicetap proxy ready" follows the last of them."""
    host, port = listeners[0].socket.getsockname()[:2]
    logging.getLogger("spicetap.proxy").info("listening (%s) on %s:%d, %s", kind, host, port, what)
    print(f"spicetap proxy listening ({kind}) on {host}:{port}", flush=True)


async def _serve(routes: list[Route], limits: Limits, recorder: Recorder | None) -> None:
    state = ProxyState()
    logger = logging.getLogger("spicetap.proxy")
    proxy = ChannelProxy(limits, recorder, state)
    async with trio.open_nursery() as nursery:
        for route in routes:
            listeners = await nursery.start(
                serve_tcp, proxy, route.upstream, *route.listen, route.viewer_tls
            )
            kind = "tls" if route.viewer_tls is not None else "plain"
            announce(kind, listeners, f"forwarding to {route.upstream.label}")
        print("spicetap proxy ready", flush=True)
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _sig in signals:
                logger.info("stopping: draining archives")
                nursery.cancel_scope.cancel()
                break
