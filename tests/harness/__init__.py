"""spicetap's real-peer test harness: QEMU's spice-server, spice-gtk clients, dumpcap.

    from tests.harness import QemuServer, run_gi_client, ClientOptions
    with QemuServer(guest="boot") as srv:
        result = run_gi_client(srv.endpoint(), ClientOptions(expect_channels=11,
                               smartcard=True), tmp_path)

Everything runs on 127.0.0.1, every wait is bounded, and only processes the
harness started are stopped, by PID. Missing programs raise PeerMissing (tests
skip locally, fail in CI); peers that misbehave raise PeerFailed.
Debian packages needed: scripts/apt-test-packages.txt.

Modules: qemu (server), guest_boot / guest_linux (guests, cached by source
hash in cache), client + gi_client (scripted spice-gtk client, system python),
screenshot (spicy-screenshot), html5 + cdp (spice-html5 in headless
Chromium over DevTools), capture (dumpcap), pcapng + spice_flows (an
independent capture oracle), session (the full recorded scenario), sasl (a private
Cyrus SASL config and user database for QemuServer(sasl=...)).
"""

from tests.harness.capture import LoopbackCapture, capture_around
from tests.harness.client import (
    ALL_CHANNELS,
    ClientOptions,
    ClientResult,
    check_gi_client_runtime,
    full_exchange_options,
    make_cd_image,
    run_gi_client,
)
from tests.harness.endpoint import SpiceEndpoint
from tests.harness.guest_boot import build_boot_guest
from tests.harness.guest_linux import LinuxGuest, build_linux_guest
from tests.harness.html5 import HeadlessChromium, PageResult, need_spice_html5
from tests.harness.procs import LOOPBACK, PeerFailed, PeerMissing
from tests.harness.qemu import PORT_NAME, QemuServer
from tests.harness.sasl import SaslAccount, SaslConfig, make_sasl_config
from tests.harness.screenshot import spicy_screenshot
from tests.harness.session import SessionCapture, record_full_session
from tests.harness.spice_flows import SpiceFlow, channel_counts, full_session_problems, spice_flows
from tests.harness.tls import TlsMaterial, make_tls_material

__all__ = [
    "ALL_CHANNELS",
    "LOOPBACK",
    "PORT_NAME",
    "ClientOptions",
    "ClientResult",
    "HeadlessChromium",
    "LinuxGuest",
    "LoopbackCapture",
    "PageResult",
    "PeerFailed",
    "PeerMissing",
    "QemuServer",
    "SaslAccount",
    "SaslConfig",
    "SessionCapture",
    "SpiceEndpoint",
    "SpiceFlow",
    "TlsMaterial",
    "build_boot_guest",
    "build_linux_guest",
    "capture_around",
    "channel_counts",
    "check_gi_client_runtime",
    "full_exchange_options",
    "full_session_problems",
    "make_cd_image",
    "make_sasl_config",
    "make_tls_material",
    "need_spice_html5",
    "record_full_session",
    "run_gi_client",
    "spice_flows",
    "spicy_screenshot",
]
