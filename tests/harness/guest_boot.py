"""Guest "boot": our boot sector (guest_src/bootsector.S) as a raw disk image.

Ready in well under a second, so it is the default guest for tests that only
need a live SPICE server with a changing display.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.harness.cache import HARNESS_DIR, cached_build, content_key
from tests.harness.procs import PeerFailed, need_program

SOURCE = HARNESS_DIR / "guest_src" / "bootsector.S"
DISK_SIZE = 64 * 1024  # SeaBIOS is happier with more than one sector of disk


def _build(out: Path) -> None:
    gas = need_program("as", "binutils")
    ld = need_program("ld", "binutils")
    obj = out / "bootsector.o"
    raw = out / "bootsector.bin"
    subprocess.run([gas, "--32", "-o", str(obj), str(SOURCE)], check=True, capture_output=True)
    subprocess.run(
        [ld, "-m", "elf_i386", "-Ttext=0x7c00", "--oformat", "binary", "-o", str(raw), str(obj)],
        check=True,
        capture_output=True,
    )
    code = raw.read_bytes()
    if len(code) != 512 or code[510:] != b"\x55\xaa":
        raise PeerFailed(f"boot sector is {len(code)} bytes or lacks the 55AA signature")
    (out / "disk.img").write_bytes(code.ljust(DISK_SIZE, b"\0"))
    obj.unlink()


def build_boot_guest() -> Path:
    """Path of the raw disk image (built once per source change)."""
    key = content_key([SOURCE, Path(__file__)])
    return cached_build("guest-boot", key, _build) / "disk.img"
