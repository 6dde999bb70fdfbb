"""The proxy's and the recording process's log lines: one per event, whatever peers send.

Log lines quote what peers chose (a migration's host name, a refused CONNECT target, a
SASL failure reason). A newline in one would forge a line of its own, and a 60,000-letter
name would bury the rest; so control characters are escaped and a message is cut short.
Tracebacks (bugs, never a peer's doing) still follow on their own lines.
"""

from __future__ import annotations

import datetime
import json
import logging
import sys
from typing import Any

from spicetap.errors import one_line as escaped

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
FORMATS = ("text", "json")  # --log-format
MAX_MESSAGE = 4096  # characters of one message; a line is at most that and its prefix


def one_line(text: str) -> str:
    """`text` as one line of at most MAX_MESSAGE characters (and the count of the rest)."""
    return _cut(escaped(text))


class OneLineFormatter(logging.Formatter):
    def formatMessage(self, record: logging.LogRecord) -> str:
        # format() has set record.message; the traceback, if any, is added after this
        record.message = one_line(record.message)
        return super().formatMessage(record)


def _without_traceback(record: logging.LogRecord) -> bool:
    record.exc_info = record.exc_text = None
    return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log shippers (journald, Loki, Elasticsearch): time,
    level, logger and message, the event's own fields (`extra={"fields": {...}}`: a
    channel's number, viewer, upstream, byte counts...), and a bug's traceback as a field.
    JSON escapes control characters, so a peer's text cannot forge a line here either."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
        out: dict[str, Any] = {
            "time": stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": _cut(record.getMessage()),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            out.update((k, v) for k, v in fields.items() if k not in out)
        if record.exc_info:
            out["traceback"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def _cut(text: str) -> str:
    if len(text) > MAX_MESSAGE:
        return f"{text[:MAX_MESSAGE]}... ({len(text) - MAX_MESSAGE} more characters)"
    return text


_style = "text"


def style() -> str:
    """The format configure() chose: the recording process logs in the proxy's."""
    return _style


def configure(level: int, style: str = "text") -> None:
    """Log to stderr at `level`, one line per message: text, or JSON (FORMATS)."""
    global _style  # noqa: PLW0603 (once per process, before any line)
    _style = style
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if style == "json" else OneLineFormatter(LOG_FORMAT))
    logging.basicConfig(level=level, handlers=[handler])
    # Out of descriptors, trio logs each retry of accept() (10 a second) with a traceback
    # of its own code; its line already says what happened ("accept returned EMFILE").
    logging.getLogger("trio.serve_listeners").addFilter(_without_traceback)
