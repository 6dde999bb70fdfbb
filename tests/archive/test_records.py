"""Records to archive maps: the view's long byte strings shortened, the privacy decision
remembered per kind of record and always the same as deciding afresh."""

from __future__ import annotations

import dataclasses
import itertools

import pytest

from spicetap.archive.privacy import PrivacyPolicy, decide
from spicetap.archive.records import VIEW_BYTES, compact

LONG = bytes(range(256)) * 2


def test_compact_shortens_long_bytes_at_any_depth_and_keeps_the_rest() -> None:
    view = {"a": 1, "b": [{"c": LONG, "d": b"short"}, 5], "e": {"f": LONG}, "g": "x"}
    out = compact(view)
    assert out == {
        "a": 1,
        "b": [{"c": {"len": len(LONG), "head": LONG[:32]}, "d": b"short"}, 5],
        "e": {"f": {"len": len(LONG), "head": LONG[:32]}},
        "g": "x",
    }
    assert view["e"] == {"f": LONG}  # the original is left as it was


@pytest.mark.parametrize(
    "view",
    [
        {"dx": 3, "dy": -2, "buttons_state": []},
        {"data": bytes(VIEW_BYTES)},  # exactly the limit: kept
        {"rects": [{"top": 1, "names": ["a", "b"]}], "none": None, "f": 1.5},
        [],
        "text",
    ],
)
def test_a_view_with_nothing_to_shorten_is_the_same_object(view: object) -> None:
    assert compact(view) is view


POLICIES = [
    PrivacyPolicy(),
    PrivacyPolicy(keys="events", clipboard="hash", files="metadata", display=False),
    PrivacyPolicy(keys="none", audio=False),
]
KINDS = list(
    itertools.product(
        ["inputs", "main", "display", "playback", "record"],
        ["c2s", "s2c"],
        ["message", "agent", "link"],
        ["key_down", "clipboard", "file_xfer_data", "agent_data", "draw_copy", "data",
         "ticket", "mouse_motion", None],
        [frozenset(), frozenset({4}), frozenset({12})],
    )
)  # fmt: skip


@pytest.mark.parametrize("policy", POLICIES)
def test_remembered_decisions_are_what_decide_says(policy: PrivacyPolicy) -> None:
    for _ in range(2):  # the second time from memory
        for kind in KINDS:
            assert policy.decision(*kind) == decide(policy, *kind), kind
    assert policy == dataclasses.replace(policy)  # what it remembers is not what it is


def test_the_policy_describes_its_settings_not_its_memory() -> None:
    policy = POLICIES[1]
    policy.decision("inputs", "c2s", "message", "key_down", frozenset())
    assert policy.describe() == {
        "keys": "events",
        "clipboard": "hash",
        "files": "metadata",
        "display": False,
        "audio": True,
        "sasl_user": False,
        "tickets": "never",
        "passwords": "never",
        "sasl": "never",
    }
    said = dataclasses.replace(policy, sasl_user=True).describe()
    assert (said["sasl_user"], said["sasl"]) == (True, "the user name only")
