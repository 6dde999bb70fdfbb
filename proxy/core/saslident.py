"""Whom a viewer logs in as over SASL: the name it gives the mechanism, never its proof.

Read only with the user's leave ([recording.privacy] sasl_user, --sasl-user): by default
the whole exchange is a secret. No I/O: the relay hands over each field of the exchange
(proxy/core/saslwire.py), its u32 length included, in order.

Where each mechanism puts the name (nothing after it, password or proof, is looked at):
- PLAIN (RFC 4616): the client's first data, authzid NUL authcid NUL password;
- LOGIN (draft-murchison-sasl-login): the client's first data if any, else its answer to
  the server's "Username:" prompt (the answer to "Password:" is never read);
- CRAM-MD5 (RFC 2195): the client's answer, name SP 32 hex digits;
- DIGEST-MD5 (RFC 2831): the client's digest-response, username="..." (realm, authzid);
- SCRAM-* (RFC 5802): the client-first-message, gs2 header ([a=authzid]), then n=name,
  with "," and "=" sent as =2C and =3D;
- ANONYMOUS (RFC 4505): no name; the trace the client may give;
- EXTERNAL (RFC 4422 appendix A): the authzid, if given.
Others (GSSAPI, GS2-KRB5, NTLM, OTP, ...) carry no name in clear, or one not read here.
"""

from __future__ import annotations

import re
import struct

U32 = struct.Struct("<I")
LONGEST = 256  # characters kept of a name: enough for any account, not a paste of junk
# RFC 4422 section 3.1: a mechanism name is 1 to 20 of these
MECHANISM = re.compile(r"[A-Z0-9_-]{1,20}")
# RFC 2831 digest-response: key=value pairs, a value a token or a quoted-string (\-escapes)
_DIGEST_PAIR = re.compile(rb'\s*([A-Za-z0-9_-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^",]*)\s*(?:,|$)', re.S)
_HEX_DIGEST = re.compile(r"[0-9a-fA-F]{32}")


def _data(field: bytes) -> bytes:
    """A field's data without its length and the NUL spice-gtk sends after it (counted in
    the length; spice-server drops it too)."""
    data = field[4:]
    return data[:-1] if data.endswith(b"\0") else data


def _text(raw: bytes, charset: str = "utf-8") -> str:
    """A name as text, printable and bounded: logs and listings show it as it is."""
    text = raw.decode(charset, "replace")
    text = "".join(c if c.isprintable() else "\N{REPLACEMENT CHARACTER}" for c in text)
    return text[:LONGEST]


# The auth record that says whom a viewer logged in as over SASL, and how it went: only with
# the user's leave (the proxy's and the importer's sasl_user), never the password or proof.
SASL_LOGIN = "sasl_login"


class SaslIdentity:
    """Feed it the exchange's fields; `fields()` says what was learnt."""

    def __init__(self) -> None:
        self.mechanism: str | None = None
        self.user: str | None = None
        self.extra: dict[str, str] = {}  # authzid ("as"), realm, trace
        self._client_fields = 0
        self._prompted_for_user = False  # LOGIN: the server's last data asked for the name

    def client(self, field: bytes) -> None:
        """A field the viewer sent: the mechanism's name first, then its data."""
        self._client_fields += 1
        if self._client_fields == 1:
            name = _data(field).decode("ascii", "replace").upper()
            self.mechanism = name if MECHANISM.fullmatch(name) else "(not a mechanism name)"
            return
        if self.user is not None or self.mechanism is None:
            return
        data = _data(field)
        first = self._client_fields == 2
        mech = self.mechanism
        if mech == "PLAIN" and first:
            self._plain(data)
        elif mech == "LOGIN" and data and (first or self._prompted_for_user):
            self.user = _text(data)
        elif mech == "CRAM-MD5":
            self._cram(data)
        elif mech == "DIGEST-MD5":
            self._digest(data)
        elif mech.startswith("SCRAM-") and first:
            self._scram(data)
        elif mech == "ANONYMOUS" and first and data:
            self.extra["trace"] = _text(data)
        elif mech == "EXTERNAL" and first and data:
            self.user = _text(data)

    def server(self, field: bytes) -> None:
        """A field the server sent (its data after each step)."""
        if self.mechanism == "LOGIN":
            self._prompted_for_user = _data(field).strip().lower().startswith(b"user")

    def fields(self) -> dict[str, str]:
        out = {"sasl_mechanism": self.mechanism or "(none chosen)"}
        if self.user is not None:
            out["user"] = self.user
        out.update(self.extra)
        if "as" in out and out["as"] == self.user:  # clients often name themselves twice
            del out["as"]
        return out

    # -- per mechanism ---------------------------------------------------------------------
    def _plain(self, data: bytes) -> None:
        parts = data.split(b"\0", 2)  # the third part is the password: never split further
        if len(parts) == 3:
            self.user = _text(parts[1])
            if parts[0]:
                self.extra["as"] = _text(parts[0])

    def _cram(self, data: bytes) -> None:
        name, space, digest = _text(data).rpartition(" ")
        if space and _HEX_DIGEST.fullmatch(digest):
            self.user = name

    def _digest(self, data: bytes) -> None:
        pairs: dict[bytes, bytes] = {}
        at = 0
        while at < len(data):
            match = _DIGEST_PAIR.match(data, at)
            if match is None or match.end() == at:
                break
            key, value = match.group(1).lower(), match.group(2)
            if value.startswith(b'"'):
                value = re.sub(rb"\\(.)", rb"\1", value[1:-1], flags=re.S)
            pairs.setdefault(key, value)
            at = match.end()
        if b"username" not in pairs:  # e.g. an empty first step: the challenge comes next
            return
        # RFC 2831 2.1.2: names are UTF-8 when the response says charset=utf-8
        charset = "utf-8" if pairs.get(b"charset", b"").lower() == b"utf-8" else "latin-1"
        self.user = _text(pairs[b"username"], charset)
        for key, name in ((b"realm", "realm"), (b"authzid", "as")):
            if pairs.get(key):
                self.extra[name] = _text(pairs[key], charset)

    def _scram(self, data: bytes) -> None:
        parts = data.split(b",")
        if len(parts) < 3 or parts[0][:1] not in (b"n", b"y", b"p"):
            return
        if parts[1].startswith(b"a="):
            self.extra["as"] = _text(_unescape(parts[1][2:]))
        for attribute in parts[2:4]:  # an optional reserved m= first
            if attribute.startswith(b"n="):
                self.user = _text(_unescape(attribute[2:]))
                return


def _unescape(saslname: bytes) -> bytes:
    return saslname.replace(b"=2C", b",").replace(b"=3D", b"=")
