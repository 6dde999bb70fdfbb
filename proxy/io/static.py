"""spice-html5's own files, served from the WebSocket port so a browser needs nothing else.

Only files under one directory (Debian's spice-html5 package installs them in
/usr/share/spice-html5) are served, read-only, GET and HEAD, one request per connection.
A path is refused before the file system is touched when it could leave that directory
(a "..", "." or empty segment, a backslash or NUL, once percent-decoding is undone), and
again after resolving symbolic links.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote

import trio

from proxy.core.http import HttpError, Request, error_response, response

SPICE_HTML5_DIR = Path("/usr/share/spice-html5")
INDEX = "/spice_auto.html"  # reads host and port from its own URL: this very port
MAX_FILE = 8 << 20  # spice-html5's largest file is 0.2 MB

# a module script must come with a JavaScript type or the browser refuses to run it
TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".map": "application/json",
    ".json": "application/json",
    ".png": "image/png",
    ".svg": "image/svg+xml",
    ".ico": "image/x-icon",
    ".txt": "text/plain; charset=utf-8",
    ".md": "text/plain; charset=utf-8",
}


def safe_path(root: Path, target: str) -> Path | HttpError:
    """The file `target` names under `root`, or why not. No file system access."""
    path = target.split("?", 1)[0].split("#", 1)[0]
    if not path.startswith("/"):
        return HttpError(400, "request target must be a path")
    try:
        decoded = unquote(path, errors="strict")
    except UnicodeDecodeError:
        return HttpError(400, "path is not UTF-8")
    segments = decoded.split("/")[1:]
    if any(s in ("", ".", "..") or "\\" in s or "\0" in s for s in segments):
        return HttpError(403, "path leaves the spice-html5 directory")
    return root.joinpath(*segments)


def _describe_missing(root: Path) -> str:
    return (
        f"spice-html5 is not installed: no {root} "
        "(Debian: apt-get install spice-html5); the WebSocket itself works"
    )


async def static_response(root: Path, request: Request) -> bytes:
    """The whole response to a plain (non-upgrade) request."""
    if request.method not in ("GET", "HEAD"):
        return error_response(HttpError(405, "only GET and HEAD"), [("Allow", "GET, HEAD")])
    if not await trio.Path(root).is_dir():
        return error_response(HttpError(404, _describe_missing(root)))
    if request.target.split("?", 1)[0] == "/":
        return response(302, [("Location", INDEX)])
    found = safe_path(root, request.target)
    if isinstance(found, HttpError):
        return error_response(found)
    name = found.name
    try:
        real = await trio.Path(found).resolve(strict=True)
        inside = real.is_relative_to(await trio.Path(root).resolve(strict=True))
        size = (await trio.Path(real).stat()).st_size if inside else 0
        if not inside or not await trio.Path(real).is_file():
            return error_response(HttpError(404, f"{name}: not a file of spice-html5"))
        if size > MAX_FILE:
            return error_response(HttpError(403, f"{name}: over {MAX_FILE} bytes"))
        body = await trio.Path(real).read_bytes()
    except (OSError, RuntimeError):  # missing, unreadable, or a symlink loop
        return error_response(HttpError(404, f"{name}: no such file"))
    headers = [
        ("Content-Type", TYPES.get(real.suffix.lower(), "application/octet-stream")),
        ("X-Content-Type-Options", "nosniff"),
        ("Cache-Control", "no-cache"),
    ]
    return response(200, headers, body[:MAX_FILE], head_only=request.method == "HEAD")
