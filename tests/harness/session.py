"""High-level scenario: a complete, captured SPICE session against the linux guest.

    cap = record_full_session(tmp_path / "session")
    cap.pcapng, cap.client.summary, cap.ports

Boots the linux guest, starts dumpcap on lo for the spice port(s), runs the GI
client's full exchange (all 11 channels; keys, mouse, clipboard both ways, a
file, a monitors config, port echo, record tone, a USB CD, a smartcard), stops
the capture and returns where everything is. Guest-side evidence (tapguest log
lines) is kept in serial.log beside the capture.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from tests.harness.capture import LoopbackCapture
from tests.harness.client import ClientResult, full_exchange_options, run_gi_client
from tests.harness.qemu import QemuServer
from tests.harness.spice_flows import SpiceFlow, spice_flows

# guest log lines that prove each exchange reached the guest (tapguest.c).
# No monitors config here: spice-server hands it to the qxl KMS driver rather
# than to the agent, so only the wire (client AGENT_DATA) shows it.
GUEST_EVIDENCE = {
    "clipboard_to_guest": "tapguest[agent]: client clipboard",
    "clipboard_from_guest": "tapguest[agent]: clipboard requested by the client",
    "file_copy": "tapguest[agent]: file 1 received",
    "port_echo": "tapguest[echo]: echoed",
    "usb_read": "tapguest[usbread]: read /dev/sr0",
}


@dataclass(frozen=True)
class SessionCapture:
    pcapng: Path
    client: ClientResult
    port: int
    tls_port: int | None
    serial_log: Path
    qemu_log: Path
    seconds: dict[str, float]  # boot, client, total

    @property
    def ports(self) -> set[int]:
        return {p for p in (self.port, self.tls_port) if p is not None}

    def flows(self) -> list[SpiceFlow]:
        return spice_flows(self.pcapng, self.ports)

    def guest_log(self) -> str:
        return self.serial_log.read_text(errors="replace")

    def guest_evidence(self) -> dict[str, bool]:
        text = self.guest_log()
        return {name: marker in text for name, marker in GUEST_EVIDENCE.items()}


def record_full_session(
    out: Path, duration: float = 25.0, *, min_duration: float = 6.0, tls: bool = False
) -> SessionCapture:
    """Capture one full client session; `duration` bounds the client's run."""
    t0 = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    options = full_exchange_options(out / "client", duration=duration, min_duration=min_duration)
    with QemuServer(guest="linux", tls=tls, run_dir=out / "qemu") as srv:
        booted = time.monotonic()
        assert srv.port is not None
        endpoint = srv.endpoint()
        with LoopbackCapture(out / "session.pcapng", ports=srv.ports) as cap:
            result = run_gi_client(endpoint, options, out / "client")
        client_done = time.monotonic()
        time.sleep(0.5)  # let the guest log what arrived last
        shutil.copy(srv.serial_log, out / "serial.log")
        shutil.copy(srv.qemu_log, out / "qemu.log")
        port, tls_port = srv.port, srv.tls_port
    return SessionCapture(
        pcapng=cap.path,
        client=result,
        port=port,
        tls_port=tls_port,
        serial_log=out / "serial.log",
        qemu_log=out / "qemu.log",
        seconds={
            "boot": round(booted - t0, 2),
            "client": round(client_done - booted, 2),
            "total": round(time.monotonic() - t0, 2),
        },
    )
