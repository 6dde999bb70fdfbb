"""The demo guest: our boot sector (bootsector.S beside this file), assembled.

Committed as bytes so `spicetap demo` runs where no assembler is installed; the test suite
assembles bootsector.S with binutils and checks these bytes are current.
"""

from __future__ import annotations

from pathlib import Path

SOURCE = Path(__file__).with_name("bootsector.S")
CODE = bytes.fromhex(
    "fa31c08ed88ed0bc007cfbb81300cd10be497cbaf803fcac84c07403eeebf8b8"
    "00a08ec031ed31ff31d289d301eb31c989c829e830d8aa4181f9400172f24281"
    "fac80072e545f4ebdd74617067756573743a2052454144592028626f6f742073"
    "6563746f72290d0a00"
)
# A PC BIOS boots a sector that ends in 55 AA; SeaBIOS is happier with more than one
# sector of disk.
BOOT_SECTOR = CODE.ljust(510, b"\0") + b"\x55\xaa"
DISK_SIZE = 64 * 1024
READY_MARKER = "tapguest: READY"  # what it writes to COM1 once the screen is animating


def write_disk(path: Path) -> Path:
    path.write_bytes(BOOT_SECTOR.ljust(DISK_SIZE, b"\0"))
    return path
