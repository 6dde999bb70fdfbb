"""The real-peer harness against real peers: QEMU/spice-server, spice-gtk, dumpcap.

These prove the harness itself works; proxy tests build on the same pieces.
A missing peer program skips a test locally but fails it in CI (env CI set),
so a CI machine without the packages cannot pass by skipping.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import peers
from tests.harness import (
    ALL_CHANNELS,
    ClientOptions,
    LoopbackCapture,
    QemuServer,
    SessionCapture,
    channel_counts,
    full_session_problems,
    record_full_session,
    run_gi_client,
    spice_flows,
    spicy_screenshot,
)
from tests.harness.images import distinct_colours, read_ppm
from tests.harness.spice_flows import ALL_CHANNELS as ALL_CHANNEL_COUNTS

pytestmark = pytest.mark.peers


def test_boot_guest_spicy_screenshot(tmp_path: Path) -> None:
    with peers(), QemuServer(guest="boot", run_dir=tmp_path / "qemu") as srv:
        assert srv.alive() and srv.port is not None
        shot = spicy_screenshot(srv.endpoint(), tmp_path / "shot.ppm")
    width, height, rgb = read_ppm(shot)
    assert (width, height) == (640, 400)  # mode 13h, doubled by QEMU's VGA
    assert distinct_colours(rgb) > 16  # the animation, not a blank screen


def test_tls_and_password(tmp_path: Path) -> None:
    with peers(), QemuServer(guest="boot", plain=False, tls=True, password="s3cret") as srv:
        endpoint = srv.endpoint()
        assert endpoint.port is None and endpoint.tls_port is not None
        result = run_gi_client(
            endpoint,
            ClientOptions(duration=15, expect_channels=ALL_CHANNELS - 1, expect_display=True),
            tmp_path / "client",
        )
        spicy_screenshot(endpoint, tmp_path / "tls.ppm")
    assert result.returncode == 0, result.summary
    assert "main:0" in result.opened and "display:0" in result.opened


def test_capture_contains_all_channel_connections(tmp_path: Path) -> None:
    with peers(), QemuServer(guest="boot") as srv:
        assert srv.port is not None
        with LoopbackCapture(tmp_path / "boot.pcapng", ports=srv.ports) as cap:
            result = run_gi_client(
                srv.endpoint(),
                ClientOptions(
                    duration=15,
                    expect_channels=ALL_CHANNELS,
                    expect_display=True,
                    keys=(0x1E,),
                    mouse=True,
                    smartcard=True,
                    screenshot=tmp_path / "client.png",
                ),
                tmp_path / "client",
            )
    assert result.returncode == 0, result.summary
    assert len(result.opened) == ALL_CHANNELS
    flows = spice_flows(cap.path, set(srv.ports))
    assert channel_counts(flows) == ALL_CHANNEL_COUNTS
    # main asks for a new session (id 0); every other channel joins it
    main = [f for f in flows if f.channel == "main"]
    assert [f.connection_id for f in main] == [0]
    assert len({f.connection_id for f in flows if f.channel != "main"}) == 1
    display = next(f for f in flows if f.channel == "display")
    assert display.from_server.bytes > 100_000


@pytest.fixture(scope="module")
def full_session(tmp_path_factory: pytest.TempPathFactory) -> SessionCapture:
    with peers():
        return record_full_session(tmp_path_factory.mktemp("session"))
    raise AssertionError("not reached")  # pragma: no cover


def test_full_session_client_met_every_goal(full_session: SessionCapture) -> None:
    summary = full_session.client.summary
    assert full_session.client.returncode == 0, summary
    assert full_session.client.missed == []
    assert len(full_session.client.opened) == ALL_CHANNELS
    assert summary["agent"]["clipboard_from_guest"].startswith("guest clipboard")
    assert summary["ports"]["org.example.test"]["received"] > 0


def test_full_session_reached_the_guest(full_session: SessionCapture) -> None:
    evidence = full_session.guest_evidence()
    assert all(evidence.values()), (evidence, full_session.guest_log()[-3000:])


def test_full_session_capture_has_all_traffic(full_session: SessionCapture) -> None:
    flows = full_session.flows()
    syns_to_spice = [f for f in flows if f.server_port == full_session.port]
    assert len(syns_to_spice) == ALL_CHANNELS
    assert full_session_problems(flows) == []
