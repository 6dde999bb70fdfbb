"""The `spicetap` command's entry point: it imports almost nothing itself, so that a Ctrl-C
that comes while the rest is imported (it reaches the whole process group, maybe at once)
is a quiet stop rather than a traceback."""

from __future__ import annotations

# Taken first, at import, with the C module (`signal` imports enum and more, long enough
# for a Ctrl-C to land inside): from here on a Ctrl-C while spicetap starts is only noted.
# Before this line the interpreter itself is starting (site, its .pth files), where
# Python prints its own traceback; nothing of ours can run there.
import _signal  # type: ignore[import-not-found]  # no stubs: the C half of `signal`

_EARLY: list[int] = []
_BEFORE = _signal.getsignal(_signal.SIGINT)
_TAKEN = _BEFORE is _signal.default_int_handler  # not where a host (tests) set its own
if _TAKEN:
    _signal.signal(_signal.SIGINT, lambda signum, _frame: _EARLY.append(signum))

from spicetap import interrupts  # noqa: E402 (after the handler, the point of this module)


def run() -> int:
    with interrupts.kept():
        try:
            with interrupts.deferred():
                from spicetap.cli import main  # noqa: PLC0415 (the point of this module)
        except KeyboardInterrupt:
            return 130
        finally:
            if _TAKEN:
                _signal.signal(_signal.SIGINT, _BEFORE)
        if _EARLY:  # came before deferred() took over: a stop all the same
            return 130
        return main()
