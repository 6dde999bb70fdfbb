"""`spicetap probe`'s protocol core: link to a SPICE server as a client would. No I/O, no
clock: bytes in, bytes out, one ProbeOutcome per connection.

Theory of operation (see proxy/core/framing.py for the wire layout):

    we send     LinkHeader(16) LinkMess                        (initial_bytes)
    server      LinkHeader(16) LinkReply (error, RSA key, caps)
    we send     [AuthMechanism u32 = 1] Ticket(128)            (returned by receive_data)
    server      LinkResult u32                                 -> the outcome

spice-server disconnects the viewer connected now whenever a new main channel authenticates.
So a probe, by default, makes two connections: the main channel's link reply gives the
version and capabilities, and the probe hangs up before the ticket; then an inputs channel
with connection id 0 carries the ticket. spice-server checks the ticket first (wrong:
PERMISSION_DENIED) and only then looks for the session (none: BAD_CONNECTION_ID), so
BAD_CONNECTION_ID there means "ticket accepted" and nobody is disturbed. A full link of the
main channel itself (what a viewer does) is available as full_link in the shell.

Success means a viewer with this password (or with none, when none is given) would be
admitted. A password-protected server probed without a password ends in "Authentication
failed", but the outcome still carries its version and capabilities, which the human summary
shows: the operator learns that it is SPICE and that it wants a password.

Error strings are a closed set (the JSON `error`): "Invalid SPICE magic" covers every peer
that does not answer with a well-formed SPICE link reply (wrong magic, closed early,
malformed reply); "Link error: NAME" names SPICE_LINK_ERR_* from the reply or the result.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from dissectors.api import CAPS, LINK
from proxy.core.framing import (
    CAP_AUTH_SASL,
    CAP_AUTH_SELECTION,
    CAP_AUTH_SPICE,
    CAP_MINI_HEADER,
    LINK_HEADER,
    LINK_MAGIC,
    LINK_MESS_FIXED,
    LINK_REPLY_FIXED,
    MAX_LINK_SIZE,
    TICKET_SIZE,
    U32,
    has_cap,
)
from proxy.core.ticket import MAX_PASSWORD  # spice-server refuses longer ones

CONNECTION_REFUSED = "Connection refused"
INVALID_MAGIC = "Invalid SPICE magic"
AUTH_FAILED = "Authentication failed"
TLS_FAILED = "TLS handshake failed"
TIMEOUT = "Timeout"

VERSION = (2, 2)  # SPICE_VERSION_MAJOR, SPICE_VERSION_MINOR (protocol.h)
MAIN = LINK.enum_names["channel_type"]["MAIN"]
INPUTS = LINK.enum_names["channel_type"]["INPUTS"]  # every QEMU with SPICE has one
LINK_ERRORS = LINK.enum_by_value["link_reply_error"]
PERMISSION_DENIED = LINK.enum_names["link_reply_error"]["PERMISSION_DENIED"]
BAD_CONNECTION_ID = LINK.enum_names["link_reply_error"]["BAD_CONNECTION_ID"]
# What a modern client (spice-gtk) offers: auth selection, RSA tickets, the mini header,
# and every main-channel capability. We close right after the link, so none costs anything.
CLIENT_COMMON = 1 << CAP_AUTH_SELECTION | 1 << CAP_AUTH_SPICE | 1 << CAP_MINI_HEADER
CLIENT_MAIN = sum(1 << bit for _name, bit in CAPS.enums["main_caps"][1])

Encrypt = Callable[[bytes, bytes], bytes]  # (DER public key, plaintext) -> ticket


def link_error_name(code: int) -> str:
    return f"Link error: {LINK_ERRORS.get(code, code)}"


def encrypt_ticket(public_key_der: bytes, plaintext: bytes) -> bytes:
    """spice-server's scheme: RSA-OAEP with SHA-1 (MGF1 too) under the key from the reply.
    Raises ValueError when the key is not an RSA public key."""
    key = serialization.load_der_public_key(public_key_der)
    if not isinstance(key, rsa.RSAPublicKey):
        raise ValueError("the link reply's key is not an RSA public key")
    sha1 = hashes.SHA1()  # the protocol's choice (spice-server, spice-gtk), not ours
    oaep = padding.OAEP(mgf=padding.MGF1(algorithm=sha1), algorithm=sha1, label=None)
    return key.encrypt(plaintext, oaep)


def check_password(password: str | None) -> str | None:
    """Why this password cannot be sent (None: it can)."""
    if password is None:
        return None
    raw = password.encode()
    if b"\0" in raw:
        return "a SPICE password cannot contain a NUL character"
    if len(raw) > MAX_PASSWORD:
        return f"a SPICE password is at most {MAX_PASSWORD} bytes (spice-server's limit)"
    return None


def cap_names(words: tuple[int, ...], caps_set: str, prefix: str) -> list[str]:
    """Names of the set bits, from the generated capability names; unknown bits as
    PREFIX_CAP_<bit> so nothing the server says is hidden."""
    by_bit = CAPS.enum_by_value[caps_set]
    names = []
    for word_index, word in enumerate(words):
        for shift in range(32):
            if word >> shift & 1:
                bit = word_index * 32 + shift
                names.append(by_bit.get(bit, f"{prefix}_CAP_{bit}"))
    return names


@dataclass(frozen=True)
class ProbeOutcome:
    """What a probe found. error None means the link completed."""

    error: str | None
    detail: str = ""  # a few words for people: why, or how authentication went
    major: int | None = None
    minor: int | None = None
    common_caps: tuple[int, ...] = ()
    main_caps: tuple[int, ...] = ()
    caps_read: bool = False  # a link reply with capabilities arrived

    @property
    def success(self) -> bool:
        return self.error is None

    @property
    def is_spice(self) -> bool:
        return self.major is not None

    @property
    def auth_methods(self) -> list[str]:
        if not has_cap(self.common_caps, CAP_AUTH_SELECTION):
            return ["spice"]  # a server without auth selection only takes the RSA ticket
        methods = {CAP_AUTH_SPICE: "spice", CAP_AUTH_SASL: "sasl"}
        return [name for bit, name in methods.items() if has_cap(self.common_caps, bit)]

    @property
    def capabilities(self) -> list[str]:
        return cap_names(self.common_caps, "common_caps", "COMMON") + cap_names(
            self.main_caps, "main_caps", "MAIN"
        )


def failure(error: str, detail: str = "") -> ProbeOutcome:
    return ProbeOutcome(error, detail)


def combine(main: ProbeOutcome, auth: ProbeOutcome) -> ProbeOutcome:
    """The main channel's reply (version, capabilities) with the ticket check's verdict."""
    if main.error is not None:
        return main
    return replace(
        auth,
        major=main.major,
        minor=main.minor,
        common_caps=main.common_caps,
        main_caps=main.main_caps,
        caps_read=main.caps_read,
    )


def to_json(host: str, port: int, outcome: ProbeOutcome) -> dict[str, Any]:
    """The probe's JSON answer (the CLI's --json and POST /api/spice/connect)."""
    if outcome.error is not None:
        answer: dict[str, Any] = {
            "success": False,
            "host": host,
            "port": port,
            "error": outcome.error,
        }
        if outcome.detail:  # the error is one of a fixed few; this says which case it was
            answer["detail"] = outcome.detail
        return answer
    return {
        "success": True,
        "host": host,
        "port": port,
        "protocolVersion": f"{outcome.major}.{outcome.minor}",
        "majorVersion": outcome.major,
        "minorVersion": outcome.minor,
        "capabilities": outcome.capabilities,
        "authMethods": outcome.auth_methods,
    }


def summary(host: str, port: int, outcome: ProbeOutcome) -> str:
    """A short human answer: the first line says it all."""
    where = f"{host}:{port}"
    said = "link ok" if outcome.success else str(outcome.error)
    if outcome.detail and outcome.detail.lower() != said.lower():
        said += f" ({outcome.detail})"
    if not outcome.is_spice:
        return f"{where}: {said}"
    lines = [f"{where}: SPICE {outcome.major}.{outcome.minor}, {said}"]
    if outcome.caps_read:
        lines.append(f"  capabilities: {' '.join(outcome.capabilities) or '-'}")
        lines.append(f"  auth methods: {' '.join(outcome.auth_methods) or '-'}")
    return "\n".join(lines)


class LinkProbe:
    """The client side of one channel connection's link stage. authenticate=False stops at
    the link reply (success: it was a good one); channel_type other than MAIN makes it the
    ticket check described above."""

    def __init__(
        self,
        password: str | None,
        *,
        channel_type: int = MAIN,
        authenticate: bool = True,
        encrypt: Encrypt = encrypt_ticket,
    ) -> None:
        problem = check_password(password)
        if problem is not None:
            raise ValueError(problem)  # our caller's mistake: checked before any I/O
        self.password = password
        self.channel_type = channel_type
        self.authenticate = authenticate
        self.encrypt = encrypt
        self.buf = bytearray()
        self.state = "header"  # header -> reply -> result -> done
        self.reply_size = 0
        self.outcome: ProbeOutcome | None = None
        self._found: dict[str, Any] = {}  # version and caps, once the reply is read

    @property
    def done(self) -> bool:
        return self.outcome is not None

    def initial_bytes(self) -> bytes:
        """LinkHeader + LinkMess for channel id 0 of a new session (connection id 0): one
        word of common caps, then (main only) one of main-channel caps, right after the
        fixed part."""
        channel_words = [CLIENT_MAIN] if self.channel_type == MAIN else []
        mess = LINK_MESS_FIXED.pack(
            0, self.channel_type, 0, 1, len(channel_words), LINK_MESS_FIXED.size
        )
        mess += b"".join(U32.pack(w) for w in (CLIENT_COMMON, *channel_words))
        return LINK_HEADER.pack(LINK_MAGIC, *VERSION, len(mess)) + mess

    def receive_data(self, data: bytes) -> bytes:
        """Bytes from the server (b"" at EOF); returns bytes to send (maybe none). Once
        `done`, `outcome` holds the answer and later bytes are ignored."""
        if self.done:
            return b""
        if not data:
            self._closed()
            return b""
        self.buf += data
        out = b""
        while not self.done:
            need = {"header": LINK_HEADER.size, "reply": self.reply_size, "result": U32.size}
            size = need[self.state]
            if len(self.buf) < size:
                break
            chunk = bytes(self.buf[:size])
            del self.buf[:size]
            if self.state == "header":
                self._header(chunk)
            elif self.state == "reply":
                out += self._reply(chunk)
            else:
                self._result(chunk)
        return out

    # -- internals -------------------------------------------------------------------------
    def _finish(self, error: str | None, detail: str = "") -> None:
        self.outcome = ProbeOutcome(error, detail, **self._found)
        self.state = "done"

    def _closed(self) -> None:
        if self.state == "result":
            # spice-server always answers a ticket with a result; silence is a broken link
            self._finish(link_error_name(1), "the server closed before the link result")
        elif self.state == "header":
            got = len(self.buf)
            self._finish(INVALID_MAGIC, f"the peer closed after {got} bytes, no link reply")
        else:
            self._finish(INVALID_MAGIC, "the peer closed in the middle of the link reply")

    def _header(self, chunk: bytes) -> None:
        magic, major, minor, size = LINK_HEADER.unpack(chunk)
        if magic != LINK_MAGIC:
            self._finish(INVALID_MAGIC, f"the peer answered {chunk[:4]!r}, not b'REDQ'")
        elif major != VERSION[0]:
            # a SPICE server of another generation: the link cannot go on
            self._finish(link_error_name(4), f"the server speaks SPICE {major}.{minor}")
        elif not LINK_REPLY_FIXED.size <= size <= MAX_LINK_SIZE:
            self._finish(INVALID_MAGIC, f"a link reply of {size} bytes")
        else:
            self._found = {"major": major, "minor": minor}
            self.reply_size, self.state = size, "reply"

    def _reply(self, body: bytes) -> bytes:
        # SpiceLinkReply: error u32, pub_key[162] (DER SubjectPublicKeyInfo of RSA-1024),
        # num_common_caps, num_channel_caps, caps_offset (from the reply's start), caps words
        error, key, n_common, n_channel, offset = LINK_REPLY_FIXED.unpack_from(body)
        if error:  # e.g. NEED_SECURED: the rest of the reply is zeros; the server closes
            self._finish(link_error_name(error), "the server refused the link")
            return b""
        count = n_common + n_channel
        if offset < LINK_REPLY_FIXED.size or offset + 4 * count > len(body):
            self._finish(INVALID_MAGIC, "capability words lie outside the link reply")
            return b""
        words = struct.unpack_from(f"<{count}I", body, offset)
        common = words[:n_common]
        main = words[n_common:] if self.channel_type == MAIN else ()
        self._found.update(common_caps=common, main_caps=main, caps_read=True)
        if not self.authenticate:
            self._finish(None, "link reply read")
            return b""
        # auth selection is used only when both sides set it; we always do
        selection = has_cap(common, CAP_AUTH_SELECTION)
        if selection and not has_cap(common, CAP_AUTH_SPICE):
            self._finish(AUTH_FAILED, "the server offers only SASL, which probe does not speak")
            return b""
        try:
            ticket = self.encrypt(key, (self.password or "").encode() + b"\0")
        except ValueError as exc:
            self._finish(INVALID_MAGIC, f"unusable public key in the link reply: {exc}")
            return b""
        if len(ticket) != TICKET_SIZE:
            self._finish(INVALID_MAGIC, f"the link reply's key is not RSA-1024 ({len(ticket)})")
            return b""
        self.state = "result"
        return (U32.pack(CAP_AUTH_SPICE) if selection else b"") + ticket

    def _result(self, chunk: bytes) -> None:
        (code,) = U32.unpack(chunk)
        given = self.password is not None
        # the ticket check's channel has no session: the ticket passed if that is all
        accepted = code == 0 or (code == BAD_CONNECTION_ID and self.channel_type != MAIN)
        if accepted:
            self._finish(None, "password accepted" if given else "no password needed")
        elif code == PERMISSION_DENIED:
            why = "wrong password" if given else "the server wants a password; none was given"
            self._finish(AUTH_FAILED, why)
        else:
            self._finish(link_error_name(code), "the server refused the ticket")
