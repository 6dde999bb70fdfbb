# Types of the C extension proxy/core/_fastframe.c.
from typing import Any

from proxy.core.framing import MessageBuilder

# (message name, struct name, ((member, struct format), ...))
Layout = tuple[str, str, tuple[tuple[str, str], ...]]

class FlatBuilder:
    """A MessageBuilder: called as framing.MessageBuilder is."""

    time: float
    def __init__(
        self,
        record_type: type[tuple[Any, ...]],
        ident: tuple[int | None, int, str, int],
        layouts: dict[str, dict[int, Layout]],
        no_agent_types: frozenset[int],
        dialect: object,
        channel_type: int,
        fallback: MessageBuilder,
    ) -> None: ...
    def __call__(
        self,
        d: str,
        msg_type: int,
        data: bytes,
        start: int,
        body: int,
        end: int,
        serial: int | None,
        sub_list: int,
        /,
    ) -> Any: ...

def frame(
    direction: str,
    data: bytes,
    mini: bool,
    limit: int,
    build: MessageBuilder,
    events: list[Any],
    /,
) -> tuple[int, int, str | None]: ...

class Assembly:
    """A large message filled by copies, taken once whole (framing.AssemblyLike)."""

    filled: int
    missing: int
    def __init__(self, size: int) -> None: ...
    def add(self, data: bytes | memoryview, /) -> int: ...
    def take(self) -> bytes: ...
    def partial(self) -> bytes: ...
