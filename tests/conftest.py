"""Shared fixtures: the reference spice.proto and real captures (extra corpus)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from dissectors.protolang import ir
from dissectors.protolang.resolve import load
from dissectors.regen import DEFS_DIR, LAB_CAPTURES, REFERENCE_PROTO

IN_CI = bool(os.environ.get("CI"))


ELEVEN_CHANNELS = {
    "main",
    "display",
    "inputs",
    "cursor",
    "playback",
    "record",
    "usbredir",
    "smartcard",
    "port",
    "webdav",
}  # usbredir twice: 11 connections


@contextmanager
def peers() -> Iterator[None]:
    """Run real peers: a missing one skips locally, fails in CI."""
    from tests.harness import PeerMissing

    try:
        yield
    except PeerMissing as exc:
        if IN_CI:
            pytest.fail(f"peer missing in CI: {exc}")
        pytest.skip(f"peer missing: {exc}")


def require(condition: bool, what: str) -> None:
    """Skip locally when an outside input is missing; in CI that is a failure."""
    if not condition:
        if IN_CI:
            pytest.fail(f"missing in CI: {what}")
        pytest.skip(f"missing: {what}")


@pytest.fixture(scope="session")
def spice_ir() -> ir.Protocol:
    require(REFERENCE_PROTO.is_file(), f"reference spice.proto at {REFERENCE_PROTO}")
    return load(REFERENCE_PROTO, (DEFS_DIR / "spice-wire.proto",))


@pytest.fixture(scope="session")
def agent_ir() -> ir.Protocol:
    return load(DEFS_DIR / "agent.proto")


@pytest.fixture(scope="session")
def link_ir() -> ir.Protocol:
    return load(DEFS_DIR / "link.proto")


@pytest.fixture(scope="session")
def lab_captures() -> list[Path]:
    require(LAB_CAPTURES.is_dir(), f"lab captures at {LAB_CAPTURES}")
    return sorted(LAB_CAPTURES.glob("*.pcapng"))
