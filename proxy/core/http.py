"""Just enough HTTP/1.1 for the WebSocket front: read one request head, write one response.

No I/O. `HeadReader.feed(bytes)` buffers until the blank line that ends a request head
(RFC 9112 §2.1) and returns the parsed `Request`, `None` while more bytes are needed, or an
`HttpError` (status and reason) when the head is malformed or too big. Nothing here raises
on peer input. The head is bounded (MAX_HEAD bytes, MAX_HEADERS fields), so a client can
never make us buffer more than that.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MAX_HEAD = 16 * 1024  # request line + fields; browsers send well under 2 KiB
MAX_HEADERS = 64

# RFC 9110 §5.6.2: a field name is a token
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_REASONS = {
    101: "Switching Protocols",
    200: "OK",
    302: "Found",
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    426: "Upgrade Required",
    431: "Request Header Fields Too Large",
}


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    target: str  # as sent: origin-form "/path?query" for everything we serve
    version: str  # "1.1"
    headers: dict[str, str]  # lower-case names; repeated fields joined with ", "

    def tokens(self, name: str) -> list[str]:
        """A comma-separated field as lower-case tokens (Connection, Upgrade...)."""
        return [t.strip().lower() for t in self.headers.get(name, "").split(",") if t.strip()]


@dataclass(frozen=True, slots=True)
class HttpError:
    status: int
    reason: str


class HeadReader:
    """Collects one request head. After a result, `rest` holds the bytes that followed it."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self.rest = b""
        self.done = False

    def feed(self, data: bytes) -> Request | HttpError | None:
        if self.done:
            return HttpError(400, "request already read")
        self._buffer += data
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buffer) > MAX_HEAD:
                self.done = True
                return HttpError(431, f"request head over {MAX_HEAD} bytes")
            if not data:
                self.done = True
                return HttpError(400, "connection closed inside the request head")
            return None
        self.done = True
        if end > MAX_HEAD:
            return HttpError(431, f"request head over {MAX_HEAD} bytes")
        head = bytes(self._buffer[:end])
        self.rest = bytes(self._buffer[end + 4 :])
        self._buffer.clear()
        return parse_head(head)


def parse_head(head: bytes) -> Request | HttpError:
    """Request line and fields, CRLF-separated, without the final blank line."""
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not parts[1] or not _TOKEN.fullmatch(parts[0]):
        return HttpError(400, "malformed request line")
    method, target, version = parts
    if not re.fullmatch(rb"HTTP/1\.[0-9]", version):
        return HttpError(400, "not an HTTP/1.x request")
    if len(lines) - 1 > MAX_HEADERS:
        return HttpError(431, f"more than {MAX_HEADERS} header fields")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        # no obsolete line folding (RFC 9112 §5.2), no space before the colon (§5.1)
        if not colon or not _TOKEN.fullmatch(name):
            return HttpError(400, "malformed header field")
        try:
            text = value.strip(b" \t").decode("ascii")
        except UnicodeDecodeError:
            return HttpError(400, "header field is not ASCII")
        key = name.decode("ascii").lower()
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    try:
        target_text = target.decode("ascii")
    except UnicodeDecodeError:
        return HttpError(400, "request target is not ASCII")
    return Request(method.decode("ascii"), target_text, version[5:].decode("ascii"), headers)


def response(
    status: int,
    headers: list[tuple[str, str]] | None = None,
    body: bytes = b"",
    *,
    head_only: bool = False,
) -> bytes:
    """A complete response; every one but 101 ends the connection (no keep-alive)."""
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}"]
    fields = list(headers or [])
    if status != 101:
        fields += [("Content-Length", str(len(body))), ("Connection", "close")]
    lines += [f"{name}: {value}" for name, value in fields]
    out = ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")
    return out if head_only or status == 101 else out + body


def error_response(error: HttpError, extra: list[tuple[str, str]] | None = None) -> bytes:
    """A plain-text error page saying what was wrong."""
    body = f"{error.status} {_REASONS.get(error.status, 'Error')}: {error.reason}\n".encode()
    headers = [("Content-Type", "text/plain; charset=utf-8"), *(extra or [])]
    return response(error.status, headers, body)
