"""Errors every command shares."""


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
