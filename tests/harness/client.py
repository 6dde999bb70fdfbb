"""Run the scripted spice-gtk client (gi_client.py) from a test.

The client needs python3-gi and the SpiceClientGLib typelib, which only the
Debian system python has, so it always runs as a subprocess of
/usr/bin/python3 with the repo root on its path. Its result is the JSON
summary it writes (see gi_client.py); this module only builds the command line
and reads the summary back.
"""

from __future__ import annotations

import functools
import json
import os
import random
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.harness.cache import REPO_ROOT
from tests.harness.endpoint import SpiceEndpoint
from tests.harness.nssdb import CARD_CERTS, make_smartcard_db
from tests.harness.procs import PeerFailed, PeerMissing, stop_process

SYSTEM_PYTHON = "/usr/bin/python3"
GI_PACKAGES = (
    "python3-gi gir1.2-spiceclientglib-2.0 gstreamer1.0-plugins-base gstreamer1.0-plugins-good"
)
ALL_CHANNELS = 11  # main display inputs cursor playback record usbredir*2 smartcard port webdav


@dataclass(frozen=True)
class ClientOptions:
    """What the client does; every field that is set becomes a goal it must meet."""

    duration: float = 10.0  # hard limit
    min_duration: float = 0.0  # stay connected at least this long
    expect_channels: int = 0
    expect_display: bool = False
    expect_playback: bool = False
    keys: Sequence[int] = ()  # PC scancodes, each pressed and released
    mouse: bool = False
    clipboard: str | None = None  # offered to the guest through the agent
    want_guest_clipboard: bool = False
    send_file: Path | None = None
    monitors: tuple[int, int] | None = None
    port_data: str | None = None  # written to org.example.test, must be echoed
    record_seconds: float = 0.0
    share_cd: Path | None = None
    smartcard: bool = False
    screenshot: Path | None = None
    extra_args: Sequence[str] = field(default=())


@dataclass(frozen=True)
class ClientResult:
    returncode: int
    summary: dict[str, Any]
    summary_path: Path
    log_path: Path  # the client's stderr (event log + GLib warnings)

    @property
    def opened(self) -> list[str]:
        return list(self.summary.get("opened", []))

    @property
    def missed(self) -> list[str]:
        return list(self.summary.get("missed", []))


@functools.cache
def check_gi_client_runtime() -> None:
    """PeerMissing unless the system python can load spice-gtk through GI."""
    probe = (
        "import gi; gi.require_version('SpiceClientGLib', '2.0'); "
        "from gi.repository import SpiceClientGLib"
    )
    try:
        subprocess.run([SYSTEM_PYTHON, "-c", probe], check=True, capture_output=True, timeout=60)
    except (OSError, subprocess.CalledProcessError) as e:
        raise PeerMissing(
            f"spice-gtk GI client unavailable ({e}): apt-get install {GI_PACKAGES}"
        ) from None


def _client_env() -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"}
    }
    env["PYTHONPATH"] = str(REPO_ROOT)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env["NO_AT_BRIDGE"] = "1"  # no accessibility bus on a headless box
    return env


