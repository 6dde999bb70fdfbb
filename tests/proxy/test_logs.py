"""Log lines stay one line each, whatever a peer put into the text they quote."""

from __future__ import annotations

import logging
import sys

from proxy.logs import LOG_FORMAT, MAX_MESSAGE, OneLineFormatter, one_line


def _formatted(msg: str, *args: object, exc: bool = False) -> str:
    exc_info = None
    if exc:
        try:
            raise ValueError("a bug")
        except ValueError:
            exc_info = sys.exc_info()
    record = logging.LogRecord("spicetap.migration", logging.INFO, "f", 1, msg, args, exc_info)
    return OneLineFormatter(LOG_FORMAT).format(record)


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
