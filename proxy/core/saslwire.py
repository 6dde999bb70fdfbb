"""SPICE's SASL exchange on the wire, as spice-server speaks it (server/red-stream.cpp; the
client side is spice-gtk's spice-channel.c). No I/O: the framer asks what comes next.

Once the client picks SASL (LinkAuthMechanism 2), the ticket and the 4-byte link result
give way to:

    s2c  u32 n, the mechanism list (n bytes, comma-separated)
    c2s  u32 n, the mechanism name (1-100 bytes); u32 n, the client's first data
    s2c  u32 n, the server's data; u8 complete (0: the client sends another step)
    c2s  u32 n, the client's next data              ... answered as above, until complete
    s2c  u32 SASL's result (0: OK; anything else is followed by u32 n and a reason)
    s2c  u32 link result, as after a ticket (reds_handle_link): 0, or e.g. BAD_CONNECTION_ID

A data length counts the data's NUL, 0 meaning no data at all. spice-server gives up on
data over 1 MiB (SASL_DATA_MAX_LEN). It reports a mechanism not on its list with a whole
link reply (INVALID_DATA), which starts with "REDQ": as a length that is over 1 GiB, so
the two cannot be confused.

After SASL's OK, spice-server wraps every byte in SASL's security layer, the link result
included, exactly when its own connection is plain TCP: it demands one there (SSF >= 56),
and over TLS it asks for none (max_ssf = 0). Behind a TLS server leg the link result and
the channel's messages come in clear. (Seen on the wire from QEMU 7.2's spice-server 0.15:
four zero bytes, then MAIN INIT.)
"""

from __future__ import annotations

import struct
from typing import NamedTuple

U32 = struct.Struct("<I")
LINK_MAGIC = b"REDQ"  # protocol.h: SPICE_MAGIC in wire order
MAX_DATA = 1 << 20  # SASL_DATA_MAX_LEN
MAX_MECHNAME = 100  # SASL_MAX_MECHNAME_LEN
MAX_REASON = 4096  # spice-server's is "Authentication failed"; anything long is hostile

# The framer's states for the exchange, each a length-prefixed field but for the last two:
# state -> (what the field is, its longest length, the state after it)
_FIELDS = {
    "sasl_mechlist": ("mechanism list", MAX_DATA, "sasl_reply"),
    "sasl_mechname": ("mechanism name", MAX_MECHNAME, "sasl_step"),
    "sasl_step": ("client data", MAX_DATA, "sasl_step"),
    "sasl_reply": ("server data", MAX_DATA, "sasl_complete"),
    "sasl_reason": ("failure reason", MAX_REASON, "done"),
}
STATES = frozenset({*_FIELDS, "sasl_complete", "sasl_result"})
# what a link reply in place of SASL data leads to (see the module's docstring)
RELINK = "header"


class Step(NamedTuple):
    kind: str  # the link unit: "sasl" (exchange data), "sasl_complete", "sasl_result", ...
    size: int  # bytes it takes, its length field included
    then: str  # the direction's next state ("" after an OK: the framer decides)


def next_step(state: str, buf: bytes | bytearray) -> Step | str | None:
    """The unit at the start of `buf` in `state`: a Step, why the bytes break the
    exchange (str), or None while more bytes are needed."""
    if state == "sasl_complete":
        if not buf:
            return None
        if buf[0] > 1:
            return f"SASL completion flag {buf[0]} (0 or 1 expected)"
        return Step("sasl_complete", 1, "sasl_result" if buf[0] else "sasl_reply")
    if len(buf) < 4:
        return None
    if state == "sasl_result":
        (result,) = U32.unpack_from(buf)
        return Step("sasl_result", 4, "" if result == 0 else "sasl_reason")
    what, longest, then = _FIELDS[state]
    if state in ("sasl_mechlist", "sasl_reply") and buf[:4] == LINK_MAGIC:
        return Step("", 0, RELINK)  # the server refuses with a link reply
    (size,) = U32.unpack_from(buf)
    least = 1 if state == "sasl_mechname" else 0
    if not least <= size <= longest:
        return f"SASL {what} of {size} bytes ({least} to {longest} allowed)"
    if len(buf) < 4 + size:
        return None
    return Step("sasl_reason" if state == "sasl_reason" else "sasl", 4 + size, then)
