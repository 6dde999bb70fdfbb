"""`spicetap proxy`: a transparent recording proxy in front of a SPICE server."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path
from typing import Any

import trio

from proxy.core.relay import Limits
from proxy.io.server import ChannelProxy, ProxyState, serve_tcp
from proxy.recorder import BACKLOG_POLICIES, Recorder, RecordingOptions
from spicetap.archive.keys import load_or_create_signing_key
from spicetap.archive.writer import FlushPolicy, Rotation
from spicetap.config import Config, ConfigError, load_config
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
    listen = host_port(_pick(args.listen, cp.listen), "--listen", any_port=True)
    upstream_text = _pick(args.upstream, cp.upstream)
    if upstream_text is None:
        raise UserError("no upstream: give --upstream HOST:PORT or [proxy] upstream")
    upstream = host_port(upstream_text, "--upstream")
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
        meta = {
            "viewer": None,
            "server": f"{upstream[0]}:{upstream[1]}",
            "insertion": "reverse",
            "tls": {"viewer": False, "server": False},
            "auth": "pass-through",
        }
        try:
            key = load_or_create_signing_key()
        except (OSError, ValueError) as exc:
            raise UserError(f"signing key: {exc}") from None
        recorder = Recorder(options, meta, key)
        recorder.start()
    try:
        trio.run(_serve, listen, upstream, limits, recorder)
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


async def _serve(
    listen: tuple[str, int], upstream: tuple[str, int], limits: Limits, recorder: Recorder | None
) -> None:
    async def open_upstream() -> trio.abc.Stream:
        return await trio.open_tcp_stream(*upstream)

    proxy = ChannelProxy(
        open_upstream, f"{upstream[0]}:{upstream[1]}", limits, recorder, ProxyState()
    )
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(serve_tcp, proxy, *listen)
        bound = listeners[0].socket.getsockname()
        logging.getLogger("spicetap.proxy").info(
            "listening on %s:%d, forwarding to %s:%d", bound[0], bound[1], *upstream
        )
        print(f"spicetap proxy listening on {bound[0]}:{bound[1]}", flush=True)
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _sig in signals:
                logging.getLogger("spicetap.proxy").info("stopping: draining archives")
                nursery.cancel_scope.cancel()
                break
