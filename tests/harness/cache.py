"""Build cache for guests and other generated test material.

Artifacts live in `$SPICETAP_HARNESS_CACHE` or `<repo>/build/harness/`, one
folder per artifact named by a hash of everything it is made from. A build
runs in a scratch folder and is renamed into place only when complete, under a
file lock, so parallel test processes and interrupted builds never leave a
half-built guest that later runs would trust.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
HARNESS_DIR = Path(__file__).resolve().parent


def cache_root() -> Path:
    root = Path(os.environ.get("SPICETAP_HARNESS_CACHE") or REPO_ROOT / "build" / "harness")
    root.mkdir(parents=True, exist_ok=True)
    ignore = root / ".gitignore"
    if not ignore.exists():  # the cache never belongs in a commit
        ignore.write_text("*\n")
    return root


def content_key(files: Iterable[Path], extra: Iterable[str] = ()) -> str:
    """Hash of file names + contents + extra strings (tool versions, options)."""
    h = hashlib.sha256()
    for f in sorted(files):
        h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    for e in extra:
        h.update(e.encode() + b"\0")
    return h.hexdigest()[:16]


def cached_build(name: str, key: str, build: Callable[[Path], None]) -> Path:
    """Folder `<cache>/<name>-<key>`, calling `build(scratch)` once to fill it."""
    root = cache_root()
    final = root / f"{name}-{key}"
    if (final / ".complete").exists():
        return final
    with (root / f".{name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building it
        if (final / ".complete").exists():
            return final
        scratch = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
        try:
            build(scratch)
            (scratch / ".complete").write_text(key + "\n")
            if final.exists():  # leftover without .complete: never trusted
                shutil.rmtree(final)
            scratch.rename(final)
        finally:
            if scratch.exists():
                shutil.rmtree(scratch, ignore_errors=True)
    return final
