"""Ctrl-C that lands where Python cannot raise it.

Ctrl-C reaches a terminal's whole process group, so it may come while the command still
starts. The interpreter raises KeyboardInterrupt wherever the main thread happens to be:
in a weakref callback or a `__del__` (importlib's module-lock callbacks run during every
import) it prints "Exception ignored in ..." with a traceback and carries on, the Ctrl-C
lost, so a proxy that was still importing would start and serve as if nothing happened;
in C code (a class's `__set_name__`, an extension module's init) it may come out as a
RuntimeError or TypeError instead.

`deferred()` holds SIGINT back while the command imports (well under a second), and raises
it after. Later, `kept()` keeps an interrupt that was swallowed anyway (quietly: the user
pressed Ctrl-C, nothing broke), and `swallowed()` lets the places where stopping is safe
(once the proxy's signal receiver is up) honour it.
"""

from __future__ import annotations  # no typing at run time: imported first, so cheap

import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

TYPE_CHECKING = False  # typing itself is not imported: see above
if TYPE_CHECKING:
    from types import FrameType


class _Lost:
    ctrl_c = False


@contextmanager
def kept() -> Iterator[None]:
    """Keep swallowed interrupts while the command runs; the hook before is restored after
    (tests run many commands in one process, under pytest's own hook)."""
    before = sys.unraisablehook

    def hook(unraisable: sys.UnraisableHookArgs) -> None:
        if isinstance(unraisable.exc_value, KeyboardInterrupt):
            _Lost.ctrl_c = True  # quietly: the user pressed Ctrl-C, nothing broke
            return
        before(unraisable)

    lost_before = _Lost.ctrl_c  # kept by an outer kept(), around the imports
    sys.unraisablehook = hook
    try:
        yield
    finally:
        sys.unraisablehook = before
        _Lost.ctrl_c = lost_before


def swallowed() -> bool:
    """Whether a Ctrl-C was lost in a place that could not raise it."""
    return _Lost.ctrl_c


@contextmanager
def handled(handler: Callable[[int, FrameType | None], object]) -> Iterator[None]:
    """SIGINT goes to `handler` within, and to what had it before after. Outside the main
    thread (tests) signals are not ours to take: nothing changes."""
    try:
        before = signal.signal(signal.SIGINT, handler)
    except ValueError:
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)


@contextmanager
def deferred() -> Iterator[None]:
    """SIGINT within is only noted, and raised as KeyboardInterrupt at the end."""
    noted: list[int] = []
    with handled(lambda signum, _frame: noted.append(signum)):
        yield
    if noted:
        raise KeyboardInterrupt
