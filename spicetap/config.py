"""spicetap's TOML configuration (see config/spicetap.example.toml).

Every section becomes a frozen dataclass; an unknown key, a wrong type or a bad value is a
ConfigError whose one-line message names the file, the key and what was expected.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints

from spicetap.archive.privacy import PolicyError, PrivacyPolicy


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class ProxySection:
    listen: str = "127.0.0.1:5900"
    upstream: str | None = None
    link_timeout: float = 10.0
    idle_timeout: float | None = None
    max_message: int = 64 << 20


@dataclass(frozen=True)
class RecordingSection:
    directory: str | None = None
    compress: bool = False
    flush_interval: float = 0.1  # seconds: the most a crash can lose
    max_buffer: int = 1 << 20
    fsync: bool = False
    rotate_bytes: int | None = None
    rotate_seconds: float | None = None
    backlog: str = "gap"  # or "close"
    privacy: PrivacyPolicy = field(default_factory=PrivacyPolicy)


@dataclass(frozen=True)
class Config:
    proxy: ProxySection = field(default_factory=ProxySection)
    recording: RecordingSection = field(default_factory=RecordingSection)


_TYPES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _check(where: str, name: str, hint: Any, value: Any) -> Any:
    allowed = [t for t in getattr(hint, "__args__", (hint,)) if t is not type(None)]
    if value is None and type(None) in getattr(hint, "__args__", ()):
        return None
    for t in allowed:
        if t is float and isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if t in (bool, str) and isinstance(value, t):
            return value
    want = " or ".join(_TYPES.get(t, t.__name__) for t in allowed)
    raise ConfigError(f"{where}{name} = {value!r}: expected {want}")


def _section(cls: type[Any], data: dict[str, Any], where: str, nested: dict[str, Any]) -> Any:
    hints = get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    values: dict[str, Any] = {}
    for key, value in data.items():
        if key not in known:
            raise ConfigError(f"{where}unknown key {key!r} (known: {', '.join(sorted(known))})")
        if key in nested:
            if not isinstance(value, dict):
                raise ConfigError(f"{where}{key} must be a table")
            values[key] = nested[key](value, f"{where}{key}.")
        else:
            values[key] = _check(where, key, hints[key], value)
    return cls(**values)


def _privacy(data: dict[str, Any], where: str) -> PrivacyPolicy:
    try:
        return _section(PrivacyPolicy, data, where, {})  # type: ignore[no-any-return]
    except PolicyError as exc:  # its message starts with "privacy.": the key's own name
        raise ConfigError(f"{where.removesuffix('privacy.')}{exc}") from None


def load_config(path: Path) -> Config:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read ({exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    where = f"{path}: "
    sections = {
        "proxy": lambda d, w: _section(ProxySection, d, w, {}),
        "recording": lambda d, w: _section(RecordingSection, d, w, {"privacy": _privacy}),
    }
    values: dict[str, Any] = {}
    for key, value in data.items():
        if key not in sections:
            raise ConfigError(f"{where}unknown section [{key}] (known: proxy, recording)")
        if not isinstance(value, dict):
            raise ConfigError(f"{where}{key} must be a table")
        values[key] = sections[key](value, f"{where}[{key}] ")
    config = Config(**values)
    if config.recording.backlog not in ("gap", "close"):
        raise ConfigError(
            f"{where}[recording] backlog = {config.recording.backlog!r}: expected 'gap' or 'close'"
        )
    return config
