"""Cut, mutated and re-split messages never raise: decode() reports a structured error,
and the generated decoder agrees with the interpreter on every input."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dissectors import api, interp
from dissectors.errors import DecodeError, Malformed
from dissectors.protolang import ir
from tests.dissectors.strategies import message_values
from tests.dissectors.test_roundtrip import AGENT_MESSAGES, SPICE_MESSAGES, _id

SETTINGS = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def mutated(draw: st.DrawFn, body: ir.Struct) -> bytes:
    raw = bytearray(interp.encode(body, draw(message_values(body))))
    how = draw(st.sampled_from(["cut", "flip", "append", "all"]))
    if how in ("cut", "all") and raw:
        del raw[draw(st.integers(0, len(raw) - 1)) :]
    if how in ("flip", "all") and raw:
        for _ in range(draw(st.integers(1, 4))):
            i = draw(st.integers(0, len(raw) - 1))
            raw[i] = draw(st.integers(0, 255))
    if how in ("append", "all"):
        raw += draw(st.binary(min_size=1, max_size=16))
    return bytes(raw)


def _agree(dialect: api.Dialect, item: tuple[int, str, int, ir.Message], raw: bytes) -> None:
    ch, direction, num, msg = item
    dec = api.decode(ch, direction, num, raw, dialect)  # must not raise
    try:
        oracle, _regions = interp.decode(msg.body, raw)
    except Malformed:
        assert dec.error is not None and isinstance(dec.error, DecodeError)
        assert 0 <= dec.error.offset <= len(raw) + 4
        assert dec.error.reason
        return
    assert dec.error is None, dec.error
    assert dec.fields == oracle
    assert dec.struct is not None
    walked = api.named_value(dialect, ("struct:" + dec.struct, False), dec.fields)
    assert dec.named_fields() == walked


@pytest.mark.parametrize("item", SPICE_MESSAGES, ids=_id)
@SETTINGS
@given(data=st.data())
def test_spice_mutations(item: tuple[int, str, int, ir.Message], data: st.DataObject) -> None:
    _agree(api.SPICE, item, data.draw(mutated(item[3].body)))


@pytest.mark.parametrize("item", AGENT_MESSAGES, ids=_id)
@SETTINGS
@given(data=st.data())
def test_agent_mutations(item: tuple[int, str, int, ir.Message], data: st.DataObject) -> None:
    _agree(api.AGENT, item, data.draw(mutated(item[3].body)))


@given(raw=st.binary(max_size=64), msg_type=st.integers(0, 0xFFFF), ch=st.integers(0, 20))
@settings(max_examples=300, deadline=None)
def test_arbitrary_bytes_never_raise(raw: bytes, msg_type: int, ch: int) -> None:
    for direction in ("s2c", "c2s"):
        dec = api.decode(ch, direction, msg_type, raw)
        assert dec.error is not None or dec.fields is not None
