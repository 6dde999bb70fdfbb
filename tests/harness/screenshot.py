"""spicy-screenshot (spice-client-gtk) as a cheap one-shot client.

It connects, waits for the primary surface, writes it as PPM and exits: about
0.1-0.4 s, no display server needed. It has no CA option; OpenSSL's
SSL_CERT_FILE makes it trust our test CA for the TLS port.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from tests.harness.endpoint import SpiceEndpoint
from tests.harness.images import CURSOR_CELL, differing_pixels, ppm_to_png
from tests.harness.procs import PeerFailed, need_program, stop_process


def spicy_screenshot(
    endpoint: SpiceEndpoint, out: Path, *, timeout: float = 30.0, png: bool = False
) -> Path:
    """Screenshot of the server's primary surface; PPM at `out` (PNG beside it if png)."""
    binary = need_program("spicy-screenshot", "spice-client-gtk")
    argv = [binary, "-h", endpoint.host, "-o", str(out)]
    env = dict(os.environ)
    if endpoint.port is not None:
        argv += ["-p", str(endpoint.port)]
    else:
        argv += ["-s", str(endpoint.tls_port)]
        if endpoint.ca_file is not None:
            env["SSL_CERT_FILE"] = str(endpoint.ca_file)
    if endpoint.password is not None:
        argv += ["-w", endpoint.password]
    if endpoint.proxy is not None:
        env["SPICE_PROXY"] = endpoint.proxy  # spice-gtk's own variable; no CLI option here
    out.unlink(missing_ok=True)
    proc = subprocess.Popen(
        argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_process(proc)
        raise PeerFailed(f"spicy-screenshot took longer than {timeout} s") from None
    if proc.returncode != 0 or not out.exists():
        raise PeerFailed(
            f"spicy-screenshot failed (rc {proc.returncode}): "
            f"{output.decode(errors='replace')[-1000:]}"
        )
    if png:
        return ppm_to_png(out, out.with_suffix(".png"))
    return out



def settled_screenshot(
    endpoint: SpiceEndpoint, out: Path, *, interval: float = 1.0, attempts: int = 30
) -> Path:
    """A screenshot once the guest stopped drawing (SeaBIOS prints for a few seconds): two
    taken `interval` apart agree but for a blinking cursor."""
    previous = out.with_suffix(".previous.ppm")
    spicy_screenshot(endpoint, previous)
    for _ in range(attempts):
        time.sleep(interval)
        spicy_screenshot(endpoint, out)
        if differing_pixels(previous, out) <= CURSOR_CELL:
            return out
        out.replace(previous)
    raise PeerFailed(f"the guest's screen kept changing for {attempts * interval:g} s")
