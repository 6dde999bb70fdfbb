"""`spicetap demo`: boots its own QEMU VM, proxies and records it, proves it with a
screenshot through the proxy; or proxies a given upstream."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from PIL import Image

from spicetap.archive.verify import verify
from spicetap.inputs import iter_records
from tests.conftest import peers
from tests.harness import QemuServer
from tests.harness.procs import need_program
from tests.integration.proxy_process import run_spicetap

pytestmark = pytest.mark.peers


def _demo(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    need_program("qemu-system-x86_64", "qemu-system-x86")
    need_program("spicy-screenshot", "spice-client-gtk")
    return run_spicetap(
        tmp_path / "cfg",
        *("demo", "--listen", "127.0.0.1:0", "--record", str(tmp_path / "rec")),
        *("--check", "--minutes", "0.02", *args),
    )


def _check_recording(tmp_path: Path) -> None:
    with Image.open(tmp_path / "rec" / "demo.png") as image:
        colours = image.convert("RGB").getcolors(maxcolors=1 << 16)
    assert colours is None or len(colours) > 16  # the animated guest, not a black screen
    (archive,) = sorted((tmp_path / "rec").glob("*.spta"))
    assert verify(archive).status == "intact"
    recs = list(iter_records(archive, []))
    assert any(r.channel == "display" and r.name == "draw_copy" for r in recs)


def test_demo_boots_its_own_vm_and_records_it(tmp_path: Path) -> None:
    with peers():
        run = _demo(tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "QEMU test VM with SPICE on 127.0.0.1:" in run.stdout
    assert "connect a viewer:  remote-viewer spice://127.0.0.1:" in run.stdout
    assert "intact" in run.stdout
    _check_recording(tmp_path)


def test_demo_proxies_a_given_upstream(tmp_path: Path) -> None:
    with peers(), QemuServer(guest="boot") as srv:
        run = _demo(tmp_path, "--upstream", f"127.0.0.1:{srv.port}")
    assert run.returncode == 0, run.stderr[-2000:]
    assert "QEMU test VM" not in run.stdout
    assert f"-> 127.0.0.1:{srv.port}, recording to" in run.stdout
    _check_recording(tmp_path)
