"""GUI viewers (remote-viewer) under a private Xvfb, and screenshots of its screen.

Xvfb picks a free display itself (-displayfd), so it never collides with another X server,
and keeps its screen in a file (-fbdir) in XWD format, which we read directly: no xwd or
ImageMagick needed, and a screenshot is a plain file read.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

import numpy as np
from numpy.typing import NDArray

from tests.harness.images import write_png
from tests.harness.procs import PeerFailed, need_program, stop_process

START_TIMEOUT = 10.0
XWD_HEADER = struct.Struct(">25I")  # X11 XWDFileHeader: 25 big-endian CARD32s
Rgb = NDArray[np.uint8]


def read_xwd(data: bytes) -> Rgb:
    """An XWD image (Xvfb's 24/32-bit TrueColor screen) as a height x width x 3 array."""
    h = XWD_HEADER.unpack_from(data)
    header_size, width, height = h[0], h[4], h[5]
    byte_order, bits_per_pixel, bytes_per_line, ncolors = h[7], h[11], h[12], h[19]
    if bits_per_pixel != 32:
        raise PeerFailed(f"Xvfb screen has {bits_per_pixel} bits per pixel, expected 32")
    start = header_size + ncolors * 12  # XWDColor entries are 12 bytes each
    rows = np.frombuffer(data, np.uint8, height * bytes_per_line, start)
    pixels = rows.reshape(height, bytes_per_line)[:, : width * 4].reshape(height, width, 4)
    # LSBFirst (0): B, G, R, x in memory
    return pixels[:, :, 2::-1] if byte_order == 0 else pixels[:, :, 1:]


class Xvfb:
    """A private X server on a free display; `screenshot()` returns its screen."""

    def __init__(self, size: str = "1280x800x24") -> None:
        self.binary = need_program("Xvfb", "xvfb")
        self.size = size
        self.dir = Path(tempfile.mkdtemp(prefix="spicetap-xvfb-"))
        self.proc: subprocess.Popen[bytes] | None = None
        self.display = ""

    def __enter__(self) -> Xvfb:
        read_fd, write_fd = os.pipe()
        with (self.dir / "xvfb.log").open("wb") as log:
            self.proc = subprocess.Popen(
                [self.binary, "-displayfd", str(write_fd), "-screen", "0", self.size,
                 "-fbdir", str(self.dir), "-nolisten", "tcp"],
                pass_fds=(write_fd,),
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        os.close(write_fd)
        number = b""
        deadline = time.monotonic() + START_TIMEOUT
        with os.fdopen(read_fd, "rb") as pipe:
            while not number.endswith(b"\n") and time.monotonic() < deadline:
                chunk = pipe.read(1)  # Xvfb writes "N\n" once it accepts clients
                if not chunk:
                    break
                number += chunk
        if not number.strip().isdigit():
            self.__exit__(None, None, None)
            raise PeerFailed("Xvfb did not start")
        self.display = f":{number.decode().strip()}"
        return self

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "DISPLAY": self.display,
            "GDK_BACKEND": "x11",
            "NO_AT_BRIDGE": "1",  # no accessibility bus to wait for
        }

    def screenshot(self) -> Rgb:
        return read_xwd((self.dir / "Xvfb_screen0").read_bytes())

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.proc is not None:
            stop_process(self.proc)
        shutil.rmtree(self.dir, ignore_errors=True)


def find_image(screen: Rgb, image: Rgb) -> tuple[int, int] | None:
    """Where `image` appears unscaled on `screen` (top-left x, y), or None. Candidates come
    from matching the image's first row's first 16 pixels, then the whole image is checked,
    allowing one text-cursor cell (9x16) to differ (a blinking cursor)."""
    h, w = image.shape[:2]
    sh, sw = screen.shape[:2]
    if h > sh or w > sw:
        return None
    probe_row = next((y for y in range(h) if len(np.unique(image[y, :16], axis=0)) > 1), 0)
    probe = image[probe_row, :16]
    for y in range(sh - h + 1):
        row = screen[y + probe_row]
        for x in np.flatnonzero((row[: sw - w + 1] == probe[0]).all(axis=1)):
            if not np.array_equal(row[x : x + 16], probe):
                continue
            window = screen[y : y + h, x : x + w]
            if int((window != image).any(axis=2).sum()) <= 9 * 16:
                return int(x), int(y)
    return None


class RemoteViewer:
    """remote-viewer (virt-viewer) on `xvfb`, started with `args` (a URI or a .vv file)."""

    def __init__(self, xvfb: Xvfb, args: list[str], log: Path) -> None:
        binary = need_program("remote-viewer", "virt-viewer")
        self.log_path = log
        self._log = log.open("wb")
        self.proc = subprocess.Popen(
            [binary, *args],
            env=xvfb.env(),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def __enter__(self) -> RemoteViewer:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        stop_process(self.proc)
        self._log.close()


def wait_for_image(xvfb: Xvfb, image: Rgb, viewer: RemoteViewer, timeout: float = 30.0) -> None:
    """Until `image` shows on the X screen (the viewer rendered it), bounded by `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not viewer.alive():
            raise PeerFailed(f"remote-viewer exited: {viewer.log()[-1500:]}")
        if find_image(xvfb.screenshot(), image) is not None:
            return
        time.sleep(0.25)
    seen = viewer.log_path.with_suffix(".png")
    screen = xvfb.screenshot()
    write_png(seen, screen.shape[1], screen.shape[0], np.ascontiguousarray(screen).tobytes())
    raise PeerFailed(
        f"remote-viewer did not show the guest's screen in {timeout:g} s (screen: {seen}): "
        f"{viewer.log()[-1500:]}"
    )
