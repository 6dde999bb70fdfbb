"""spice-html5 in real headless Chromium, driven over the DevTools protocol.

    with HeadlessChromium(tmp_path / "chromium") as browser:
        page = browser.open_spice_html5("http://127.0.0.1:PORT/spice_auto.html")

Chromium runs headless with a private profile under `work`, DevTools on 127.0.0.1 only,
on a port it picks itself (--remote-debugging-port=0; it writes the port to
DevToolsActivePort in the profile, so nothing races for a port). `--screenshot` is not
used: it fires at page load, before any WebSocket has drawn. Instead the page's canvases
are read from JavaScript until enough pixels are drawn (bounded), then a screenshot is
taken over DevTools. Chromium is stopped by the PID we started; it ends its own children.
"""

from __future__ import annotations

import base64
import contextlib
import json
import shutil
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from tests.harness.cdp import DevTools
from tests.harness.procs import LOOPBACK, PeerFailed, PeerMissing, need_program, tail, wait_until

SPICE_HTML5_DIR = Path("/usr/share/spice-html5")
START_TIMEOUT = 20.0
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",  # tests may run as root, where the sandbox refuses to start
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--no-first-run",
    "--no-default-browser-check",
    "--mute-audio",
    "--autoplay-policy=no-user-gesture-required",
    f"--remote-debugging-address={LOOPBACK}",
    "--remote-debugging-port=0",
]

# Reads every canvas back: its size, how many pixels are not blank (transparent or black)
# and how many colours it holds (up to 256), plus spice-html5's status text.
CANVAS_PROBE = """(() => {
  const out = {canvases: [], nonblank: 0, colours: 0,
               status: ((document.getElementById('message-div') || {}).innerText || '')
                       .slice(-800)};
  for (const c of document.querySelectorAll('canvas')) {
    out.canvases.push([c.width, c.height]);
    if (!c.width || !c.height) continue;
    const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
    const seen = new Set();
    for (let i = 0; i < d.length; i += 4) {
      if (d[i + 3] && (d[i] | d[i + 1] | d[i + 2])) out.nonblank++;
      if (seen.size < 256) seen.add((d[i] << 16) | (d[i + 1] << 8) | d[i + 2]);
    }
    out.colours = Math.max(out.colours, seen.size);
  }
  return JSON.stringify(out);
})()"""


def need_spice_html5() -> Path:
    if not (SPICE_HTML5_DIR / "spice_auto.html").is_file():
        raise PeerMissing(f"spice-html5 not in {SPICE_HTML5_DIR}: apt-get install spice-html5")
    return SPICE_HTML5_DIR


@dataclass
class PageResult:
    canvases: list[tuple[int, int]]
    nonblank: int  # drawn pixels, read back from the canvas in the page
    colours: int
    status: str  # spice-html5's message area
    screenshot: Path
    screenshot_nonblank: int  # the same, counted with pillow in DevTools' screenshot
    dialogs: list[str]
    console: list[str]
    timings: dict[str, float] = field(default_factory=dict)


