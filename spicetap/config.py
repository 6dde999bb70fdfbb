"""spicetap's TOML configuration (see config/spicetap.example.toml).

Every section becomes a frozen dataclass; an unknown key, a wrong type or a bad value is a
ConfigError whose one-line message names the file, the key and what was expected.
"""

from __future__ import annotations

import datetime
import math
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints

from spicetap.archive.format import CHAIN_HASHES
from spicetap.archive.privacy import PolicyError, PrivacyPolicy


class ConfigError(ValueError):
    pass


DEFAULT_LISTEN = "127.0.0.1:5900"


@dataclass(frozen=True)
class ProxySection:
    # None: DEFAULT_LISTEN, unless the main upstream is served only on other fronts
    # (--tls-listen, ws_listen): a port nobody asked for is not opened
    listen: str | None = None
    upstream: str | None = None
    link_timeout: float = 10.0
    idle_timeout: float | None = None
    max_message: int = 64 << 20
    # connections served at once (each holds two file descriptors); None: what the
    # open-files limit allows (proxy/core/admission.py)
    max_connections: int | None = None
    # lock out a viewer address after this many failed authentications within
    # lockout_window seconds, for lockout_seconds (proxy/core/lockout.py); 0: never
    lockout_failures: int = 10
    lockout_window: float = 300.0
    lockout_seconds: float = 300.0
    # link-stage rewrites (proxy/core/linkrewrite.py): caps to clear, authentication mode
    mask_caps: tuple[str, ...] = ()  # "display:codec_h264", "common:mini_header", ...
    auth: str = "pass-through"  # or "intercept", "inject"
    viewer_password: str | None = None  # inject: what viewers must give spicetap
    viewer_password_file: str | None = None
    viewer_tokens_file: str | None = None  # inject: lines "TOKEN [EXPIRY]", one session each
    server_password: str | None = None  # inject: the real one, never shown to viewers
    server_password_file: str | None = None
    follow_migration: bool = True  # keep viewers on spicetap through a live migration
    ws_listen: str | None = None  # WebSocket front for spice-html5 (--ws-listen)
    ws_tls: bool = False  # wss:// and https:// there (--ws-tls)
    ws_origins: tuple[str, ...] = ()  # other pages allowed to open its WebSockets
    # reverse proxies in front of it whose Forwarded/X-Forwarded-For are believed
    ws_trusted_proxies: tuple[str, ...] = ()
    # load balancers in front of the reverse listeners that send a PROXY protocol header
    proxy_protocol_from: tuple[str, ...] = ()
    management: str | None = None  # HOST:PORT of the management HTTP API (--management)
    management_token_file: str | None = None  # its bearer token (first line)
    management_tls: bool = False  # HTTPS, with the viewer certificate
    log_format: str = "text"  # or "json": one object per line (--log-format)
    # what TLS fronts present to viewers (--tls-cert, --tls-key, --tls-subject): the
    # user's chain and key (read again at each reload: renewals), or none and one
    # spicetap's CA issues to tls_subject (default O=spicetap,CN=<listen host>)
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_subject: str | None = None


@dataclass(frozen=True)
class TargetSection:
    """[targets.NAME]: one SPICE server behind a gateway. Viewers reach it through its own
    reverse listeners (listen, tls_listen), or by NAME through the CONNECT front."""

    upstream: str | None = None
    upstream_tls: str | None = None
    upstream_ca: str | None = None
    upstream_host_subject: str | None = None
    upstream_insecure: bool = False
    listen: str | None = None
    tls_listen: str | None = None
    # what its tls_listen presents, when not [proxy]'s (a host subject of its own)
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_subject: str | None = None
    # this target's own authentication (else [proxy]'s): mode and inject credentials
    auth: str | None = None
    viewer_password: str | None = None
    viewer_password_file: str | None = None
    viewer_tokens_file: str | None = None
    server_password: str | None = None
    server_password_file: str | None = None

    @property
    def own_auth(self) -> bool:
        return any(getattr(self, f) is not None for f in TARGET_AUTH_FIELDS)

    @property
    def own_certificate(self) -> bool:
        """Its tls_listen shows a certificate of its own, not [proxy]'s."""
        return any(v is not None for v in (self.tls_cert, self.tls_key, self.tls_subject))


