"""The record builder's hot path: messages decoded in place in the framer's snapshot give
the very records that decoding a copy of each body gives."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.spice_peers import MSG_DRAW_COPY, draw_copy
from dissectors import api
from dissectors.protolang import ir
from spicetap import records
from spicetap.archive.privacy import PrivacyPolicy
from spicetap.archive.records import to_archive
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


@pytest.mark.parametrize("item", SPICE_MESSAGES, ids=_id)
@SETTINGS
@given(data=st.data())
def test_views_archive_as_copies_do(
    item: tuple[int, str, int, ir.Message], data: st.DataObject
) -> None:
    """The recording process's builder (views=True) decodes long bodies from a memoryview,
    so their byte strings are views, not copies: archived, each record is the same map."""
    ch, direction, num, msg = item
    body = data.draw(mutated(msg.body), label="body")
    snapshot = bytes(HEADER) + body
    ident = (0x1234, 5, api.SPICE.channel_name(ch), 0)
    got = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(records, "VIEWS_FROM", 0)  # every body, not only long ones
        for views in (False, True):
            build, at = RecordBuilder._builder(ch, ident, views)
            at(1.5)
            got.append(build(direction, num, snapshot, 0, HEADER, len(snapshot), None, 0))
    copied, viewed = got
    policy = PrivacyPolicy()
    archived = to_archive(viewed, 0.0, policy)
    assert archived == to_archive(copied, 0.0, policy)
    assert memoryview not in _types(archived)  # compact() made every view bytes


def _types(value: object) -> set[type]:
    if isinstance(value, dict):
        return {dict}.union(*(_types(v) for v in value.values()))
    if isinstance(value, list):
        return {list}.union(*(_types(v) for v in value))
    return {type(value)}


def test_a_long_image_is_a_view_of_the_message_until_archived() -> None:
    """What the option is for: a DRAW_COPY's megabyte of pixels is not copied out of the
    message to be decoded, and its archive view still says how long it was."""
    snapshot = draw_copy(1 << 20)  # a mini header, then the body
    ident = (0x1234, 5, "display", 0)
    build, _at = RecordBuilder._builder(2, ident, True)
    rec = build("s2c", MSG_DRAW_COPY, snapshot, 0, HEADER, len(snapshot), None, 0)
    pixels = _longest(rec.decoded_fields)
    assert isinstance(pixels, memoryview) and pixels.obj is snapshot
    archived = to_archive(rec, 0.0, PrivacyPolicy())
    assert archived is not None and archived["raw"] is snapshot
    assert {"len": len(pixels), "head": bytes(pixels[:32])} in _values(archived["view"])


def _longest(value: object) -> object:
    found = [v for v in _values(value) if isinstance(v, bytes | memoryview)]
    return max(found, key=len)


def _values(value: object) -> list[object]:
    if isinstance(value, dict):
        return [value, *(x for v in value.values() for x in _values(v))]
    if isinstance(value, list):
        return [x for v in value for x in _values(v)]
    return [value]
