"""`spicetap vv TARGET`: a virt-viewer connection file that points remote-viewer at spicetap.

The file carries spicetap's CA inline (`ca=`, the PEM with newlines written as "\\n") and the
host subject of the certificate spicetap presents, so the viewer checks spicetap's TLS with
nothing installed. TARGET is the address of spicetap's listener (HOST:PORT), or the name of a
configured target: its own listeners, else the CONNECT front with the name as host.
With --mint-token the running proxy's management API mints a one-time token for it (inject
mode), written in as the password; the viewer deletes the file after reading it.
"""

from __future__ import annotations

import argparse
import os
import ssl
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cryptography.hazmat.primitives import serialization

from proxy.core.credentials import user_problem
from proxy.core.management import DEFAULT_TOKEN_TTL, MAX_TOKEN_TTL
from proxy.core.probe import check_password
from proxy.linksetup import api_token
from proxy.mint_client import ManagementApiAddress, mint_token
from proxy.targets import host_port
from proxy.tls import (
    TlsSetupError,
    default_subject,
    listen_host,
    load_or_create_ca,
    parse_subject,
)
from spicetap.config import Config, ConfigError, TargetSection, load_config
from spicetap.errors import UserError


@dataclass(frozen=True)
class ViewerFile:
    host: str
    port: int | None
    tls_port: int | None
    ca_pem: str | None  # needed when tls_port is set
    host_subject: str | None
    proxy: str | None = None
    password: str | None = None
    title: str | None = None
    fullscreen: bool = False
    delete_this_file: bool = False

    def render(self) -> str:
        lines = ["[virt-viewer]", "type=spice", f"host={self.host}"]
        if self.port is not None:
            lines.append(f"port={self.port}")
        if self.tls_port is not None:
            lines.append(f"tls-port={self.tls_port}")
            if self.ca_pem is not None:
                # virt-viewer reads "\n" in ca= as a newline (the PEM must stay one line)
                lines.append("ca=" + self.ca_pem.strip().replace("\n", "\\n"))
            if self.host_subject:
                lines.append(f"host-subject={self.host_subject}")
            if self.port is None:
                lines.append("secure-channels=all")
        if self.proxy:
            lines.append(f"proxy={self.proxy}")
        if self.password is not None:
            lines.append(f"password={self.password}")
        if self.title:
            lines.append(f"title={self.title}")
        if self.fullscreen:
            lines.append("fullscreen=1")
        if self.delete_this_file:
            lines.append("delete-this-file=1")
        return "\n".join(lines) + "\n"


def _ca_pem(folder: Path | None = None) -> str:
    try:
        ca = load_or_create_ca(folder)
    except (TlsSetupError, OSError, ValueError) as exc:
        raise UserError(f"spicetap's CA: {exc}") from None
    return ca.cert.public_bytes(serialization.Encoding.PEM).decode()


def viewer_file(args: argparse.Namespace, config: Config) -> ViewerFile:
    extras: dict[str, Any] = {
        "password": args.password,
        "title": args.title,
        "fullscreen": args.fullscreen,
        "delete_this_file": args.delete_this_file,
    }
    target = config.targets.get(args.target)
    if target is not None:
        return _named(args, config, args.target, extras)
    if ":" not in args.target:
        known = ", ".join(sorted(config.targets)) or "none configured"
        raise UserError(f"{args.target!r} is neither HOST:PORT nor a target name ({known})")
    host, port = host_port(args.target, "TARGET")
    host = listen_host(host)
    tls_port = port if args.tls_only else args.tls_port
    plain = None if args.tls_only else port
    ca, subject = _checks(args, config, None, host) if tls_port else (None, None)
    return ViewerFile(host, plain, tls_port, ca, subject, proxy=args.proxy, **extras)


