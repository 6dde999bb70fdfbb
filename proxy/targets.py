"""Where viewers go: SPICE servers as configured targets, turned into upstream openers.

A target has a plain address, a TLS address, or both (QEMU's port and tls-port), and the
checks its TLS must pass. The reverse listeners use one target each; the CONNECT front picks
a target per tunnel: by name, by one of a target's addresses, or by the allow-list.
"""

from __future__ import annotations

import ssl
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from proxy.core.allow import AllowList, AllowListError
from proxy.core.endpoint import endpoint_text
from proxy.core.linkrewrite import LinkPolicy
from proxy.io.server import Upstream, tcp_end_opener, tcp_opener, tls_end_opener, tls_opener
from proxy.tls import TlsSetupError, client_context, parse_subject
from spicetap.config import ConnectSection, TargetSection
from spicetap.errors import UserError

Address = tuple[str, int]


def host_port(text: str, what: str, *, any_port: bool = False) -> Address:
    """HOST:PORT or [IPv6]:PORT; with any_port, port 0 (the system picks one) is allowed."""
    host, sep, port = text.rpartition(":")
    digits = port.isascii() and port.isdigit()  # isdigit() alone takes "²"
    if not sep or not digits or not (0 if any_port else 1) <= int(port) < 65536:
        raise UserError(f"{what} {text!r}: expected HOST:PORT")
    if host.startswith("["):
        if not host.endswith("]") or len(host) < 3 or ":" not in host:
            raise UserError(f"{what} {text!r}: expected [IPv6]:PORT")
        host = host[1:-1]
    elif ":" in host or "]" in host:
        raise UserError(f"{what} {text!r}: an IPv6 address goes in brackets, as [::1]:{port}")
    return host or "127.0.0.1", int(port)


@dataclass(frozen=True)
class Target:
    name: str | None  # None: reached by an address the allow-list permits
    plain: Address | None
    tls: Address | None
    ca: Path | None = None
    host_subject: str | None = None
    insecure: bool = False
    policy: LinkPolicy | None = None  # its own authentication, else the proxy's

    @classmethod
    def from_section(
        cls, name: str, section: TargetSection, policy: LinkPolicy | None = None
    ) -> Target:
        where = f"[targets.{name}]"
        check_upstream_tls(
            Path(section.upstream_ca) if section.upstream_ca else None,
            section.upstream_host_subject,
            section.upstream_insecure,
            (
                f"{where} upstream_ca",
                f"{where} upstream_host_subject",
                f"{where} upstream_insecure",
            ),
        )
        return cls(
            name,
            host_port(section.upstream, f"{where} upstream") if section.upstream else None,
            host_port(section.upstream_tls, f"{where} upstream_tls")
            if section.upstream_tls
            else None,
            Path(section.upstream_ca) if section.upstream_ca else None,
            section.upstream_host_subject,
            section.upstream_insecure,
            policy,
        )

    def upstream(self, tls: bool, keylog: Path | None) -> Upstream:
        """The server side for a viewer that speaks TLS (tls) or not: the matching port when
        the target has it, else the other one (TLS is then terminated or added here)."""
        use_tls = self.tls is not None if tls else self.plain is None
        if not use_tls:
            assert self.plain is not None
            host, port = self.plain
            opener, end_opener = tcp_opener(host, port), tcp_end_opener(host, port)
            label = endpoint_text((host, port))
            return Upstream(opener, label, self.name, end_opener, self.policy, (host, port))
        assert self.tls is not None
        host, port = self.tls
        ctx = _client_context(self.ca, self.insecure, keylog, self.host_subject is None)
        opener = tls_opener(host, port, ctx, self.host_subject)
        end_opener = tls_end_opener(host, port, ctx, self.host_subject)
        label = f"{endpoint_text((host, port))} (tls)"
        return Upstream(opener, label, self.name, end_opener, self.policy, (host, port))


def _servers(target: Target) -> tuple[Address, ...]:
    return tuple(address for address in (target.plain, target.tls) if address is not None)


def check_upstream_tls(
    ca: Path | None, subject: str | None, insecure: bool, names: tuple[str, str, str]
) -> None:
    """How a TLS upstream is checked, refused at start-up when it cannot work. `names`: how
    the user gave the CA, the host subject and insecure (options, or config keys)."""
    ca_name, subject_name, insecure_name = names
    if insecure and (ca is not None or subject is not None):
        given = ca_name if ca is not None else subject_name
        raise UserError(
            f"{insecure_name} turns off the check {given} asks for: give only one of them"
        )
    if subject is not None:
        check_subject_text(subject, subject_name)


