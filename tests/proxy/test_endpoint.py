"""How addresses are shown: IPv6 in brackets before a port, no port when none is known."""

from __future__ import annotations

import pytest

from proxy.core.endpoint import endpoint_text, listen_text
from spicetap.export import _endpoint


@pytest.mark.parametrize(
    ("address", "shown"),
    [
        (("192.0.2.7", 4711), "192.0.2.7:4711"),
        (("2001:db8::1", 4711), "[2001:db8::1]:4711"),
        (("::1", 5900), "[::1]:5900"),
        (("::ffff:192.0.2.7", 80), "[::ffff:192.0.2.7]:80"),
        (("192.0.2.7", 0), "192.0.2.7"),  # X-Forwarded-For names no port
        (("2001:db8::1", 0), "2001:db8::1"),
        (("vm1.example", 5930), "vm1.example:5930"),
    ],
)
def test_addresses_are_shown_unambiguously(address: tuple[str, int], shown: str) -> None:
    assert endpoint_text(address) == shown


@pytest.mark.parametrize("address", [("192.0.2.7", 4711), ("2001:db8::1", 4711), ("::1", 1)])
def test_what_is_shown_exports_back_to_the_same_address(address: tuple[str, int]) -> None:
    """`spicetap export` reads an open record's endpoints back for its packets."""
    assert _endpoint(endpoint_text(address)) == address


@pytest.mark.parametrize(
    ("address", "shown"),
    [
        (("127.0.0.1", 0), "127.0.0.1:0"),  # port 0 asks for any port: it is kept
        (("::1", 0), "[::1]:0"),
        (("::", 5900), "[::]:5900"),
        (("localhost", 5900), "localhost:5900"),
    ],
)
def test_requested_listen_addresses_keep_their_port(address: tuple[str, int], shown: str) -> None:
    assert listen_text(address) == shown
