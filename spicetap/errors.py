"""Errors every command shares."""

import re

# Characters that would break a message's line or the terminal showing it (a file named
# "a\nb"): C0 and C1 controls, DEL, Unicode's line and paragraph separators, and the
# surrogates Python stands undecodable bytes of a file name in with.
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")


class UserError(Exception):
    """Bad input from the user: printed as one line, exit status 2."""


def os_error_line(exc: OSError) -> str:
    """One line for a file the system refused: the path(s) and the reason, no traceback."""
    reason = exc.strerror or str(exc)
    if exc.filename is None:
        return reason
    if exc.filename2 is not None:
        return f"{exc.filename} -> {exc.filename2}: {reason}"
    return f"{exc.filename}: {reason}"


def one_line(text: str) -> str:
    """`text` with every character that could break its line escaped as repr() would,
    so a message naming any path prints as one line."""
    return _UNPRINTABLE.sub(lambda m: repr(m.group())[1:-1], text)