def check_subject_text(subject: str, name: str) -> None:
    """UserError, naming the option or place in the file, when `subject` is no
    "C=..,O=..,CN=.." a certificate could carry."""
    try:
        parse_subject(subject)
    except TlsSetupError as exc:
        raise UserError(f"{name}: {exc}") from None


def _client_context(
    ca: Path | None, insecure: bool, keylog: Path | None, check_hostname: bool
) -> ssl.SSLContext:
    """The context for one distinct check, made again once its CA file changes (a CA
    replaced while the proxy runs is used by the next connections, with or without a
    reload)."""
    return _context_for(ca, _file_version(ca), insecure, keylog, check_hostname)


def _file_version(path: Path | None) -> tuple[int, ...] | None:
    if path is None:
        return None
    try:
        st = path.stat()
    except OSError:
        return None  # the context's own read then says why
    return (st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns)


@lru_cache(maxsize=256)  # one context per check: CONNECT opens one upstream per channel
def _context_for(
    ca: Path | None,
    _version: tuple[int, ...] | None,
    insecure: bool,
    keylog: Path | None,
    check_hostname: bool,
) -> ssl.SSLContext:
    try:
        return client_context(ca, insecure, keylog, check_hostname=check_hostname)
    except TlsSetupError as exc:
        raise UserError(str(exc)) from None


@dataclass
class ConnectRouter:
    """Decides which target a CONNECT host:port reaches, or None: refused. A reload
    replaces its targets and allow-list in place (reconfigure), on the trio thread that
    routes, so a tunnel never sees half of each."""

    targets: dict[str, Target]
    allow: AllowList
    ca: Path | None = None
    insecure: bool = False
    # migration destinations announced on this front's sessions, until a monotonic time
    admitted: dict[Address, float] = field(default_factory=dict)
    # by name, where a target was before a reload moved it (newest first): the sessions
    # begun there may open more channels (see moved)
    retired: dict[str, list[Target]] = field(default_factory=dict)

    def admit(self, address: Address, until: float) -> None:
        """Let viewers CONNECT to `address` until `until` (a live migration's destination,
        where a viewer behind this front goes next)."""
        self.admitted[address] = max(until, self.admitted.get(address, 0.0))

    def reconfigure(self, fresh: ConnectRouter) -> None:
        """Route as `fresh` does from now on; admitted migration destinations stay, and so
        does where each moved target was."""
        for name, before in self.targets.items():
            after = fresh.targets.get(name)
            if after is not None and _servers(after) != _servers(before):
                # once per place: moving back and forth makes no list that grows
                places = (_servers(after), _servers(before))
                older = [t for t in self.retired.get(name, []) if _servers(t) not in places]
                self.retired[name] = [before, *older]
        self.targets, self.allow = fresh.targets, fresh.allow
        self.ca, self.insecure = fresh.ca, fresh.insecure

    def moved(self, target: Target, live: list[Address]) -> list[Target]:
        """Where `target` was before reloads moved it, as far as channels are still open
        there (`live`: the servers of the open channels sent to this name); the rest is
        forgotten."""
        if target.name is None or target.name not in self.retired:
            return []
        now = set(_servers(target))
        kept = [
            before
            for before in self.retired[target.name]
            if any(server in live and server not in now for server in _servers(before))
        ]
        if kept:
            self.retired[target.name] = kept
        else:
            del self.retired[target.name]
        return kept

    @classmethod
    def from_config(cls, section: ConnectSection, targets: dict[str, Target]) -> ConnectRouter:
        try:
            allow = AllowList.parse(section.allow)
        except AllowListError as exc:
            raise UserError(f"[connect] {exc}") from None
        ca = Path(section.upstream_ca) if section.upstream_ca else None
        names = ("[connect] upstream_ca", "", "[connect] upstream_insecure")
        check_upstream_tls(ca, None, section.upstream_insecure, names)
        if ca is not None:  # read now: the first viewer would find it missing otherwise
            _client_context(ca, section.upstream_insecure, None, True)
        return cls(targets, allow, ca, section.upstream_insecure)

    def route(self, host: str, port: int) -> Target | None:
        by_name = self.targets.get(host) or self.targets.get(host.lower())
        if by_name is not None:
            return by_name
        for target in self.targets.values():
            if (host, port) in (target.plain, target.tls):
                return target
        until = self.admitted.get((host, port))
        if self.allow.allows(host, port) or (until is not None and time.monotonic() < until):
            # the viewer picked the port; whether it is TLS shows in the tunnel's first byte
            return Target(None, (host, port), (host, port), self.ca, None, self.insecure)
        return None
