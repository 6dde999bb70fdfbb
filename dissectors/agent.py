"""Reassemble VD agent messages carried in main-channel AGENT_DATA messages.

Agent messages are a byte stream per direction: a 20-byte VDAgentMessage header (protocol,
type, opaque, size) then `size` bytes, cut into AGENT_DATA chunks of at most 2048 bytes
(VD_AGENT_MAX_DATA_SIZE), the header only at the start of the first chunk. Clipboard messages
grow a selection prefix and grab a serial once both sides announced the matching capability,
so the reassembler follows ANNOUNCE_CAPABILITIES to pick the layout (agent.proto numbers
the variants as a bitmask: bit 0 selection, bit 1 grab serial).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from dissectors.api import AGENT, C2S, S2C, Decoded, decode

AGENT_HEADER = struct.Struct("<IIQI")  # protocol, type, opaque, size
VD_AGENT_PROTOCOL = 1
MAX_AGENT_MESSAGE = 64 * 1024 * 1024  # clipboard contents can be large; anything past is hostile
ANNOUNCE_CAPABILITIES = 6
CAP_CLIPBOARD_SELECTION = 6
CAP_CLIPBOARD_GRAB_SERIAL = 17


@dataclass(frozen=True, slots=True)
class AgentMessage:
    direction: str
    protocol: int
    msg_type: int
    opaque: int
    raw: bytes  # header + body, as the agent stream carried them
    decoded: Decoded


@dataclass(frozen=True, slots=True)
class AgentStreamError:
    direction: str
    reason: str


class AgentReassembler:
    """Feed the `data` of each AGENT_DATA message; get whole agent messages back."""

    def __init__(self) -> None:
        self.buf = {C2S: bytearray(), S2C: bytearray()}
        self.caps: dict[str, int] = {}
        self.broken: set[str] = set()
        self.touched: set[int] = set()

    def variant(self) -> int:
        both = self.caps.get(C2S, 0) & self.caps.get(S2C, 0)
        return (both >> CAP_CLIPBOARD_SELECTION & 1) | (both >> CAP_CLIPBOARD_GRAB_SERIAL & 1) << 1

    def feed(self, direction: str, chunk: bytes) -> list[AgentMessage | AgentStreamError]:
        """Whole messages completed by `chunk`; `self.touched` then holds the types of every
        agent message this chunk carried bytes of (privacy rules redact chunks by it)."""
        self.touched = set()
        if direction in self.broken:
            return []
        buf = self.buf[direction]
        if len(buf) >= AGENT_HEADER.size:  # the chunk continues a message begun earlier
            self.touched.add(AGENT_HEADER.unpack_from(buf)[1])
        buf += chunk
        out: list[AgentMessage | AgentStreamError] = []
        while len(buf) >= AGENT_HEADER.size:
            protocol, msg_type, opaque, size = AGENT_HEADER.unpack_from(buf)
            if protocol != VD_AGENT_PROTOCOL or size > MAX_AGENT_MESSAGE:
                out.append(
                    AgentStreamError(
                        direction, f"bad agent header (protocol {protocol}, size {size})"
                    )
                )
                self.broken.add(direction)
                buf.clear()
                break
            self.touched.add(msg_type)
            end = AGENT_HEADER.size + size
            if len(buf) < end:
                break
            raw = bytes(buf[:end])
            del buf[:end]
            body = raw[AGENT_HEADER.size :]
            decoded = decode(self.variant(), direction, msg_type, body, AGENT)
            if msg_type == ANNOUNCE_CAPABILITIES and decoded.fields is not None:
                words = decoded.fields.get("caps") or [0]
                self.caps[direction] = int(words[0])
            out.append(AgentMessage(direction, protocol, msg_type, opaque, raw, decoded))
        return out

    def pending(self, direction: str) -> int:
        return len(self.buf[direction])
