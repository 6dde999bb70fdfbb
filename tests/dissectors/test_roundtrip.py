"""Every message of every channel, both directions: generated values round-trip through
the generated encoder/decoder and agree with the interpreter (the oracle)."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dissectors import api, interp
from dissectors.protolang import ir
from dissectors.protolang.resolve import load
from dissectors.regen import DEFS_DIR, REFERENCE_PROTO
from tests.conftest import require
from tests.dissectors.strategies import message_values

SETTINGS = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _messages(protocol: ir.Protocol | None) -> list[tuple[int, str, int, ir.Message]]:
    if protocol is None:
        return []
    return [
        (ch.number, d, num, msg)
        for ch in protocol.channels
        for d in ("s2c", "c2s")
        for num, msg in sorted(ch.messages(d).items())
    ]


_SPICE = (
    load(REFERENCE_PROTO, (DEFS_DIR / "spice-wire.proto",)) if REFERENCE_PROTO.is_file() else None
)
SPICE_MESSAGES = _messages(_SPICE)
AGENT_MESSAGES = _messages(load(DEFS_DIR / "agent.proto"))


def _id(item: tuple[int, str, int, ir.Message]) -> str:
    return f"{item[0]}-{item[1]}-{item[2]}-{item[3].name}"


def test_reference_proto_present() -> None:
    require(_SPICE is not None, f"reference spice.proto at {REFERENCE_PROTO}")
    assert _SPICE is not None
    # all eleven channels of the protocol block, with their numbers
    assert {c.name: c.number for c in _SPICE.channels} == {
        "main": 1,
        "display": 2,
        "inputs": 3,
        "cursor": 4,
        "playback": 5,
        "record": 6,
        "tunnel": 7,
        "smartcard": 8,
        "usbredir": 9,
        "port": 10,
        "webdav": 11,
    }
    # every message the IR knows is in the generated table, under the same name
    for ch, d, num, msg in SPICE_MESSAGES:
        assert api.SPICE.messages[(ch, d, num)][0] == msg.name


def _check(
    dialect: api.Dialect, item: tuple[int, str, int, ir.Message], data: st.DataObject
) -> None:
    ch, direction, num, msg = item
    value = data.draw(message_values(msg.body), label="value")
    raw = interp.encode(msg.body, value)
    dec = api.decode(ch, direction, num, raw, dialect)
    assert dec.error is None, dec.error
    assert dec.fully_dissected, (dec.covered, dec.size)
    assert dec.fields == value
    oracle, _regions = interp.decode(msg.body, raw)
    assert oracle == dec.fields
    assert api.encode(ch, direction, num, dec.fields, dialect) == raw
    # the named view made once per struct is the schema walk's
    assert dec.struct is not None
    walked = api.named_value(dialect, ("struct:" + dec.struct, False), dec.fields)
    assert dec.named_fields() == walked
    assert dec.named_fields() == walked  # again: flag names now come from memory


@pytest.mark.parametrize("item", SPICE_MESSAGES, ids=_id)
@SETTINGS
@given(data=st.data())
def test_spice_message_roundtrip(
    item: tuple[int, str, int, ir.Message], data: st.DataObject
) -> None:
    _check(api.SPICE, item, data)


@pytest.mark.parametrize("item", AGENT_MESSAGES, ids=_id)
@SETTINGS
@given(data=st.data())
def test_agent_message_roundtrip(
    item: tuple[int, str, int, ir.Message], data: st.DataObject
) -> None:
    _check(api.AGENT, item, data)


@pytest.mark.parametrize("name", sorted(api.LINK.named))
@SETTINGS
@given(data=st.data())
def test_link_struct_roundtrip(name: str, data: st.DataObject) -> None:
    proto = load(DEFS_DIR / "link.proto")
    body = proto.structs[name]
    value = data.draw(message_values(body))
    raw = interp.encode(body, value)
    decoded, covered = api.LINK.decode_struct(api.LINK.named[name], raw)
    assert decoded == value
    struct = api.LINK.named[name]
    walked = api.named_value(api.LINK, ("struct:" + struct, False), decoded)
    assert api.LINK.namer(struct)(decoded) == walked
    assert covered == len(raw)
    assert api.LINK.encode_struct(api.LINK.named[name], decoded) == raw
