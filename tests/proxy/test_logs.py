"""Log lines stay one line each, whatever a peer put into the text they quote."""

from __future__ import annotations

import json
import logging
import sys

from proxy.logs import LOG_FORMAT, MAX_MESSAGE, JsonFormatter, OneLineFormatter, one_line


def _record(name: str, msg: str, args: tuple[object, ...], exc: bool) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError("a bug")
        except ValueError:
            exc_info = sys.exc_info()
    return logging.LogRecord(name, logging.WARNING, "f", 1, msg, args, exc_info)


def _formatted(msg: str, *args: object, exc: bool = False) -> str:
    return OneLineFormatter(LOG_FORMAT).format(_record("spicetap.migration", msg, args, exc))


def test_a_peers_newlines_cannot_forge_a_line() -> None:
    host = "x\nFAKE LOG LINE\r\n\x1b[31m\u2028\x85"
    line = _formatted("following a migration to %s (port %s)", host, 5900)
    assert line.splitlines() == [line]
    assert line.endswith(
        "following a migration to x\\nFAKE LOG LINE\\r\\n\\x1b[31m\\u2028\\x85 (port 5900)"
    )


def test_a_huge_message_is_cut_and_says_how_much() -> None:
    line = _formatted("to %s", "h" * 60_000)
    assert line.endswith(f"... ({60_003 - MAX_MESSAGE} more characters)")
    assert len(line) < MAX_MESSAGE + 100
    assert one_line("é plain text, tabs\tescaped") == "é plain text, tabs\\tescaped"


def test_a_traceback_still_follows_on_its_own_lines() -> None:
    lines = _formatted("management request failed", exc=True).splitlines()
    assert lines[0].endswith("management request failed")
    assert lines[1] == "Traceback (most recent call last):"
    assert lines[-1] == "ValueError: a bug"


def _json(msg: str, *args: object, exc: bool = False, **fields: object) -> str:
    record = _record("spicetap.proxy", msg, args, exc)
    if fields:
        record.fields = fields
    return JsonFormatter().format(record)


def test_a_json_line_is_one_object_with_the_events_fields() -> None:
    host = "x\nFAKE LOG LINE\u2028"
    line = _json("channel %d: %s", 7, host, event="channel_open", conn=7, message="not this")
    assert line.splitlines() == [line]
    obj = json.loads(line)
    assert obj["message"] == f"channel 7: {host}"  # the field cannot replace it
    assert (obj["event"], obj["conn"], obj["level"], obj["logger"]) == (
        "channel_open", 7, "warning", "spicetap.proxy",
    )  # fmt: skip
    assert obj["time"].endswith("Z") and "T" in obj["time"]


def test_a_json_line_cuts_huge_messages_and_carries_a_traceback_as_a_field() -> None:
    obj = json.loads(_json("to %s", "h" * 60_000))
    assert obj["message"].endswith(f"... ({60_003 - MAX_MESSAGE} more characters)")
    line = _json("management request failed", exc=True)
    assert line.splitlines() == [line]
    assert json.loads(line)["traceback"].endswith("ValueError: a bug")
