"""`spicetap proxy` options for link-stage rewrites: capability masking and auth modes.

Turns the command line and the [proxy] section into one LinkPolicy (proxy/core/
linkrewrite.py): reads password and token files, makes spicetap's RSA key pair. Secrets
are read here and never printed: error messages name files and keys, not contents.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from proxy.core.capmask import CapMask, UnknownCap
from proxy.core.credentials import Token, ViewerCredentials, parse_tokens
from proxy.core.linkrewrite import AUTH_MODES, LinkPolicy
from proxy.core.ticket import MAX_PASSWORD, TicketKey
from spicetap.config import ProxySection
from spicetap.errors import UserError


def add_link_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("link stage (capabilities and authentication)")
    g.add_argument(
        "--mask-caps",
        action="append",
        default=[],
        metavar="SCOPE:CAP,...",
        help="capabilities to clear on both sides, e.g. display:codec_h264,common:mini_header "
        "(repeatable; names from spicetap's caps definitions)",
    )
    g.add_argument(
        "--auth",
        choices=AUTH_MODES,
        help="pass-through (default): tickets relayed untouched; intercept: spicetap's own "
        "key, the viewer's password re-encrypted for the server; inject: viewers give "
        "spicetap their own password or token, spicetap logs in with the server's",
    )
    g.add_argument("--viewer-password-file", help="inject: the password viewers must give")
    g.add_argument(
        "--viewer-tokens-file",
        help="inject: lines 'TOKEN [EXPIRY]' (ISO 8601 or Unix time), each good for one session",
    )
    g.add_argument("--server-password-file", help="inject: the server's real password")


def _secret(value: str | None, file: str | None, what: str) -> bytes | None:
    """A password from the config (value) or from a file (first line); None when absent."""
    if file is not None:
        try:
            text = Path(file).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"{what} file {file}: cannot read ({type(exc).__name__})") from None
        value = text[0] if text else ""
    if value is None:
        return None
    secret = value.encode()
    if not secret or len(secret) > MAX_PASSWORD or b"\0" in secret:
        raise UserError(f"{what}: a SPICE password has 1 to {MAX_PASSWORD} bytes")
    return secret


def _tokens(file: str | None) -> list[Token]:
    if file is None:
        return []
    try:
        text = Path(file).read_text(encoding="utf-8")
        return parse_tokens(text, time.time(), time.monotonic())
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"viewer tokens file {file}: cannot read ({type(exc).__name__})") from None
    except ValueError as exc:
        raise UserError(f"viewer tokens file {file}: {exc}") from None


def link_policy_from(args: argparse.Namespace, cp: ProxySection) -> LinkPolicy:
    names = [n for arg in args.mask_caps for n in arg.split(",")] or list(cp.mask_caps)
    try:
        mask = CapMask.parse(names)
    except UnknownCap as exc:
        where = "--mask-caps" if args.mask_caps else "[proxy] mask_caps"
        raise UserError(f"{where}: {exc}") from None
    mode = args.auth or cp.auth
    viewer_file = args.viewer_password_file or cp.viewer_password_file
    tokens_file = args.viewer_tokens_file or cp.viewer_tokens_file
    server_file = args.server_password_file or cp.server_password_file
    given = [viewer_file, tokens_file, server_file, cp.viewer_password, cp.server_password]
    if mode != "inject":
        if any(v is not None for v in given):
            raise UserError("viewer and server passwords and tokens are for --auth inject only")
        key = TicketKey.generate() if mode == "intercept" else None
        return LinkPolicy(mask, mode, key)
    viewer_password = _secret(cp.viewer_password, viewer_file, "viewer password")
    tokens = _tokens(tokens_file)
    server_password = _secret(cp.server_password, server_file, "server password")
    if viewer_password is None and not tokens:
        raise UserError("--auth inject needs a viewer password or tokens for viewers to give")
    if server_password is None:
        raise UserError("--auth inject needs the server password (--server-password-file)")
    viewers = ViewerCredentials(viewer_password, tokens)
    return LinkPolicy(mask, mode, TicketKey.generate(), viewers, server_password)