TARGET_AUTH_FIELDS = (
    "auth",
    "viewer_password",
    "viewer_password_file",
    "viewer_tokens_file",
    "server_password",
    "server_password_file",
)


@dataclass(frozen=True)
class ConnectSection:
    """[connect]: an HTTP CONNECT front (remote-viewer --spice-proxy, SPICE_PROXY)."""

    listen: str | None = None
    # HOST:PORT patterns viewers may reach besides the named targets; HOST may be a name,
    # an IP or a CIDR block, PORT a number, a range (5900-5999) or *
    allow: tuple[str, ...] = ()
    # how TLS upstreams reached by address (not by a target's name) are checked
    upstream_ca: str | None = None
    upstream_insecure: bool = False


@dataclass(frozen=True)
class RecordingSection:
    directory: str | None = None
    compress: bool = False
    flush_interval: float = 0.1  # seconds: the most a crash can lose
    max_buffer: int = 1 << 20
    fsync: bool = False
    # write archives around the page cache (O_DIRECT) where the filesystem allows
    # (spicetap/archive/appender.py); false writes through it
    direct_io: bool = True
    rotate_bytes: int | None = None
    rotate_seconds: float | None = None
    backlog: str = "gap"  # or "close"
    chain_hash: str = "blake3"  # or "sha256": the archives' hash chain (docs/archive-format.md)
    max_backlog_mb: int = 512  # relayed bytes the proxy holds for a recording falling behind
    nice: int = 10  # the recording process's niceness: forwarding gets the CPU first
    # seconds after a recording failure (a full disk) before new connections get a new
    # recording process (proxy/io/resuming.py)
    resume_after: float = 30.0
    privacy: PrivacyPolicy = field(default_factory=PrivacyPolicy)


@dataclass(frozen=True)
class Config:
    proxy: ProxySection = field(default_factory=ProxySection)
    recording: RecordingSection = field(default_factory=RecordingSection)
    connect: ConnectSection = field(default_factory=ConnectSection)
    targets: dict[str, TargetSection] = field(default_factory=dict)


_TYPES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
TARGET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")


# Numbers that may be zero (a flush on every record, no buffer, no lockout) or negative
# (niceness, whose range the recorder checks); every other number must be positive.
MAY_BE_ZERO = {"flush_interval", "max_buffer", "lockout_failures"}
MAY_BE_NEGATIVE = {"nice"}
MAY_BE_EMPTY = {"server_password", "viewer_password"}  # a SPICE ticket may be empty


def _number(where: str, name: str, value: float, kind: type) -> float:
    if name in MAY_BE_NEGATIVE:
        ok, want = True, "a finite number"
    elif name in MAY_BE_ZERO:
        ok, want = value >= 0, "0 or more"
    else:
        ok, want = value > 0, "a positive number"
    if not (ok and math.isfinite(value)):
        raise ConfigError(f"{where}{name} = {_toml(value)}: expected {want}")
    return float(value) if kind is float else value


def _check(where: str, name: str, hint: Any, value: Any) -> Any:
    allowed = [t for t in getattr(hint, "__args__", (hint,)) if t is not type(None)]
    if value is None and type(None) in getattr(hint, "__args__", ()):
        return None
    if getattr(hint, "__origin__", None) is tuple:  # tuple[str, ...]: a TOML array of strings
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return tuple(value)
        raise ConfigError(f"{where}{name} = {_toml(value)}: expected a list of strings")
    for t in allowed:
        if t in (int, float) and isinstance(value, int | float) and not isinstance(value, bool):
            if t is int and not isinstance(value, int):
                continue
            return _number(where, name, value, t)
        if t is str and isinstance(value, str):
            if not value.strip() and name not in MAY_BE_EMPTY:
                raise ConfigError(f"{where}{name} = {value!r}: expected a value, got an empty one")
            return value
        if t is bool and isinstance(value, bool):
            return value
    want = " or ".join(_TYPES.get(t, t.__name__) for t in allowed)
    raise ConfigError(f"{where}{name} = {_toml(value)}: expected {want}")


