"""What a recording keeps, decided per channel and field before anything reaches the disk.

Tickets, SASL exchanges and passwords are never kept, whatever the policy. The rest:
- keys: "text" keeps key events with their scancodes (and a key name in the view);
  "events" keeps that a key went down or up and when, not which key; "none" drops them;
- clipboard: "content" keeps it; "hash" keeps type, length and SHA-256 only;
- files: "content" keeps transferred bytes; "metadata" keeps transfer id, name and size;
- display: False drops pixel data (images, video frames), keeping geometry;
- audio: False drops audio samples, keeping timing and format;
- sasl_user: True reads from the SASL exchange the name a viewer logs in as (never its
  password or proof: proxy/core/saslident.py) and keeps it in an `auth` record, the logs
  and the API; the exchange itself is still kept as lengths only.
A redacted record keeps its length and the reason; its raw bytes are gone, so replay of
those records is impossible by design.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, fields
from typing import Any

KEYS = ("text", "events", "none")
CLIPBOARD = ("content", "hash")
FILES = ("content", "metadata")

# VD agent message types (agent.proto): CLIPBOARD = 4, FILE_XFER_DATA = 12.
AGENT_CLIPBOARD = 4
AGENT_FILE_DATA = 12
KEY_MESSAGES = {"key_down", "key_up", "key_scancode"}
DISPLAY_PIXELS = {"stream_data", "stream_data_sized"}  # plus every draw_* message
AUDIO_SAMPLES = {"data", "mode"}


DECISIONS_KEPT = 4096


class PolicyError(ValueError):
    """A privacy setting is not one of the allowed values."""


# The name of an error record whose bytes came where a ticket or SASL does (the framer's
# in_secret_stage, see spicetap.records).
SECRET_STAGE = "secret_stage"


@dataclass(frozen=True)
class PrivacyPolicy:
    keys: str = "text"
    clipboard: str = "content"
    files: str = "content"
    display: bool = True
    audio: bool = True
    sasl_user: bool = False
    # decide()'s answers by record kind: a recording asks once per message
    _decisions: dict[tuple[Any, ...], Decision] = field(
        default_factory=dict, init=False, repr=False, compare=False, hash=False
    )

    def __post_init__(self) -> None:
        for name, allowed in (("keys", KEYS), ("clipboard", CLIPBOARD), ("files", FILES)):
            value = getattr(self, name)
            if value not in allowed:
                raise PolicyError(f"privacy.{name} = {value!r}: expected one of {allowed}")
        for name in ("display", "audio", "sasl_user"):
            if not isinstance(getattr(self, name), bool):
                raise PolicyError(f"privacy.{name} must be true or false")

    def describe(self) -> dict[str, Any]:
        settings = {f.name: getattr(self, f.name) for f in fields(self) if f.init}
        sasl = "the user name only" if self.sasl_user else "never"
        return {**settings, "tickets": "never", "passwords": "never", "sasl": sasl}

    def decision(
        self, channel: str, direction: str, kind: str, name: str | None, agents: frozenset[int]
    ) -> Decision:
        """decide(self, ...), remembered (a few hundred kinds of record at most)."""
        key = (channel, direction, kind, name, agents)
        found = self._decisions.get(key)
        if found is None:
            found = decide(self, channel, direction, kind, name, agents)
            if len(self._decisions) < DECISIONS_KEPT:
                self._decisions[key] = found
        return found


@dataclass(frozen=True)
class Decision:
    keep: bool = True
    redact: str | None = None  # reason; raw bytes are dropped
    hash_raw: bool = False  # keep the SHA-256 of what was dropped
    strip_view: tuple[str, ...] = ()  # view fields to replace by their length (and hash)


KEEP = Decision()
DROP = Decision(keep=False)


def decide(
    policy: PrivacyPolicy,
    channel: str,
    direction: str,
    kind: str,
    name: str | None,
    agent_types: frozenset[int],
) -> Decision:
    """The fate of one record."""
    if kind == "link" and name in ("ticket", "sasl"):
        return Decision(redact="secret")
    if kind == "error":  # its raw bytes are those that could not be framed, if any
        return _unframed(policy, channel, name)
    if channel == "inputs" and kind == "message" and name in KEY_MESSAGES:
        if policy.keys == "none":
            return DROP
        if policy.keys == "events":
            return Decision(redact="keys", strip_view=("code", "data"))
        return KEEP
    if channel == "main" and kind == "agent":
        if name == "clipboard" and policy.clipboard == "hash":
            return Decision(redact="clipboard", hash_raw=True, strip_view=("data",))
        if name == "file_xfer_data" and policy.files == "metadata":
            return Decision(redact="files", strip_view=("data",))
        return KEEP
    if channel == "main" and kind == "message" and name == "agent_data":
        if AGENT_CLIPBOARD in agent_types and policy.clipboard == "hash":
            return Decision(redact="clipboard", strip_view=("data",))
        if AGENT_FILE_DATA in agent_types and policy.files == "metadata":
            return Decision(redact="files", strip_view=("data",))
        return KEEP
    pixels = name is not None and (name.startswith("draw_") or name in DISPLAY_PIXELS)
    if channel == "display" and not policy.display and kind == "message" and pixels:
        return Decision(redact="display", strip_view=("data",))
    if channel in ("playback", "record") and not policy.audio and name in AUDIO_SAMPLES:
        return Decision(redact="audio", strip_view=("data",))
    return KEEP


def _unframed(policy: PrivacyPolicy, channel: str, name: str | None) -> Decision:
    """Bytes that could not be framed (a truncated or malformed unit) might be anything
    the channel carries: kept only where the policy keeps all of that channel's content."""
    if name == SECRET_STAGE:  # may hold the encrypted ticket, or SASL
        return Decision(redact="secret")
    held_back = (
        (channel == "inputs" and policy.keys != "text")
        or (channel == "main" and (policy.clipboard != "content" or policy.files != "content"))
        or (channel == "display" and not policy.display)
        or (channel in ("playback", "record") and not policy.audio)
    )
    return Decision(redact="unframed") if held_back else KEEP


def strip(view: Any, names: tuple[str, ...], with_hash: bool) -> Any:
    """A copy of a view without the named fields' bytes (at any depth)."""
    if isinstance(view, dict):
        out: dict[str, Any] = {}
        for key, value in view.items():
            if key in names and not isinstance(value, dict):
                out[key] = summary_of(value, with_hash)
            else:
                out[key] = strip(value, names, with_hash)
        return out
    if isinstance(view, list):
        return [strip(v, names, with_hash) for v in view]
    return view


def summary_of(value: Any, with_hash: bool) -> dict[str, Any]:
    data = value if isinstance(value, bytes) else repr(value).encode()
    out: dict[str, Any] = {"redacted": True, "len": len(data)}
    if with_hash:
        out["sha256"] = hashlib.sha256(data).hexdigest()
    return out
