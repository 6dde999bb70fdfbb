"""The `spicetap` command's entry point: it imports almost nothing itself, so that a Ctrl-C
that comes while the rest is imported (it reaches the whole process group, maybe at once)
is a quiet stop rather than a traceback."""

from __future__ import annotations

from spicetap import interrupts


def run() -> int:
    with interrupts.kept():
        try:
            with interrupts.deferred():
                from spicetap.cli import main  # noqa: PLC0415 (the point of this module)
        except KeyboardInterrupt:
            return 130
        return main()
