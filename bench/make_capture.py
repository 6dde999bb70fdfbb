"""Record a message-heavy real capture for the dissection benchmark: a QEMU spice-server and
a spice-gtk client typing a flood of keys (two small inputs messages each) on loopback.

    python -m bench.make_capture OUT.pcapng [--keys 20000]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from tests.harness import ClientOptions, LoopbackCapture, QemuServer, run_gi_client


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--keys", type=int, default=20000)
    args = parser.parse_args(argv)
    keys = tuple(0x1E + i % 10 for i in range(args.keys))  # a, s, d, ... : harmless keys
    with (
        tempfile.TemporaryDirectory() as tmp,
        QemuServer(guest="boot") as srv,
        LoopbackCapture(args.out, ports=srv.ports),
    ):
        result = run_gi_client(
            srv.endpoint(),
            ClientOptions(duration=120, min_duration=2, keys=keys, mouse=True,
                          expect_display=True),
            Path(tmp) / "client",
        )
    print(f"{args.out}: client rc {result.returncode}, {args.out.stat().st_size} bytes")
    return result.returncode


if __name__ == "__main__":
    raise SystemExit(main())
