"""An address and port as logs, the API and archives show them (no I/O)."""

from __future__ import annotations


def endpoint_text(address: tuple[str, int]) -> str:
    """ "192.0.2.7:4711"; "[2001:db8::1]:4711" (bracketed, as in URLs, RFC 3986, so the port
    cannot be read as the address's last group); the address alone when the port is 0,
    not known (a reverse proxy's X-Forwarded-For names none)."""
    host, port = address
    if port == 0:
        return host
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def listen_text(address: tuple[str, int]) -> str:
    """A requested listen address: as endpoint_text, but port 0 is shown, since there it
    means "any port" ("[::1]:0", "127.0.0.1:0")."""
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
