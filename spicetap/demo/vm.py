"""A small local QEMU VM with SPICE on loopback, for `spicetap demo`.

QEMU is started in the foreground (never daemonized), so the PID we hold is QEMU's and the
only one we ever signal. The SPICE port is one the system just reported free; if something
takes it first QEMU exits, and we try again with another.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from spicetap.demo.guest import READY_MARKER, write_disk
from spicetap.errors import UserError

LOOPBACK = "127.0.0.1"
START_TIMEOUT = 20.0
ATTEMPTS = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection((LOOPBACK, port), timeout=0.5):
            return True
    except OSError:
        return False


class DemoVm:
    """The boot-sector guest on QEMU's qxl display with audio, USB redirection and the agent
    port configured, so a viewer opens a realistic set of channels."""

    def __init__(self) -> None:
        binary = shutil.which("qemu-system-x86_64")
        if binary is None:
            raise UserError("qemu-system-x86_64 not found: apt-get install qemu-system-x86")
        self.binary = binary
        self.dir = Path(tempfile.mkdtemp(prefix="spicetap-demo-"))
        self.disk = write_disk(self.dir / "disk.img")
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    def _argv(self, port: int) -> list[str]:
        return [
            self.binary,
            "-name", "spicetap-demo",
            "-machine", "pc,accel=kvm:tcg",
            "-m", "64",
            "-smp", "1",
            "-nodefaults",
            "-no-user-config",
            "-display", "none",
            "-device", "qxl-vga",
            "-spice", f"addr={LOOPBACK},port={port},disable-ticketing=on",
            "-drive", f"file={self.disk},format=raw,if=ide,snapshot=on",
            "-serial", f"file:{self.dir / 'serial.log'}",
            "-device", "virtio-serial-pci",
            "-chardev", "spicevmc,id=vdagent0,name=vdagent",
            "-device", "virtserialport,chardev=vdagent0,name=com.redhat.spice.0",
            "-audiodev", "spice,id=snd0",
            "-device", "intel-hda",
            "-device", "hda-duplex,audiodev=snd0",
            "-device", "qemu-xhci,id=xhci0",
            "-chardev", "spicevmc,id=usbredir0,name=usbredir",
            "-device", "usb-redir,chardev=usbredir0,bus=xhci0.0",
        ]  # fmt: skip

    def start(self) -> int:
        """Boot; returns the SPICE port once it accepts connections."""
        for _ in range(ATTEMPTS):
            port = _free_port()
            log = (self.dir / "qemu.log").open("wb")
            with log:
                self.proc = subprocess.Popen(
                    self._argv(port),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    start_new_session=True,  # a terminal's Ctrl-C is ours to handle
                )
            deadline = time.monotonic() + START_TIMEOUT
            while time.monotonic() < deadline and self.proc.poll() is None:
                if _accepts(port):
                    self.port = port
                    return port
                time.sleep(0.05)
            self.stop()
        tail = (self.dir / "qemu.log").read_text(errors="replace").strip().splitlines()[-1:]
        raise UserError(f"QEMU did not start its SPICE server: {' '.join(tail) or 'no output'}")

    def wait_animating(self, timeout: float = START_TIMEOUT) -> bool:
        """True once the guest says on COM1 that its screen is animating."""
        serial = self.dir / "serial.log"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc is not None and self.proc.poll() is None:
            if serial.exists() and READY_MARKER in serial.read_text(errors="replace"):
                return True
            time.sleep(0.05)
        return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def __enter__(self) -> DemoVm:
        self.start()
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
