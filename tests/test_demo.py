"""`spicetap demo`'s guest: the committed boot sector is what its source assembles to."""

from __future__ import annotations

import shutil

from spicetap.demo import guest
from tests.conftest import require
from tests.harness.guest_boot import assemble


def test_committed_boot_sector_is_current_with_its_source() -> None:
    require(shutil.which("as") is not None, "GNU as (apt-get install binutils)")
    assert assemble(guest.SOURCE) == guest.BOOT_SECTOR, (
        "spicetap/demo/guest.py is stale: paste the new bytes of bootsector.S into CODE"
    )


def test_boot_sector_is_a_bootable_mbr() -> None:
    assert len(guest.BOOT_SECTOR) == 512 and guest.BOOT_SECTOR.endswith(b"\x55\xaa")
    assert guest.READY_MARKER.encode() in guest.CODE  # what tests wait for on COM1
