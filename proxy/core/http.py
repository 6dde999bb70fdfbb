"""Just enough HTTP/1.1 for the WebSocket front: read one request head, write one response.

No I/O. `HeadReader.feed(bytes)` returns the parsed `Request` once the head is complete,
`None` while more bytes are needed, or an `HttpError` (status and reason) when the head is
malformed or too big. Nothing here raises on peer input. The head is bounded (MAX_HEAD
bytes, MAX_HEADERS fields), so a client can never make us buffer more than that.
"""

from __future__ import annotations

from dataclasses import dataclass

import h11

MAX_HEAD = 16 * 1024  # request line + fields; browsers send well under 2 KiB
MAX_HEADERS = 64

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


class BoundedServer(h11.Connection):
    """h11's server side, its request head bounded by MAX_HEAD however it arrives: h11
    bounds only a head still incomplete, so one that came whole in a read passed at any
    size. Every HTTP front reads one request per connection through this."""

    def __init__(self) -> None:
        super().__init__(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        self.received = 0

    def receive_data(self, data: bytes) -> None:
        self.received += len(data)
        super().receive_data(data)

    def head_too_big(self) -> bool:
        """Right after the Request event: whether its head went past MAX_HEAD."""
        return self.received - len(self.trailing_data[0]) > MAX_HEAD


@dataclass(frozen=True, slots=True)
class HttpError:
    status: int
    reason: str


class HeadReader:
    """Collects one request head. After a result, `rest` holds the bytes that followed it.
    h11 (as for the CONNECT front and the management API) does the parsing, so framing,
    field syntax and the size bound follow RFC 9112 in one place."""

    def __init__(self) -> None:
        self._conn = BoundedServer()
        self.rest = b""
        self.done = False

    def feed(self, data: bytes) -> Request | HttpError | None:
        if self.done:
            return HttpError(400, "request already read")
        self._conn.receive_data(data)  # b"": the peer closed
        try:
            event = self._conn.next_event()
        except h11.RemoteProtocolError as exc:
            self.done = True
            if exc.error_status_hint == 431:
                return HttpError(431, f"request head over {MAX_HEAD} bytes")
            return HttpError(exc.error_status_hint, f"malformed request ({exc})")
        if event is h11.NEED_DATA:
            return None
        self.done = True
        if not isinstance(event, h11.Request):
            return HttpError(400, "connection closed inside the request head")
        self.rest = self._conn.trailing_data[0]
        if self._conn.head_too_big():
            return HttpError(431, f"request head over {MAX_HEAD} bytes")
        return _request(event)


def _request(event: h11.Request) -> Request | HttpError:
    if len(event.headers) > MAX_HEADERS:
        return HttpError(431, f"more than {MAX_HEADERS} header fields")
    headers: dict[str, str] = {}
    try:
        for name, value in event.headers:
            key, text = name.decode("ascii"), value.decode("ascii")
            headers[key] = f"{headers[key]}, {text}" if key in headers else text
        target = event.target.decode("ascii")
    except UnicodeDecodeError:
        return HttpError(400, "request is not ASCII")
    return Request(event.method.decode("ascii"), target, event.http_version.decode(), headers)


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
