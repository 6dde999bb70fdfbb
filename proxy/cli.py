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
from proxy.io.server import ChannelProxy, Opener, ProxyState, serve_tcp, tcp_opener, tls_opener
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
        first = routes[0]
        meta = {
            "viewer": None,
            "server": first.label,
            "insertion": "reverse",
            # per connection, each open record says which legs were TLS
            "tls": {"viewer": first.viewer_tls is not None, "server": first.server_tls},
            "auth": "pass-through",
        }
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
    opener: Opener
    label: str
    server_tls: bool


def _routes(args: argparse.Namespace, cp: ProxySection) -> list[Route]:
    plain_up = _pick(args.upstream, cp.upstream)
    tls_up = args.upstream_tls
    if plain_up is None and tls_up is None:
        raise UserError(
            "no upstream: give --upstream HOST:PORT, --upstream-tls HOST:PORT or [proxy] upstream"
        )
    keylog = Path(args.keylog) if args.keylog else None
    openers: dict[bool, tuple[Opener, str]] = {}
    if plain_up is not None:
        host, port = host_port(plain_up, "--upstream")
        openers[False] = (tcp_opener(host, port), f"{host}:{port}")
    if tls_up is not None:
        host, port = host_port(tls_up, "--upstream-tls")
        try:
            ctx = client_context(
                Path(args.upstream_ca) if args.upstream_ca else None, args.upstream_insecure, keylog
            )
        except TlsSetupError as exc:
            raise UserError(str(exc)) from None
        openers[True] = (
            tls_opener(host, port, ctx, args.upstream_host_subject),
            f"{host}:{port} (tls)",
        )
    routes: list[Route] = []
    if args.listen or (cp.listen and not args.tls_listen):
        listen = host_port(_pick(args.listen, cp.listen), "--listen", any_port=True)
        opener, label = openers[False] if False in openers else openers[True]
        routes.append(Route(listen, None, opener, label, server_tls=False not in openers))
    if args.tls_listen:
        listen = host_port(args.tls_listen, "--tls-listen", any_port=True)
        opener, label = openers[True] if True in openers else openers[False]
        routes.append(
            Route(
                listen,
                _viewer_context(args, listen, keylog),
                opener,
                label,
                server_tls=True in openers,
            )
        )
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


async def _serve(routes: list[Route], limits: Limits, recorder: Recorder | None) -> None:
    state = ProxyState()
    logger = logging.getLogger("spicetap.proxy")
    async with trio.open_nursery() as nursery:
        for route in routes:
            proxy = ChannelProxy(route.opener, route.label, limits, recorder, state)
            listeners = await nursery.start(serve_tcp, proxy, *route.listen, route.viewer_tls)
            bound = listeners[0].socket.getsockname()
            kind = " (tls)" if route.viewer_tls is not None else ""
            logger.info(
                "listening%s on %s:%d, forwarding to %s", kind, bound[0], bound[1], route.label
            )
            print(f"spicetap proxy listening{kind} on {bound[0]}:{bound[1]}", flush=True)
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _sig in signals:
                logger.info("stopping: draining archives")
                nursery.cancel_scope.cancel()
                break
