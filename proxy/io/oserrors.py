"""The OS's own words for a failed connect: trio.open_tcp_stream raises one OSError ("all
attempts to connect to ... failed") with each attempt's error inside, as its cause."""

from __future__ import annotations

import os
import ssl


def os_reason(exc: OSError) -> str:
    """The first attempt's error as the OS says it (Connection refused, No route to host,
    a resolver's text), or the exception's own text when it carries none."""
    cause = exc.__cause__
    attempts = list(getattr(cause, "exceptions", None) or ([cause] if cause else []))
    for err in [*attempts, exc]:
        # an SSLError's errno is OpenSSL's code, not the OS's
        if isinstance(err, OSError) and not isinstance(err, ssl.SSLError) and err.errno:
            # resolver errors (negative numbers) carry their own text
            return os.strerror(err.errno) if err.errno > 0 else str(err.strerror)
    return str(exc)
