"""`spicetap proxy` options for link-stage rewrites: capability masking and auth modes.

Turns the command line and the [proxy] section into one LinkPolicy (proxy/core/
linkrewrite.py): reads password and token files, makes spicetap's RSA key pair. Secrets
are read here and never printed: error messages name files and keys, not contents.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from proxy.core.capmask import CapMask, UnknownCap
from proxy.core.credentials import Token, ViewerCredentials, parse_tokens
from proxy.core.linkrewrite import AUTH_MODES, LinkPolicy
from proxy.core.management import token_problem
from proxy.core.ticket import MAX_PASSWORD, TicketKey
from spicetap.config import ProxySection, TargetSection
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
        help="inject: lines 'TOKEN [EXPIRY]' (ISO 8601 or Unix time), each good for one "
        "session; read again whenever it changes",
    )
    g.add_argument("--server-password-file", help="inject: the server's real password")


def secret_line(file: str, what: str) -> str:
    """A secret's file: its first line ("" for an empty file). The error names the file,
    never what is in it."""
    try:
        text = Path(file).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{what} {file}: {_unreadable(exc)}") from None
    return text[0] if text else ""


def api_token(path: str, where: str) -> bytes:
    """The management API's bearer token: the file's first line (the proxy's, and what
    `spicetap vv --mint-token` sends it)."""
    token = secret_line(path, where).strip()
    problem = token_problem(token)
    if problem is not None:  # never the token itself: it may be a secret in the wrong file
        raise UserError(f"{where} {path}: {problem}")
    return token.encode()


def _unreadable(exc: OSError | UnicodeDecodeError) -> str:
    # never str(exc): a decoding error quotes the bytes around the fault (the secret)
    if isinstance(exc, UnicodeDecodeError):
        return "not UTF-8 text"
    return f"cannot read ({exc.strerror or type(exc).__name__})"


def _secret(value: str | None, file: str | None, what: str) -> bytes | None:
    """A password from the config (value) or from a file (first line); None when absent."""
    if file is not None:
        value = secret_line(file, f"{what} file")
    if value is None:
        return None
    secret = value.encode()
    if not secret or len(secret) > MAX_PASSWORD or b"\0" in secret:
        raise UserError(f"{what}: a SPICE password has 1 to {MAX_PASSWORD} bytes")
    return secret


def read_tokens(file: str) -> list[Token]:
    """The viewer tokens file's tokens; UserError naming the file (and a line, never a
    token) when it cannot be read or parsed. At start, and whenever the file changes."""
    try:
        text = Path(file).read_text(encoding="utf-8")
        return parse_tokens(text, time.time(), time.monotonic())
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"viewer tokens file {file}: {_unreadable(exc)}") from None
    except ValueError as exc:
        raise UserError(f"viewer tokens file {file}: {exc}") from None


def link_policy_from(
    args: argparse.Namespace,
    cp: ProxySection,
    mintable: bool = False,
    key: TicketKey | None = None,
) -> LinkPolicy:
    """`mintable`: the management API may mint tokens (it has a token of its own), so
    inject needs no viewer password or tokens file to start with. `key`: spicetap's key
    pair so far (a reload keeps it), else a new one where the mode needs it."""
    names = [n for arg in args.mask_caps for n in arg.split(",")] or list(cp.mask_caps)
    try:
        mask = CapMask.parse(names)
    except UnknownCap as exc:
        where = "--mask-caps" if args.mask_caps else "[proxy] mask_caps"
        raise UserError(f"{where}: {exc}") from None
    return _policy(
        mask,
        args.auth or cp.auth,
        Secrets(
            cp.viewer_password,
            args.viewer_password_file or cp.viewer_password_file,
            args.viewer_tokens_file or cp.viewer_tokens_file,
            cp.server_password,
            args.server_password_file or cp.server_password_file,
        ),
        "--auth",
        key,
        mintable=mintable,
    )


def target_policy(
    name: str, section: TargetSection, base: LinkPolicy, mintable: bool = False
) -> LinkPolicy | None:
    """[targets.NAME]'s own authentication (mode, inject credentials), else None when the
    target follows [proxy] and minted tokens do not concern it (no inject). Capability
    masking stays the proxy's. Under inject the target's policy is scoped to its name: the
    tokens minted for it open its routes alone."""
    if not section.own_auth:
        return scoped(base, name) if base.auth == "inject" else None
    where = f"[targets.{name}] auth"
    mode = section.auth or base.auth
    if mode not in AUTH_MODES:
        raise UserError(f"{where} {mode!r}: expected one of {', '.join(AUTH_MODES)}")
    secrets = Secrets(
        section.viewer_password,
        section.viewer_password_file,
        section.viewer_tokens_file,
        section.server_password,
        section.server_password_file,
    )
    return scoped(_policy(base.mask, mode, secrets, where, base.key, mintable=mintable), name)


def scoped(policy: LinkPolicy, scope: str) -> LinkPolicy:
    """The policy for the routes of one target ("" the main upstream): under inject, the
    tokens minted for that target open them (and no other target's)."""
    return replace(policy, scope=scope) if policy.auth == "inject" else policy


@dataclass(frozen=True)
class Secrets:
    """Where inject mode's credentials come from (values never printed)."""

    viewer_password: str | None = field(default=None, repr=False)
    viewer_password_file: str | None = None
    viewer_tokens_file: str | None = None
    server_password: str | None = field(default=None, repr=False)
    server_password_file: str | None = None

    def given(self) -> bool:
        return any(
            v is not None
            for v in (
                self.viewer_password,
                self.viewer_password_file,
                self.viewer_tokens_file,
                self.server_password,
                self.server_password_file,
            )
        )


def _policy(
    mask: CapMask,
    mode: str,
    secrets: Secrets,
    where: str,
    key: TicketKey | None = None,
    *,
    mintable: bool = False,
) -> LinkPolicy:
    if mode != "inject":
        if secrets.given():
            raise UserError(f"{where}: viewer and server passwords and tokens are for inject only")
        key = (key or TicketKey.generate()) if mode == "intercept" else None
        return LinkPolicy(mask, mode, key)
    viewer_password = _secret(
        secrets.viewer_password, secrets.viewer_password_file, "viewer password"
    )
    tokens_file = secrets.viewer_tokens_file
    tokens = read_tokens(tokens_file) if tokens_file is not None else []
    server_password = _secret(
        secrets.server_password, secrets.server_password_file, "server password"
    )
    # a tokens file may start empty: it is read again whenever it changes
    if viewer_password is None and tokens_file is None and not mintable:
        raise UserError(
            f"{where} inject needs a viewer password, a viewer tokens file, or a management "
            "API with a token to mint tokens, for viewers to give"
        )
    if server_password is None:
        raise UserError(f"{where} inject needs the server password (server_password_file)")
    viewers = ViewerCredentials(viewer_password, tokens, tokens_file)
    return LinkPolicy(mask, mode, key or TicketKey.generate(), viewers, server_password)