class HeadlessChromium:
    def __init__(
        self, work: Path, size: tuple[int, int] = (1100, 850), *, ignore_tls_errors: bool = False
    ) -> None:
        self.work = work
        self.size = size
        # for a test CA Chromium does not know (its trust store is NSS in $HOME, not ours)
        self.extra = ["--ignore-certificate-errors"] if ignore_tls_errors else []
        self.proc: subprocess.Popen[bytes] | None = None
        self.devtools: DevTools | None = None
        self.log_path = work / "chromium.log"
        self.started = 0.0

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def start(self) -> None:
        chromium = need_program("chromium", "chromium")
        profile = self.work / "profile"
        profile.mkdir(parents=True, exist_ok=True)
        self.started = time.monotonic()
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [
                    chromium,
                    *CHROMIUM_FLAGS,
                    *self.extra,
                    f"--user-data-dir={profile}",
                    f"--window-size={self.size[0]},{self.size[1]}",
                    "about:blank",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,  # a terminal's Ctrl-C goes to the test, not to it
            )
        try:
            self.devtools = DevTools(self._page_address())
        except BaseException:
            self.stop()
            raise

    def _page_address(self) -> str:
        port_file = self.work / "profile" / "DevToolsActivePort"
        assert self.proc is not None
        proc = self.proc

        def ready() -> bool:
            if proc.poll() is not None:
                raise PeerFailed(f"chromium exited: {tail(self.log_path)}")
            return port_file.is_file() and port_file.read_text().count("\n") >= 1

        wait_until(ready, timeout=START_TIMEOUT, what="chromium's DevToolsActivePort")
        port = int(port_file.read_text().split()[0])
        pages: list[dict[str, Any]] = []

        def have_page() -> bool:
            nonlocal pages
            with contextlib.suppress(OSError, ValueError):
                url = f"http://{LOOPBACK}:{port}/json/list"
                with urllib.request.urlopen(url, timeout=2) as answer:
                    pages = [t for t in json.load(answer) if t.get("type") == "page"]
            return bool(pages)

        wait_until(have_page, timeout=START_TIMEOUT, what="a DevTools page target", interval=0.1)
        return str(pages[0]["webSocketDebuggerUrl"])

    def open_spice_html5(
        self, url: str, *, min_nonblank: int = 1000, timeout: float = 30.0
    ) -> PageResult:
        """Open `url` and wait until a canvas shows at least `min_nonblank` drawn pixels;
        PeerFailed (with the page's status) if it does not within `timeout`."""
        devtools = self.devtools
        assert devtools is not None
        timings = {"chromium_ready": time.monotonic() - self.started}
        devtools.call("Page.enable")
        devtools.call("Runtime.enable")
        opened = time.monotonic()
        devtools.call("Page.navigate", url=url)
        probe: dict[str, Any] = {}
        deadline = opened + timeout
        while time.monotonic() < deadline:  # ends: deadline
            answer = devtools.call("Runtime.evaluate", expression=CANVAS_PROBE, returnByValue=True)
            probe = json.loads(answer.get("result", {}).get("value") or "{}")
            if probe.get("nonblank", 0) >= min_nonblank:
                break
            time.sleep(0.1)
        else:
            seen = f"{probe}; console: {self.console()}"
            raise PeerFailed(f"spice-html5 drew nothing in {timeout:.0f} s: {seen}")
        timings["canvas_drawn"] = time.monotonic() - opened
        shot = self.work / "page.png"
        data = devtools.call("Page.captureScreenshot", format="png")["data"]
        shot.write_bytes(base64.b64decode(data))
        timings["total"] = time.monotonic() - self.started
        return PageResult(
            canvases=[(int(w), int(h)) for w, h in probe["canvases"]],
            nonblank=int(probe["nonblank"]),
            colours=int(probe["colours"]),
            status=str(probe["status"]),
            screenshot=shot,
            screenshot_nonblank=_nonblank_pixels(shot.read_bytes()),
            dialogs=list(devtools.dialogs),
            console=self.console(),
            timings=timings,
        )

    def console(self) -> list[str]:
        """The page's console output seen so far (bounded by DevTools.events)."""
        assert self.devtools is not None
        lines = []
        for event in self.devtools.events:
            if event.get("method") == "Runtime.consoleAPICalled":
                args = event["params"].get("args", [])
                lines.append(" ".join(str(a.get("value", a.get("description", ""))) for a in args))
        return lines

    def stop(self) -> None:
        if self.devtools is not None:
            self.devtools.close()
            self.devtools = None
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()  # our PID only; Chromium ends its own children
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        shutil.rmtree(self.work / "profile", ignore_errors=True)


def _nonblank_pixels(png: bytes) -> int:
    from PIL import Image

    with Image.open(BytesIO(png)) as image:
        grey = image.convert("L")
        return sum(count for level, count in enumerate(grey.histogram()) if level > 8)