def _checks(
    args: argparse.Namespace, config: Config, section: TargetSection | None, host: str
) -> tuple[str | None, str | None]:
    """What a viewer checks a TLS listener with, as the proxy's config sets it up: spicetap's
    CA and the subject it issues to ([proxy] tls_subject, or the target's own), or, for
    the operator's own certificate (tls_cert), nothing: the viewer checks that against its
    own trust store, by host name."""
    own = section is not None and section.own_certificate
    chosen = section if own and section is not None else config.proxy
    if chosen.tls_cert is not None and args.host_subject is None:
        return None, None
    return _ca_pem(), args.host_subject or chosen.tls_subject or default_subject(host)


def _named(
    args: argparse.Namespace, config: Config, name: str, extras: dict[str, Any]
) -> ViewerFile:
    section = config.targets[name]
    where = f"[targets.{name}]"
    if section.listen or section.tls_listen:  # its own reverse listeners
        plain = host_port(section.listen, f"{where} listen") if section.listen else None
        tls = host_port(section.tls_listen, f"{where} tls_listen") if section.tls_listen else None
        host = listen_host((plain or tls or ("", 0))[0])
        ca, subject = _checks(args, config, section, host) if tls else (None, None)
        return ViewerFile(
            host, plain[1] if plain else None, tls[1] if tls else None, ca, subject, **extras
        )
    front = args.proxy
    if front is None and config.connect.listen:
        front_host, front_port = host_port(config.connect.listen, "[connect] listen", any_port=True)
        if front_port:  # port 0 is picked when the proxy starts: only --proxy can say it
            front = f"http://{listen_host(front_host)}:{front_port}"
    if front is None:
        raise UserError(
            f"{where} has no listen/tls_listen, and there is no CONNECT front to reach it "
            "by name: give --proxy or [connect] listen"
        )
    # Through the CONNECT front the viewer names the target; spicetap picks the address.
    # The ports only tell the viewer which channels to open plain or with TLS.
    plain_port = host_port(section.upstream, f"{where} upstream")[1] if section.upstream else None
    tls_port = (
        host_port(section.upstream_tls, f"{where} upstream_tls")[1]
        if section.upstream_tls
        else None
    )
    # the CONNECT front always shows a certificate spicetap's CA issues to the name asked for
    subject = args.host_subject or config.proxy.tls_subject or default_subject(name)
    ca = _ca_pem() if tls_port else None
    return ViewerFile(
        name, plain_port, tls_port, ca, subject if tls_port else None, proxy=front, **extras
    )


def _check_values(args: argparse.Namespace) -> None:
    """A .vv file is lines of key=value: a line break in a value would add keys of its own
    (host=elsewhere), so no control character may go in."""
    for option in ("password", "title", "host_subject", "proxy"):
        value = getattr(args, option)
        if value is not None and any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
            raise UserError(
                f"--{option.replace('_', '-')}: has a line break or control character, "
                "which a .vv file cannot hold"
            )
    problem = check_password(args.password)
    if problem is not None:  # the viewer would send it, and spice-server refuse it
        raise UserError(f"--password: {problem}")
    if args.host_subject is not None:
        try:
            parse_subject(args.host_subject)
        except TlsSetupError as exc:
            raise UserError(f"--host-subject: {exc}") from None
    if args.proxy is not None:
        try:
            url = urlsplit(args.proxy)
            ok = url.scheme == "http" and bool(url.hostname) and url.path in ("", "/")
            url.port  # noqa: B018  (raises on a port out of range)
        except ValueError:
            ok = False
        if not ok:
            raise UserError(f"--proxy {args.proxy!r}: expected http://HOST:PORT")


