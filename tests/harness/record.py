"""Record one full session by hand: `python -m tests.harness.record OUT_DIR`.

Prints where the capture is and what the wire and the guest show (exit 1 if
anything the full session should carry is missing). Handy for refreshing
captures used as test corpora.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tests.harness.session import record_full_session
from tests.harness.spice_flows import full_session_problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="record a full SPICE session capture")
    parser.add_argument("out", type=Path)
    parser.add_argument("--duration", type=float, default=25.0)
    parser.add_argument("--tls", action="store_true")
    args = parser.parse_args(argv)
    cap = record_full_session(args.out, args.duration, tls=args.tls)
    problems = full_session_problems(cap.flows())
    report = {
        "pcapng": str(cap.pcapng),
        "ports": sorted(cap.ports),
        "seconds": cap.seconds,
        "client_status": cap.client.returncode,
        "missed": cap.client.missed,
        "guest_evidence": cap.guest_evidence(),
        "wire_problems": problems,
    }
    print(json.dumps(report, indent=1))
    return 0 if not problems and not cap.client.missed else 1


if __name__ == "__main__":
    sys.exit(main())