def client_argv(endpoint: SpiceEndpoint, options: ClientOptions, work: Path) -> list[str]:
    o = options
    argv = [
        SYSTEM_PYTHON,
        "-m",
        "tests.harness.gi_client",
        "--verbose",
        "--host",
        endpoint.host,
        "--summary",
        str(work / "client.json"),
        "--duration",
        str(o.duration),
        "--min-duration",
        str(o.min_duration),
    ]
    if endpoint.port is not None:
        argv += ["--port", str(endpoint.port)]
    if endpoint.tls_port is not None:
        argv += ["--tls-port", str(endpoint.tls_port)]
    if endpoint.password is not None:
        argv += ["--password", endpoint.password]
    if endpoint.username is not None:
        argv += ["--username", endpoint.username]
    if endpoint.ca_file is not None:
        argv += ["--ca-file", str(endpoint.ca_file)]
    if endpoint.host_subject is not None:
        argv += ["--host-subject", endpoint.host_subject]
    if endpoint.proxy is not None:
        argv += ["--proxy", endpoint.proxy]
    if o.expect_channels:
        argv += ["--expect-channels", str(o.expect_channels)]
    argv += ["--expect-display"] if o.expect_display else []
    argv += ["--expect-playback"] if o.expect_playback else []
    if o.keys:
        keys = ",".join(hex(k) for k in o.keys)
        if len(keys) > 4096:  # one argument may not exceed 128 KiB: a flood goes by file
            (work / "keys.txt").write_text(keys)
            keys = f"@{work / 'keys.txt'}"
        argv += ["--keys", keys]
    argv += ["--mouse"] if o.mouse else []
    if o.clipboard is not None:
        argv += ["--clipboard", o.clipboard]
    argv += ["--want-guest-clipboard"] if o.want_guest_clipboard else []
    if o.send_file is not None:
        argv += ["--send-file", str(o.send_file)]
    if o.monitors is not None:
        argv += ["--monitors", f"{o.monitors[0]}x{o.monitors[1]}"]
    if o.port_data is not None:
        argv += ["--port-data", o.port_data]
    if o.record_seconds:
        argv += ["--record-seconds", str(o.record_seconds)]
    if o.share_cd is not None:
        argv += ["--share-cd", str(o.share_cd)]
    if o.smartcard:
        argv += [
            "--smartcard-db",
            make_smartcard_db(work / "nssdb"),
            "--smartcard-certs",
            ",".join(CARD_CERTS),
        ]
    if o.screenshot is not None:
        argv += ["--screenshot", str(o.screenshot)]
    return [*argv, *o.extra_args]


def run_gi_client(endpoint: SpiceEndpoint, options: ClientOptions, work: Path) -> ClientResult:
    """Run the client to completion (bounded by options.duration + a margin)."""
    check_gi_client_runtime()
    work.mkdir(parents=True, exist_ok=True)
    summary_path = work / "client.json"
    summary_path.unlink(missing_ok=True)
    log_path = work / "client.log"
    argv = client_argv(endpoint, options, work)
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            argv,
            cwd=REPO_ROOT,
            env=_client_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
        try:
            proc.wait(timeout=options.duration + 30.0)
        except subprocess.TimeoutExpired:
            stop_process(proc)
            raise PeerFailed(
                f"GI client overran its {options.duration} s limit; see {log_path}"
            ) from None
    try:
        summary: dict[str, Any] = json.loads(summary_path.read_text())
    except (OSError, ValueError):
        raise PeerFailed(
            f"GI client wrote no summary (rc {proc.returncode}); see {log_path}"
        ) from None
    return ClientResult(proc.returncode, summary, summary_path, log_path)


def make_cd_image(path: Path, size: int = 4 * 1024 * 1024) -> Path:
    """A file to share as a USB CD: 2 KiB sectors, each a tag plus random bytes.

    spice-gtk LZ4-compresses usbredir data, so the filler must be
    incompressible for the guest's read to show up as bulk bytes on the wire.
    """
    sector = 2048
    rng = random.Random(0x5B1CE)  # same image every run
    with path.open("wb") as f:
        for n in range(size // sector):
            tag = b"spicetap-cd-sector-%08d\n" % n
            f.write(tag + rng.randbytes(sector - len(tag)))
    return path


def full_exchange_options(
    work: Path, *, duration: float = 25.0, min_duration: float = 6.0
) -> ClientOptions:
    """Every exchange the linux guest supports (see guest_src/tapguest.c)."""
    work.mkdir(parents=True, exist_ok=True)
    send_file = work / "to-guest.bin"
    send_file.write_bytes(bytes(range(256)) * 1024)  # 256 KiB
    return ClientOptions(
        duration=duration,
        min_duration=min_duration,
        expect_channels=ALL_CHANNELS,
        expect_display=True,
        expect_playback=True,
        keys=(0x1E, 0x30, 0x2E),  # a, b, c
        mouse=True,
        clipboard="hello from the spicetap client",
        want_guest_clipboard=True,
        send_file=send_file,
        monitors=(1024, 768),
        port_data="ping over org.example.test",
        record_seconds=2.0,
        share_cd=make_cd_image(work / "shared-cd.iso"),
        smartcard=True,
        screenshot=work / "client-screenshot.png",
    )
