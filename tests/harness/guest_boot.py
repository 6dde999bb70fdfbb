"""Guest "boot": spicetap's demo boot sector (spicetap/demo/bootsector.S) as a raw disk.

Ready in well under a second, so it is the default guest for tests that only need a live
SPICE server with a changing display. `assemble` builds the source with binutils, to check
that the bytes spicetap ships (spicetap/demo/guest.py) are current.
"""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

from spicetap.demo import guest
from tests.harness.cache import cached_build, content_key
from tests.harness.procs import PeerFailed, need_program


def assemble(source: Path = guest.SOURCE) -> bytes:
    """The 512-byte boot sector GNU as + ld make of `source`."""
    gas = need_program("as", "binutils")
    ld = need_program("ld", "binutils")
    with tempfile.TemporaryDirectory(prefix="spicetap-boot-") as tmp:
        obj, raw = Path(tmp) / "boot.o", Path(tmp) / "boot.bin"
        subprocess.run([gas, "--32", "-o", str(obj), str(source)], check=True, capture_output=True)
        subprocess.run(
            [ld, "-m", "elf_i386", "-Ttext=0x7c00", "--oformat", "binary", "-o", str(raw),
             str(obj)],
            check=True,
            capture_output=True,
        )
        code = raw.read_bytes()
    if len(code) != 512 or code[510:] != b"\x55\xaa":
        raise PeerFailed(f"boot sector is {len(code)} bytes or lacks the 55AA signature")
    return code


def _write(out: Path) -> None:
    guest.write_disk(out / "disk.img")


def build_boot_guest() -> Path:
    """Path of the raw disk image."""
    return cached_build("guest-boot", content_key([Path(guest.__file__)]), _write) / "disk.img"
