"""The record builder's hot path: messages decoded in place in the framer's snapshot give
the very records that decoding a copy of each body gives."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dissectors import api
from dissectors.protolang import ir
from spicetap.records import RecordBuilder, _message_record
from tests.dissectors.test_mutations import mutated
from tests.dissectors.test_roundtrip import SPICE_MESSAGES, _id

SETTINGS = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
HEADER = 6  # a mini header's size: where the body starts in the message


@pytest.mark.parametrize("item", SPICE_MESSAGES, ids=_id)
@SETTINGS
@given(data=st.data())
def test_built_record_is_the_decoded_copy(
    item: tuple[int, str, int, ir.Message], data: st.DataObject
) -> None:
    ch, direction, num, msg = item
    body = data.draw(mutated(msg.body), label="body")
    before = data.draw(st.binary(max_size=40), label="before")
    after = data.draw(st.binary(max_size=40), label="after")
    ident = (0x1234, 5, api.SPICE.channel_name(ch), 0)
    build, at = RecordBuilder._builder(ch, ident)
    at(1.5)
    snapshot = before + bytes(HEADER) + body + after
    start = len(before)
    end = start + HEADER + len(body)
    rec = build(direction, num, snapshot, start, start + HEADER, end, None, 0)
    head = (1.5, *ident, direction, "message")
    expected = _message_record(head, snapshot[start:end], api.decode(ch, direction, num, body))
    assert rec == expected
    assert rec.decoded == expected.decoded