def _toml(value: Any) -> str:
    """A value as the file spells it (true, 1979-05-27, [1, 'a']), not as Python would."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, datetime.date | datetime.time):
        return value.isoformat()
    if isinstance(value, list):
        return f"[{', '.join(_toml(v) for v in value)}]"
    if isinstance(value, dict):
        return f"{{{', '.join(f'{k} = {_toml(v)}' for k, v in value.items())}}}"
    return repr(value)


def _section(cls: type[Any], data: dict[str, Any], where: str, nested: dict[str, Any]) -> Any:
    hints = get_type_hints(cls)
    known = {f.name for f in fields(cls) if f.init}  # not internal state (privacy._decisions)
    values: dict[str, Any] = {}
    for key, value in data.items():
        if key not in known:
            raise ConfigError(f"{where}unknown key {key!r} (known: {', '.join(sorted(known))})")
        if key in nested:
            if not isinstance(value, dict):
                raise ConfigError(f"{where}{key} must be a table")
            values[key] = nested[key](value, f"{where[:-2]}.{key}] ")  # [recording.privacy]
        else:
            values[key] = _check(where, key, hints[key], value)
    return cls(**values)


def _privacy(data: dict[str, Any], where: str) -> PrivacyPolicy:
    try:
        return _section(PrivacyPolicy, data, where, {})  # type: ignore[no-any-return]
    except PolicyError as exc:  # its message starts with "privacy.": `where` says so
        raise ConfigError(f"{where}{str(exc).removeprefix('privacy.')}") from None


def _targets(data: dict[str, Any], where: str) -> dict[str, TargetSection]:
    targets: dict[str, TargetSection] = {}
    for name, value in data.items():
        if not TARGET_NAME.fullmatch(name):
            raise ConfigError(
                f"{where}[targets.{name}]: a target name is letters, digits, '.', '_', '-'"
            )
        if not isinstance(value, dict):
            raise ConfigError(f"{where}targets.{name} must be a table")
        target = _section(TargetSection, value, f"{where}[targets.{name}] ", {})
        if target.upstream is None and target.upstream_tls is None:
            raise ConfigError(f"{where}[targets.{name}] needs upstream or upstream_tls")
        targets[name] = target
    return targets


def load_config(path: Path) -> Config:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    where = f"{path}: "
    sections: dict[str, Callable[[dict[str, Any], str], Any]] = {
        "proxy": lambda d, w: _section(ProxySection, d, w, {}),
        "recording": lambda d, w: _section(RecordingSection, d, w, {"privacy": _privacy}),
        "connect": lambda d, w: _section(ConnectSection, d, w, {}),
        "targets": lambda d, w: _targets(d, where),
    }
    values: dict[str, Any] = {}
    for key, value in data.items():
        if key not in sections:
            known = ", ".join(sections)
            raise ConfigError(f"{where}unknown section [{key}] (known: {known})")
        if not isinstance(value, dict):
            raise ConfigError(f"{where}{key} must be a table")
        values[key] = sections[key](value, f"{where}[{key}] ")
    config = Config(**values)
    if config.recording.backlog not in ("gap", "close"):
        raise ConfigError(
            f"{where}[recording] backlog = {config.recording.backlog!r}: expected 'gap' or 'close'"
        )
    if config.recording.chain_hash not in CHAIN_HASHES:
        raise ConfigError(
            f"{where}[recording] chain_hash = {config.recording.chain_hash!r}: expected "
            + " or ".join(repr(name) for name in CHAIN_HASHES)
        )
    if config.recording.max_backlog_mb < 1:
        raise ConfigError(
            f"{where}[recording] max_backlog_mb = {config.recording.max_backlog_mb}: "
            "expected a positive number of MiB"
        )
    if not 0 <= config.recording.nice <= 19:
        raise ConfigError(
            f"{where}[recording] nice = {config.recording.nice}: expected 0 (off) to 19"
        )
    if config.proxy.auth not in ("pass-through", "intercept", "inject"):
        raise ConfigError(
            f"{where}[proxy] auth = {config.proxy.auth!r}: "
            "expected 'pass-through', 'intercept' or 'inject'"
        )
    return config