def add_vv_command(sub: Any) -> None:
    p = sub.add_parser(
        "vv", help="write a remote-viewer .vv file that connects through spicetap (CA inline)"
    )
    p.add_argument("target", help="HOST:PORT of spicetap's listener, or a configured target name")
    p.add_argument("--config", help="TOML file with [targets.NAME] and [connect]")
    p.add_argument("--tls-port", type=int, help="spicetap's TLS listener on the same host")
    p.add_argument("--tls-only", action="store_true", help="PORT in TARGET is a TLS listener")
    p.add_argument(
        "--host-subject",
        help="subject of spicetap's certificate if --tls-subject was given to the proxy "
        "(--config: its tls_subject is read there)",
    )
    p.add_argument(
        "--proxy", help="http://HOST:PORT of spicetap's CONNECT front (default: [connect] listen)"
    )
    p.add_argument("--password", help="what the viewer sends (spicetap's, in inject mode)")
    p.add_argument("--title")
    p.add_argument("--fullscreen", action="store_true")
    p.add_argument("--delete-this-file", action="store_true", help="the viewer deletes it")
    p.add_argument("-o", "--output", help="file to write (default: standard output)")
    m = p.add_argument_group("a one-time token from the running proxy (inject mode)")
    m.add_argument(
        "--mint-token",
        action="store_true",
        help="ask the proxy's management API for a token for TARGET (a name: that target; "
        "HOST:PORT: the main upstream) and put it in the file, which the viewer deletes",
    )
    m.add_argument(
        "--token-ttl", type=float, default=DEFAULT_TOKEN_TTL, help="seconds to start the session"
    )
    m.add_argument(
        "--token-user",
        metavar="NAME",
        help="whom the token is for: the session, its archive and the API name them",
    )
    m.add_argument("--management", help="HOST:PORT of the API (default: [proxy] management)")
    m.add_argument(
        "--management-token-file",
        help="the API's bearer token (default: [proxy] management_token_file)",
    )
    m.add_argument(
        "--management-tls",
        action="store_true",
        help="the API speaks HTTPS with a certificate from spicetap's CA (default: [proxy] "
        "management_tls)",
    )
    p.set_defaults(func=cmd_vv)


def _minted(args: argparse.Namespace, config: Config) -> str:
    """A token from the proxy's management API, for --mint-token."""
    if args.password is not None:
        raise UserError("--password and --mint-token: give one or the other")
    if not (0 < args.token_ttl <= MAX_TOKEN_TTL):  # NaN fails this too
        raise UserError(
            f"--token-ttl {args.token_ttl:g}: expected 0 < SECONDS <= {MAX_TOKEN_TTL:g}"
        )
    if args.token_user is not None and (problem := user_problem(args.token_user)):
        raise UserError(f"--token-user: {problem}")
    cp = config.proxy
    listen = args.management or cp.management
    token_file = args.management_token_file or cp.management_token_file
    if listen is None or token_file is None:
        raise UserError(
            "--mint-token needs the API's address and token: --management and "
            "--management-token-file, or [proxy] management and management_token_file"
        )
    where = "--management" if args.management else "[proxy] management"
    host, port = host_port(listen, where, any_port=True)
    if port == 0:
        raise UserError(f"{where} {listen!r}: port 0 is picked at start; give the port it got")
    bearer = api_token(token_file, "the API's token file").decode()
    https = None
    if args.management_tls or cp.management_tls:
        https = ssl.create_default_context(cadata=_ca_pem())
    api = ManagementApiAddress(listen_host(host), port, bearer, https)
    target = args.target if args.target in config.targets else None
    return mint_token(api, target, args.token_ttl, args.token_user)


def cmd_vv(args: argparse.Namespace) -> int:
    try:
        config = load_config(Path(args.config)) if args.config else Config()
    except ConfigError as exc:
        raise UserError(str(exc)) from None
    if args.tls_port is not None and not 0 < args.tls_port < 65536:
        raise UserError(f"--tls-port {args.tls_port}: expected 1-65535")
    _check_values(args)
    viewer = viewer_file(args, config)
    if args.mint_token:  # once the rest checked out: a token is not minted for nothing
        # one session's worth: the viewer deletes the file after reading it
        viewer = replace(viewer, password=_minted(args, config), delete_this_file=True)
    text = viewer.render()
    if args.output is None:
        sys.stdout.write(text)
        return 0
    out = Path(args.output)
    try:  # it may hold a password: readable by its owner only
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
    except OSError as exc:
        raise UserError(f"cannot write {out}: {exc.strerror or exc}") from None
    print(f"wrote {out}: remote-viewer {out}", file=sys.stderr)
    return 0
