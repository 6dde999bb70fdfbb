"""config/spicetap.service: systemd reads it without a complaint, and what it starts is
the proxy this checkout installs, with the example config."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from proxy.io.recording import STOP_TIMEOUT
from tests.conftest import require

REPO = Path(__file__).resolve().parents[1]
UNIT = REPO / "config" / "spicetap.service"
INSTALLED = "/opt/spicetap/bin/spicetap"  # where the unit's comment installs it


def _service(key: str) -> str:
    (line,) = [ln for ln in UNIT.read_text().splitlines() if ln.startswith(key + "=")]
    return line.split("=", 1)[1]


def test_systemd_reads_the_unit_without_a_complaint(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    require(analyze is not None, "systemd-analyze (Debian package systemd)")
    assert analyze is not None
    spicetap = Path(sys.executable).with_name("spicetap")
    require(spicetap.exists(), f"the spicetap command beside {sys.executable}")
    unit = tmp_path / "spicetap.service"  # with this checkout's command in its place
    unit.write_text(UNIT.read_text().replace(INSTALLED, str(spicetap)))
    done = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False
    )
    assert (done.returncode, done.stdout + done.stderr) == (0, "")


def test_the_unit_starts_the_proxy_as_a_notify_service_with_a_watchdog() -> None:
    argv = shlex.split(_service("ExecStart"))
    assert argv[:2] == [INSTALLED, "proxy"]
    assert argv[argv.index("--config") + 1] == "/etc/spicetap/spicetap.toml"
    assert _service("Type") == "notify"  # proxy/io/sdnotify.py sends READY
    assert _service("ExecReload") == "/bin/kill -HUP $MAINPID"
    assert 0 < int(_service("WatchdogSec")) <= 60
    assert int(_service("TimeoutStopSec")) > STOP_TIMEOUT  # the archives drain first
