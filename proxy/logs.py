"""The proxy's and the recording process's log lines: one per event, whatever peers send.

Log lines quote what peers chose (a migration's host name, a refused CONNECT target, a
SASL failure reason). A newline in one would forge a line of its own, and a 60,000-letter
name would bury the rest; so control characters are escaped and a message is cut short.
Tracebacks (bugs, never a peer's doing) still follow on their own lines.
"""

from __future__ import annotations

import logging
import sys

from spicetap.errors import one_line as escaped

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
MAX_MESSAGE = 4096  # characters of one message; a line is at most that and its prefix


def one_line(text: str) -> str:
    """`text` as one line of at most MAX_MESSAGE characters (and the count of the rest)."""
    text = escaped(text)
    if len(text) > MAX_MESSAGE:
        text = f"{text[:MAX_MESSAGE]}... ({len(text) - MAX_MESSAGE} more characters)"
    return text


class OneLineFormatter(logging.Formatter):
    def formatMessage(self, record: logging.LogRecord) -> str:
        # format() has set record.message; the traceback, if any, is added after this
        record.message = one_line(record.message)
        return super().formatMessage(record)


def _without_traceback(record: logging.LogRecord) -> bool:
    record.exc_info = record.exc_text = None
    return True


def configure(level: int) -> None:
    """Log to stderr at `level`, one line per message."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(OneLineFormatter(LOG_FORMAT))
    logging.basicConfig(level=level, handlers=[handler])
    # Out of descriptors, trio logs each retry of accept() (10 a second) with a traceback
    # of its own code; its line already says what happened ("accept returned EMFILE").
    logging.getLogger("trio.serve_listeners").addFilter(_without_traceback)
