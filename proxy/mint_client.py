"""Ask a running proxy's management API for a one-time viewer token (`POST /api/tokens`),
for `spicetap vv --mint-token`. Errors are one line naming the API and the reason, never
the API's token or the minted one."""

from __future__ import annotations

import http.client
import json
import ssl
from dataclasses import dataclass, field

from spicetap.errors import UserError

TIMEOUT = 15.0


@dataclass(frozen=True)
class ManagementApiAddress:
    host: str
    port: int
    bearer: str = field(repr=False)
    https: ssl.SSLContext | None = None  # None: plain HTTP

    @property
    def url(self) -> str:
        scheme = "https" if self.https is not None else "http"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}"


def mint_token(
    api: ManagementApiAddress, target: str | None, ttl: float, user: str | None = None
) -> str:
    """A fresh token for `target` (None: the main upstream), good for `ttl` seconds, for
    `user` if named."""
    body: dict[str, object] = {"ttl": ttl}
    if target is not None:
        body["target"] = target
    if user is not None:
        body["user"] = user
    conn: http.client.HTTPConnection
    if api.https is not None:
        conn = http.client.HTTPSConnection(api.host, api.port, timeout=TIMEOUT, context=api.https)
    else:
        conn = http.client.HTTPConnection(api.host, api.port, timeout=TIMEOUT)
    headers = {"Authorization": f"Bearer {api.bearer}", "Content-Type": "application/json"}
    try:
        conn.request("POST", "/api/tokens", body=json.dumps(body).encode(), headers=headers)
        response = conn.getresponse()
        raw = response.read(64 * 1024)
    except ssl.SSLError as exc:
        raise UserError(f"management API {api.url}: TLS failed ({exc.reason or exc})") from None
    except (OSError, http.client.HTTPException) as exc:
        reason = getattr(exc, "strerror", None) or type(exc).__name__
        raise UserError(f"management API {api.url}: {reason}") from None
    finally:
        conn.close()
    try:
        answer = json.loads(raw)
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        raise UserError(f"management API {api.url}: answered {response.status}, not JSON")
    if response.status != 201 or not isinstance(answer.get("token"), str):
        error = answer.get("error", "no token in the answer")
        raise UserError(f"management API {api.url}: {response.status} {error}")
    token: str = answer["token"]
    return token
