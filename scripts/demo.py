"""The main job on a fresh machine (until `spicetap demo` lands, issue "proxy"):

boots a small local QEMU test VM with SPICE on loopback, puts `spicetap proxy` in front of it
recording to ./recordings, connects a real spice-gtk client through the proxy (every channel,
a few keys and mouse moves), then verifies and prints the recorded session.
With --interactive it keeps running after that and prints how to connect your own viewer.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from pathlib import Path

from spicetap.cli import main as spicetap
from tests.harness import ALL_CHANNELS, ClientOptions, QemuServer, SpiceEndpoint, run_gi_client
from tests.integration.proxy_process import ProxyProcess


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--interactive", action="store_true")
    parser.add_argument("--minutes", type=float, default=30.0, help="interactive time limit")
    args = parser.parse_args()
    recordings = Path("recordings").resolve()
    with tempfile.TemporaryDirectory() as tmp, QemuServer(guest="boot") as srv:
        assert srv.port is not None
        print(f"QEMU spice-server on 127.0.0.1:{srv.port} (boot-sector test guest)", flush=True)
        with ProxyProcess(srv.port, recordings, Path(tmp) / "proxy") as proxy:
            print(
                f"spicetap proxy on 127.0.0.1:{proxy.port}, recording to {recordings}", flush=True
            )
            result = run_gi_client(
                SpiceEndpoint(port=proxy.port),
                ClientOptions(
                    duration=10,
                    min_duration=3,
                    expect_channels=ALL_CHANNELS,
                    expect_display=True,
                    keys=(0x23, 0x17),
                    mouse=True,
                    smartcard=True,
                ),
                Path(tmp) / "client",
            )
            print(f"a spice-gtk client opened {len(result.opened)} channels through it", flush=True)
            if args.interactive:
                print(
                    f"connect a viewer: remote-viewer spice://127.0.0.1:{proxy.port}  "
                    "(Ctrl-C to stop)",
                    flush=True,
                )
                with contextlib.suppress(KeyboardInterrupt):
                    time.sleep(args.minutes * 60)
        archives = sorted(recordings.glob("*.spta"), key=lambda p: p.stat().st_mtime)
    if not archives:
        print("no archive was recorded", file=sys.stderr)
        return 1
    latest = archives[-1]
    spicetap(["verify", str(latest)])
    spicetap(["stats", str(latest)])
    print(f"\nthe session, message by message: spicetap show {latest}", flush=True)
    return spicetap(["show", "-f", "not display", str(latest)])


if __name__ == "__main__":
    sys.exit(main())
