"""QEMU with its built-in spice-server on loopback, as a context manager.

    with QemuServer(guest="boot") as srv:
        connect to 127.0.0.1:srv.port

Theory of operation: we pick ports the OS just reported free, exec QEMU
(never daemonized, so the Popen PID *is* QEMU), and call it ready only once
that very PID holds a LISTEN socket on each spice port and the port accepts a
connection. If another process took a port in between, QEMU exits with
"Failed to open SPICE sockets" and we retry with new ports. Stopping asks QMP
to quit, then signals our PID; nothing is ever looked up by name.

Every SPICE channel type QEMU 7.2 offers is configured, so one client opens 11
connections: main, display, inputs, cursor, playback, record, usbredir x2,
smartcard, port (org.example.test) and webdav.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self

from tests.harness.endpoint import SpiceEndpoint
from tests.harness.procs import (
    LOOPBACK,
    PeerFailed,
    is_connectable,
    need_program,
    pid_listens_on,
    reserve_ports,
    stop_process,
    tail,
    wait_until,
)
from tests.harness.qmp import qmp_command
from tests.harness.sasl import SaslAccount, SaslConfig, make_sasl_config
from tests.harness.tls import TlsMaterial, make_tls_material

GuestKind = Literal["none", "boot", "linux"]

PORT_NAME = "org.example.test"  # the spiceport our linux guest echoes
WEBDAV_PORT_NAME = "org.spice-space.webdav.0"
AGENT_PORT_NAME = "com.redhat.spice.0"
READY_MARKER = "tapguest: READY"
BIND_RETRIES = 5
_live: set[QemuServer] = set()


def _stop_leftovers() -> None:
    for server in list(_live):  # a test that forgot its context manager
        server.stop()


atexit.register(_stop_leftovers)


def _device_args() -> list[str]:
    """Every optional channel: agent, port, webdav, audio, 2 usbredir, smartcard."""
    args = ["-device", "virtio-serial-pci,id=vser0"]
    for chardev_id, backend, name in (
        ("vdagent0", "spicevmc", "vdagent"),
        ("port0", "spiceport", PORT_NAME),
        ("webdav0", "spiceport", WEBDAV_PORT_NAME),
    ):
        port_name = AGENT_PORT_NAME if backend == "spicevmc" else name
        args += [
            "-chardev",
            f"{backend},id={chardev_id},name={name}",
            "-device",
            f"virtserialport,bus=vser0.0,chardev={chardev_id},name={port_name}",
        ]
    args += [
        "-audiodev",
        "spice,id=snd0",
        "-device",
        "intel-hda,id=hda0",
        "-device",
        "hda-duplex,bus=hda0.0,audiodev=snd0",
    ]
    args += ["-device", "qemu-xhci,id=xhci0"]
    for n in (0, 1):
        args += [
            "-chardev",
            f"spicevmc,id=usbredir{n},name=usbredir",
            "-device",
            f"usb-redir,chardev=usbredir{n},bus=xhci0.0",
        ]
    args += [
        "-chardev",
        "spicevmc,id=ccid0,name=smartcard",
        "-device",
        "usb-ccid,id=ccid,bus=xhci0.0",
        "-device",
        "ccid-card-passthru,chardev=ccid0,bus=ccid.0",
    ]
    return args


def _guest_args(guest: GuestKind, append: str) -> list[str]:
    if guest == "none":
        return []
    if guest == "boot":
        from tests.harness.guest_boot import build_boot_guest

        disk = build_boot_guest()
        return ["-drive", f"file={disk},format=raw,if=ide,snapshot=on"]
    from tests.harness.guest_linux import build_linux_guest

    built = build_linux_guest()
    # no blinking fbcon cursor in screenshots; panic=-1 + -no-reboot: QEMU exits
    cmdline = f"console=ttyS0 quiet loglevel=3 panic=-1 vt.global_cursor_default=0 {append}"
    cmdline = cmdline.strip()
    return ["-kernel", str(built.kernel), "-initrd", str(built.initrd), "-append", cmdline]


class QemuServer:
    """A QEMU process serving SPICE on 127.0.0.1.

    guest: "boot" (animated boot sector, ready at once), "linux" (agent, audio,
    port echo, USB reads; boots in ~6-14 s), "none" (SeaBIOS screen only).
    plain/tls: which listening ports to open. password: ticket auth, else
    disable-ticketing (unless sasl). sasl: Cyrus SASL with this one account (and its mechanism),
    from a private config and sasldb made in the run dir (SASL_CONF_PATH in QEMU's
    environment). wait_ready: wait for the guest's READY line on the serial console
    (default: yes, except for "none"). spice_options: extra -spice key=values.
    """

    def __init__(
        self,
        guest: GuestKind = "boot",
        *,
        plain: bool = True,
        tls: bool = False,
        password: str | None = None,
        sasl: SaslAccount | None = None,
        run_dir: Path | None = None,
        append: str = "",
        wait_ready: bool | None = None,
        ready_timeout: float = 120.0,
        start_timeout: float = 20.0,
        spice_options: Mapping[str, str] | None = None,
        memory_mb: int = 256,
        extra_args: Sequence[str] = (),
    ) -> None:
        if not (plain or tls):
            raise ValueError("need a plain or a TLS port")
        self.guest = guest
        self.plain = plain
        self.tls = tls
        self.password = password
        self.sasl = sasl
        self.sasl_config: SaslConfig | None = None
        self.append = append
        self.wait_ready = guest != "none" if wait_ready is None else wait_ready
        self.ready_timeout = ready_timeout
        self.start_timeout = start_timeout
        self.spice_options = dict(spice_options or {})
        self.memory_mb = memory_mb
        self.extra_args = list(extra_args)
        self._own_run_dir = run_dir is None
        self.run_dir = run_dir or Path(tempfile.mkdtemp(prefix="spicetap-qemu-"))
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.serial_log = self.run_dir / "serial.log"
        self.qemu_log = self.run_dir / "qemu.log"
        self.pidfile = self.run_dir / "qemu.pid"
        # unix socket paths are limited to 107 bytes; tmp_path can be longer
        self._sock_dir = Path(tempfile.mkdtemp(prefix="spicetap-qmp-"))
        self.qmp_socket = self._sock_dir / "qmp.sock"
        self.port: int | None = None
        self.tls_port: int | None = None
        self.tls_material: TlsMaterial | None = None
        self.startup_seconds = 0.0
        self.ready_seconds: float | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    # ------------------------------------------------------------ lifecycle
    def __enter__(self) -> Self:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            self.cleanup()  # a temp run dir is kept only when something failed
        else:
            self.stop()

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise PeerFailed("QEMU is not running")
        return self._proc.pid

    @property
    def ports(self) -> list[int]:
        return [p for p in (self.port, self.tls_port) if p is not None]

    def endpoint(self) -> SpiceEndpoint:
        """Connection details for clients (everything QEMU was started with)."""
        tls = self.tls_material
        sasl = self.sasl
        return SpiceEndpoint(
            port=self.port,
            tls_port=self.tls_port,
            password=sasl.password if sasl is not None else self.password,
            username=sasl.username if sasl is not None else None,
            ca_file=tls.ca_file if tls else None,
            host_subject=tls.host_subject if tls else None,
        )

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> Self:
        binary = need_program("qemu-system-x86_64", "qemu-system-x86")
        if self.tls and self.tls_material is None:
            self.tls_material = make_tls_material(self.run_dir / "tls")
        if self.sasl is not None and self.sasl_config is None:
            self.sasl_config = make_sasl_config(self.run_dir / "sasl", self.sasl)
        guest_args = _guest_args(self.guest, self.append)  # may build the guest first
        t0 = time.monotonic()
        for _attempt in range(BIND_RETRIES):
            ports = reserve_ports(int(self.plain) + int(self.tls))
            self.port = ports.pop(0) if self.plain else None
            self.tls_port = ports.pop(0) if self.tls else None
            self._spawn([binary, *self._args(), *guest_args])
            if self._wait_listening():
                break
            if "Failed to open SPICE sockets" not in tail(self.qemu_log):
                raise PeerFailed(f"QEMU exited during start-up:\n{tail(self.qemu_log)}")
        else:
            raise PeerFailed(f"QEMU could not bind free ports {BIND_RETRIES} times")
        self.startup_seconds = time.monotonic() - t0
        if self.wait_ready:
            self.wait_for_serial(READY_MARKER, self.ready_timeout)
            self.ready_seconds = time.monotonic() - t0
        return self

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        _live.discard(self)
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(OSError, PeerFailed):
                qmp_command(self.qmp_socket, "quit", timeout=2.0)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=3.0)
            stop_process(proc)
        shutil.rmtree(self._sock_dir, ignore_errors=True)

    # ------------------------------------------------------------- helpers
    def _spice_arg(self) -> str:
        opts = {"addr": LOOPBACK}
        if self.port is not None:
            opts["port"] = str(self.port)
        if self.tls_port is not None and self.tls_material is not None:
            opts["tls-port"] = str(self.tls_port)
            opts["x509-dir"] = str(self.tls_material.x509_dir)
        if self.password is not None:
            opts["password-secret"] = "spicepw0"
        elif self.sasl is None:
            opts["disable-ticketing"] = "on"
        if self.sasl is not None:
            opts["sasl"] = "on"
        opts.update(self.spice_options)
        return ",".join(f"{k}={v}" for k, v in opts.items())

    def _args(self) -> list[str]:
        args = [
            "-name",
            f"spicetap-test-{self.port or self.tls_port}",
            "-machine",
            "pc,accel=tcg",
            "-m",
            str(self.memory_mb),
            "-smp",
            "1",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
            "-device",
            "qxl-vga,id=video0",
            "-chardev",
            f"file,id=serial0,path={self.serial_log}",
            "-serial",
            "chardev:serial0",
            "-qmp",
            f"unix:{self.qmp_socket},server=on,wait=off",
            "-pidfile",
            str(self.pidfile),
        ]
        if self.password is not None:
            secret = self.run_dir / "spice-password"
            secret.write_text(self.password)
            args += ["-object", f"secret,id=spicepw0,file={secret}"]
        return [*args, "-spice", self._spice_arg(), *_device_args(), *self.extra_args]

    def _spawn(self, argv: list[str]) -> None:
        self.serial_log.unlink(missing_ok=True)
        self.pidfile.unlink(missing_ok=True)
        (self.run_dir / "qemu.cmdline").write_text(" ".join(argv) + "\n")
        env = None
        if self.sasl_config is not None:  # libsasl2 reads qemu.conf from here
            env = {**os.environ, "SASL_CONF_PATH": str(self.sasl_config.conf_dir)}
        with self.qemu_log.open("wb") as log:
            self._proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env
            )
        _live.add(self)

    def _wait_listening(self) -> bool:
        """True once our own PID listens on every port; False if QEMU exited."""
        proc = self._proc
        assert proc is not None
        deadline = time.monotonic() + self.start_timeout
        for _ in range(int(self.start_timeout / 0.02) + 1):
            if proc.poll() is not None:
                self._proc = None
                _live.discard(self)
                return False
            if all(pid_listens_on(proc.pid, p) for p in self.ports) and all(
                is_connectable(p) for p in self.ports
            ):
                return True
            if time.monotonic() > deadline:
                break
            time.sleep(0.02)
        self.stop()
        raise PeerFailed(
            f"QEMU did not listen within {self.start_timeout} s:\n{tail(self.qemu_log)}"
        )

    def serial_text(self) -> str:
        try:
            return self.serial_log.read_text(errors="replace")
        except OSError:
            return ""

    def wait_for_serial(self, marker: str, timeout: float) -> None:
        """Wait for `marker` on the guest's serial console; fail early if QEMU dies."""

        def seen() -> bool:
            if not self.alive():
                raise PeerFailed(
                    f"QEMU died waiting for {marker!r}:\n{tail(self.qemu_log)}\n"
                    f"serial:\n{self.serial_text()[-2000:]}"
                )
            return marker in self.serial_text()

        try:
            wait_until(
                seen, timeout=timeout, what=f"{marker!r} on the serial console", interval=0.1
            )
        except PeerFailed as e:
            raise PeerFailed(f"{e}\nserial:\n{self.serial_text()[-2000:]}") from None

    def qmp(self, command: str, **arguments: Any) -> Any:
        return qmp_command(self.qmp_socket, command, **arguments)

    def cleanup(self) -> None:
        """Remove the run dir if we created it (logs are gone afterwards)."""
        self.stop()
        if self._own_run_dir:
            shutil.rmtree(self.run_dir, ignore_errors=True)
