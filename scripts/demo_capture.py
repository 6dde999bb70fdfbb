"""The demo behind scripts/run-demo, until the proxy lands (issue "proxy" grows it).

Boots a small local QEMU test VM with SPICE on loopback, connects a real spice-gtk client
that opens every channel and types a few keys, captures the traffic with dumpcap into
recordings/demo.pcapng, and prints the decoded session with `spicetap show`.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from spicetap.cli import main as spicetap
from tests.harness import ALL_CHANNELS, ClientOptions, LoopbackCapture, QemuServer, run_gi_client


def main() -> int:
    out = Path("recordings")
    out.mkdir(exist_ok=True)
    pcap = out / "demo.pcapng"
    with tempfile.TemporaryDirectory() as tmp, QemuServer(guest="boot") as srv:
        print(f"QEMU spice-server on 127.0.0.1:{srv.port} (boot-sector guest)", flush=True)
        with LoopbackCapture(pcap, ports=srv.ports):
            result = run_gi_client(
                srv.endpoint(),
                ClientOptions(duration=8, min_duration=3, expect_channels=ALL_CHANNELS,
                              expect_display=True, keys=(0x23, 0x17), mouse=True),
                Path(tmp) / "client",
            )
        print(f"client opened {len(result.opened)} channels; capture: {pcap}", flush=True)
    return spicetap(["show", str(pcap)])


if __name__ == "__main__":
    sys.exit(main())
