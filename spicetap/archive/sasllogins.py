"""Whom each connection of a capture logged in as over SASL, for `spicetap import` with
the privacy policy's `sasl_user` (no I/O). The proxy says the same of live channels
(proxy/core/relay.py, its `sasl_login` auth records): the name the viewer gave its
mechanism, never the password or proof (proxy/core/saslident.py), and how it went.

spice-server refuses a wrong SASL password by closing the connection on the viewer's
answer (its failed step ends the link) and sends SASL's result only for other outcomes.
The proxy sees which side hangs up; a capture's close does not say, so a login its
connection's end cuts short is `unfinished` here, never a guessed `refused`."""

from __future__ import annotations

from dataclasses import dataclass, field

from proxy.core.saslident import SASL_LOGIN, SaslIdentity
from spicetap.records import Record

OK = "OK"  # SASL's result uses the link's error codes


@dataclass
class _Login:
    last: Record  # the exchange's latest unit
    identity: SaslIdentity = field(default_factory=SaslIdentity)


class SaslLogins:
    """Fed every record of a capture in order, before the privacy policy redacts SASL's
    exchange; `users` lists the names of accepted logins, each once."""

    def __init__(self) -> None:
        self._logins: dict[int, _Login] = {}
        self._done: set[int] = set()
        self.users: list[str] = []

    def feed(self, rec: Record) -> Record | None:
        """The `sasl_login` auth record to write after `rec`, when `rec` ends a login."""
        if rec.connection in self._done:
            return None
        if rec.kind == "link" and rec.name == "sasl":
            login = self._logins.setdefault(rec.connection, _Login(rec))
            if rec.direction == "c2s":
                login.identity.client(rec.raw)
            else:
                login.identity.server(rec.raw)
            login.last = rec
            return None
        if rec.connection not in self._logins:
            return None
        if rec.kind == "link" and rec.name == "sasl_result":
            accepted = (rec.fields or {}).get("error") == OK
            return self._said(rec, "accepted" if accepted else "refused")
        if rec.kind in ("close", "error", "gap"):  # a gap: what follows is not the exchange
            return self._said(rec, "unfinished")
        return None

    def finish(self) -> list[Record]:
        """Logins the capture ends in the middle of."""
        return [self._said(login.last, "unfinished") for login in list(self._logins.values())]

    def _said(self, rec: Record, outcome: str) -> Record:
        login = self._logins.pop(rec.connection)
        self._done.add(rec.connection)
        identity = login.identity
        if outcome == "accepted" and identity.user is not None and identity.user not in self.users:
            self.users.append(identity.user)
        return rec._replace(
            direction="s2c",
            kind="auth",
            msg_type=None,
            name=SASL_LOGIN,
            raw=b"",
            error=None,
            fields={**identity.fields(), "outcome": outcome},
            agent_types=frozenset(),
        )
