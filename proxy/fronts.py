"""What `spicetap proxy` serves, built from its options and config file: the link policies
(authentication, masked capabilities), the targets, the reverse routes, the CONNECT front's
router and the WebSocket front's route. Built once at start, and again at each reload
(proxy/io/reloading.py), which then carries the viewer credentials' state over
(carry_credentials) so that a reload never makes a used token new again.
"""

from __future__ import annotations

import argparse
import ssl
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from proxy.core.allow import AllowList, AllowListError, IpNetwork
from proxy.core.credentials import ViewerCredentials
from proxy.core.forwarded import parse_trusted
from proxy.core.lockout import LockoutPolicy
from proxy.core.relay import Limits, LinkPolicy
from proxy.core.websocket import origin_is_valid
from proxy.io.connect import ConnectFront
from proxy.io.server import Upstream
from proxy.linksetup import api_token, link_policy_from, scoped, target_policy
from proxy.recorder import RecordingOptions
from proxy.targets import (
    Address,
    ConnectRouter,
    Target,
    check_subject_text,
    check_upstream_tls,
    host_port,
)
from proxy.tls import (
    HostCertificates,
    TlsSetupError,
    listen_host,
    load_or_create_ca,
)
from proxy.viewer_certs import (
    CertificateChoice,
    ViewerCertificate,
    ViewerCertificates,
    issued_folder,
)
from spicetap.config import DEFAULT_LISTEN, Config, ProxySection, TargetSection
from spicetap.errors import UserError


def pick(flag: Any, configured: Any) -> Any:
    return configured if flag is None else flag


def named(args: argparse.Namespace, dest: str, section: str, key: str) -> str:
    """How an error names a value: by its flag when given there, else by its place in the
    config file (the flag would send the user looking in the wrong place)."""
    if getattr(args, dest) is not None or not args.config:
        return "--" + dest.replace("_", "-")
    return f"{args.config}: [{section}] {key}"


@dataclass(frozen=True)
class Route:
    """One reverse listener, or the WebSocket front's (`web`), and where its viewers go."""

    listen: tuple[str, int]
    viewer_tls: ViewerCertificate | None  # what viewers are shown; None: plain
    upstream: Upstream
    target: Target | None = None  # how a migration's destination is checked (its CA)
    origins: tuple[str, ...] = ()  # the WebSocket front's: other pages allowed to connect
    trusted: tuple[IpNetwork, ...] = ()  # the WebSocket front's: reverse proxies believed
    proxied: tuple[IpNetwork, ...] = ()  # load balancers that send PROXY headers
    web: bool = False  # browsers (spice-html5) over WebSocket, not SPICE viewers

    @property
    def context(self) -> ssl.SSLContext | None:
        return None if self.viewer_tls is None else self.viewer_tls.context

    @property
    def subject(self) -> str | None:
        """The subject a migration tells viewers to expect: an issued certificate's (a
        user's own is checked by host name, as with any certificate)."""
        tls = self.viewer_tls
        return None if tls is None or tls.source is not None else tls.subject


def _cli_target(
    args: argparse.Namespace, cp: ProxySection, policy: LinkPolicy | None = None
) -> Target | None:
    """The target named on the command line (--upstream/--upstream-tls) or in [proxy];
    `policy`: its routes' own (inject: scoped to the main upstream's minted tokens)."""
    plain_up = pick(args.upstream, cp.upstream)
    if plain_up is None and args.upstream_tls is None:
        return None
    check_upstream_tls(
        Path(args.upstream_ca) if args.upstream_ca else None,
        args.upstream_host_subject,
        args.upstream_insecure,
        ("--upstream-ca", "--upstream-host-subject", "--upstream-insecure"),
    )
    return Target(
        None,
        host_port(plain_up, named(args, "upstream", "proxy", "upstream")) if plain_up else None,
        host_port(args.upstream_tls, "--upstream-tls") if args.upstream_tls else None,
        Path(args.upstream_ca) if args.upstream_ca else None,
        args.upstream_host_subject,
        args.upstream_insecure,
        policy,
    )


def _routes(
    args: argparse.Namespace,
    config: Config,
    targets: dict[str, Target],
    keylog: Path | None,
    certificates: FrontCertificates,
    main_policy: LinkPolicy | None = None,
) -> list[Route]:
    cp = config.proxy
    routes: list[Route] = []
    main = _cli_target(args, cp, main_policy)
    if main is None and (args.listen or args.tls_listen):
        raise UserError("--listen and --tls-listen need --upstream or --upstream-tls")
    if main is not None:
        listen_text = pick(args.listen, cp.listen)
        if listen_text is None and not (args.tls_listen or pick(args.ws_listen, cp.ws_listen)):
            listen_text = DEFAULT_LISTEN
        if listen_text is not None:
            what = named(args, "listen", "proxy", "listen")
            listen = host_port(listen_text, what, any_port=True)
            routes.append(Route(listen, None, main.upstream(False, keylog), main))
        if args.tls_listen:
            listen = host_port(args.tls_listen, "--tls-listen", any_port=True)
            shown = certificates.present(certificates.proxy_choice, listen)
            routes.append(Route(listen, shown, main.upstream(True, keylog), main))
    for name, section in config.targets.items():
        target = targets[name]
        if section.listen:
            where = f"{args.config}: [targets.{name}] listen"
            listen = host_port(section.listen, where, any_port=True)
            routes.append(Route(listen, None, target.upstream(False, keylog), target))
        if section.tls_listen:
            where = f"{args.config}: [targets.{name}] tls_listen"
            listen = host_port(section.tls_listen, where, any_port=True)
            shown = certificates.present(certificates.target_choice(name, section), listen)
            routes.append(Route(listen, shown, target.upstream(True, keylog), target))
    return routes


def _connect_front(
    args: argparse.Namespace, config: Config, targets: dict[str, Target], keylog: Path | None
) -> tuple[tuple[str, int], ConnectFront] | None:
    listen_text = pick(args.connect_listen, config.connect.listen)
    if listen_text is None:
        if args.allow:
            raise UserError("--allow needs --connect-listen (or [connect] listen)")
        return None
    what = named(args, "connect_listen", "connect", "listen")
    listen = host_port(listen_text, what, any_port=True)
    section = config.connect
    if args.allow:
        try:  # named as flags here; the file's own patterns as [connect] allow below
            AllowList.parse(args.allow)
        except AllowListError as exc:
            raise UserError(f"--{exc}") from None
        section = replace(section, allow=(*section.allow, *args.allow))
    if args.upstream_ca and not section.upstream_ca:
        section = replace(section, upstream_ca=args.upstream_ca)
    if args.upstream_insecure:
        section = replace(section, upstream_insecure=True)
    router = ConnectRouter.from_config(section, targets)
    if not router.allow.patterns and not targets:
        raise UserError(
            "the CONNECT front allows nothing: give --allow HOST:PORT patterns, "
            "[connect] allow, or [targets.NAME] sections"
        )
    try:
        subject = pick(args.tls_subject, config.proxy.tls_subject)
        certificates = HostCertificates(
            load_or_create_ca(), subject, keylog, issued_folder() / "hosts"
        )
    except TlsSetupError as exc:
        raise UserError(str(exc)) from None
    return listen, ConnectFront(router, certificates, keylog)


def _websocket_front(
    args: argparse.Namespace,
    cp: ProxySection,
    keylog: Path | None,
    certificates: FrontCertificates,
    main_policy: LinkPolicy | None = None,
) -> Route | None:
    """--ws-listen (or [proxy] ws_listen): browsers reach the main upstream, plain if
    there is one, over WebSocket; --ws-tls (ws_tls) adds TLS with the viewer certificate."""
    listen_text = pick(args.ws_listen, cp.ws_listen)
    tls = bool(pick(args.ws_tls, cp.ws_tls))
    if listen_text is None:
        if tls:
            where = named(args, "ws_tls", "proxy", "ws_tls")
            raise UserError(f"{where} needs --ws-listen (or [proxy] ws_listen)")
        if args.ws_origin:
            raise UserError("--ws-origin needs --ws-listen (or [proxy] ws_listen)")
        if args.ws_trusted_proxy:
            raise UserError("--ws-trusted-proxy needs --ws-listen (or [proxy] ws_listen)")
        return None
    main = _cli_target(args, cp, main_policy)
    if main is None:
        raise UserError("--ws-listen needs --upstream or --upstream-tls")
    listen = host_port(listen_text, named(args, "ws_listen", "proxy", "ws_listen"), any_port=True)
    shown = certificates.present(certificates.proxy_choice, listen) if tls else None
    origins = tuple(args.ws_origin) or cp.ws_origins
    where = "--ws-origin" if args.ws_origin else f"{args.config}: [proxy] ws_origins"
    for origin in origins:  # compared with the browser's Origin header, which has this form
        if not origin_is_valid(origin):
            raise UserError(f"{where} {origin!r}: expected * or SCHEME://HOST[:PORT]")
    trusted = _networks(args, "ws_trusted_proxy", cp.ws_trusted_proxies, "ws_trusted_proxies")
    upstream = main.upstream(False, keylog)
    return Route(listen, shown, upstream, origins=origins, trusted=trusted, web=True)


def _networks(
    args: argparse.Namespace, dest: str, configured: tuple[str, ...], key: str
) -> tuple[IpNetwork, ...]:
    """Addresses and networks a repeatable flag gives, else the [proxy] key."""
    flagged: list[str] = getattr(args, dest)
    try:
        return parse_trusted(flagged or configured)
    except ValueError as exc:
        where = "--" + dest.replace("_", "-") if flagged else f"{args.config}: [proxy] {key}"
        raise UserError(f"{where}: {exc}") from None


class FrontCertificates:
    """What each TLS front presents, as the flags and the file say: [proxy]'s choice (the
    flags', else the file's), or a target's own. UserError names what cannot be used."""

    def __init__(
        self,
        args: argparse.Namespace,
        cp: ProxySection,
        keylog: Path | None,
        kept: list[ViewerCertificate] | None = None,
    ) -> None:
        self.args = args
        self.made = ViewerCertificates(load_or_create_ca, issued_folder(), keylog, kept or ())
        names = tuple(named(args, key, "proxy", key) for key in _CHOICE_KEYS)
        self.proxy_choice = _choice(
            pick(args.tls_cert, cp.tls_cert),
            pick(args.tls_key, cp.tls_key),
            pick(args.tls_subject, cp.tls_subject),
            names,
        )

    def target_choice(self, name: str, section: TargetSection) -> CertificateChoice:
        """A target with a certificate or subject of its own presents it; else [proxy]'s."""
        if not section.own_certificate:
            return self.proxy_choice
        where = f"{self.args.config}: [targets.{name}] "
        own = (section.tls_cert, section.tls_key, section.tls_subject)
        return _choice(*own, tuple(where + key for key in _CHOICE_KEYS))

    def present(self, choice: CertificateChoice, listen: tuple[str, int]) -> ViewerCertificate:
        try:
            return self.made.present(choice, listen_host(listen[0]))
        except TlsSetupError as exc:
            raise UserError(str(exc)) from None


_CHOICE_KEYS = ("tls_cert", "tls_key", "tls_subject")


def _choice(
    cert: str | None, key: str | None, subject: str | None, names: tuple[str, ...]
) -> CertificateChoice:
    """names: how errors name the three (flags, or places in the file)."""
    if (cert is None) != (key is None):
        raise UserError(f"{names[0]} and {names[1]} go together")
    if cert is not None and subject is not None:
        raise UserError(f"{names[2]} names certificates spicetap issues, not {names[0]}")
    if subject is not None:
        check_subject_text(subject, names[2])
    return CertificateChoice(
        Path(cert) if cert is not None else None, Path(key) if key is not None else None, subject
    )


def _management_certificate(
    args: argparse.Namespace, cp: ProxySection, previous: Fronts | None
) -> ViewerCertificate | None:
    """What the management API presents over HTTPS: [proxy]'s choice, as for viewers.
    Whether the API speaks HTTPS waits for a restart; its certificate follows each reload
    (a renewed file, a new subject) as the listeners' do. Its TLS keys are never logged:
    its requests carry the API's token."""
    listen_text = pick(args.management, cp.management)
    if previous is not None:
        on = previous.management_tls is not None  # as the proxy started
    else:  # (--management-tls without the API is refused by the proxy command)
        on = listen_text is not None and bool(pick(args.management_tls, cp.management_tls))
    if not on or listen_text is None:
        return None
    kept = [previous.management_tls] if previous and previous.management_tls else []
    certificates = FrontCertificates(args, cp, None, kept)
    listen = host_port(listen_text, named(args, "management", "proxy", "management"), any_port=True)
    return certificates.present(certificates.proxy_choice, listen)


@dataclass(frozen=True)
class Fronts:
    """Everything served that the options and the config file decide, and a reload may
    change."""

    link_policy: LinkPolicy  # the proxy's own ([proxy], flags)
    targets: dict[str, Target]
    routes: list[Route]  # the reverse listeners
    connect: tuple[Address, ConnectFront] | None
    websocket: Route | None
    scopes: dict[str, LinkPolicy]  # by target name, "" the main upstream: minting's view
    # each new channel's; a reload changes the timeouts (max_message is the recording
    # process's too, so it stays)
    limits: Limits
    follow_migration: bool = True  # for channels from then on
    max_connections: int | None = None  # None: what the open-files limit serves
    lockout: LockoutPolicy = field(default_factory=LockoutPolicy)
    # the management API's bearer token (read again at each reload: rotation); None: none
    api_token: bytes | None = field(default=None, repr=False)
    # what new sessions' archives get (set by the proxy's command, not build_fronts);
    # None: nothing is recorded
    recording: RecordingOptions | None = None
    # what the management API presents over HTTPS; None: it speaks plain HTTP, or is off
    management_tls: ViewerCertificate | None = None
    # read whom viewers log in as over SASL (--sasl-user, [recording.privacy] sasl_user):
    # for channels from then on
    sasl_user: bool = False

    def fronts(self) -> list[Route]:
        """The reverse listeners and the WebSocket front's."""
        return [*self.routes, *([self.websocket] if self.websocket is not None else [])]

    def owners(self) -> dict[str | None, ViewerCredentials]:
        """Inject credentials by owner: None the proxy's, else a target with its own."""
        base = self.link_policy.viewers
        owned: dict[str | None, ViewerCredentials] = {} if base is None else {None: base}
        for name, target in self.targets.items():
            viewers = target.policy.viewers if target.policy is not None else None
            if viewers is not None and viewers is not base:
                owned[name] = viewers
        return owned


def build_fronts(
    args: argparse.Namespace,
    config: Config,
    keylog: Path | None,
    mintable: bool,
    previous: Fronts | None = None,
) -> Fronts:
    """UserError names what cannot be served. Reads password, token and CA files and may
    issue certificates; changes nothing that runs (see carry_credentials)."""
    cp = config.proxy
    # spicetap's RSA key stays across reloads: a viewer between link reply and ticket
    # encrypted for the key it was shown
    key = previous.link_policy.key if previous is not None else None
    link_policy = link_policy_from(args, cp, mintable, key)
    targets = {
        name: Target.from_section(name, t, target_policy(name, t, link_policy, mintable))
        for name, t in config.targets.items()
    }
    main_policy = scoped(link_policy, "") if link_policy.auth == "inject" else None
    kept = [r.viewer_tls for r in previous.fronts() if r.viewer_tls] if previous else []
    certificates = FrontCertificates(args, cp, keylog, kept)
    routes = _routes(args, config, targets, keylog, certificates, main_policy)
    proxied = _networks(args, "proxy_protocol_from", cp.proxy_protocol_from, "proxy_protocol_from")
    routes = [replace(route, proxied=proxied) for route in routes]
    connect = _connect_front(args, config, targets, keylog)
    websocket = _websocket_front(args, cp, keylog, certificates, main_policy)
    if websocket is not None:
        websocket = replace(websocket, proxied=proxied)
    if connect is not None:
        connect[1].proxied = proxied
    if proxied and not routes and websocket is None and connect is None:
        raise UserError(
            "--proxy-protocol-from needs a reverse listener (--listen, --tls-listen), "
            "the WebSocket front (--ws-listen) or the CONNECT front (--connect-listen)"
        )
    scopes = {name: t.policy or link_policy for name, t in targets.items()}
    if _cli_target(args, cp) is not None:
        scopes[""] = main_policy or link_policy
    if not routes and connect is None and websocket is None:
        raise UserError(
            "nothing to serve: give --upstream HOST:PORT (or --upstream-tls), "
            "--connect-listen with --allow, or targets in --config"
        )
    limits = Limits(
        link_timeout=pick(args.link_timeout, cp.link_timeout),
        idle_timeout=pick(args.idle_timeout, cp.idle_timeout),
        max_message=pick(args.max_message, cp.max_message),
    )
    follow = bool(pick(args.follow_migration, cp.follow_migration))
    max_connections = pick(args.max_connections, cp.max_connections)
    lockout = LockoutPolicy(
        failures=pick(args.lockout_failures, cp.lockout_failures),
        window=pick(args.lockout_window, cp.lockout_window),
        duration=pick(args.lockout_seconds, cp.lockout_seconds),
    )
    return Fronts(
        link_policy, targets, routes, connect, websocket, scopes, limits, follow, max_connections,
        lockout, management_token(args, cp),
        management_tls=_management_certificate(args, cp, previous),
        sasl_user=args.sasl_user or config.recording.privacy.sasl_user,
    )  # fmt: skip


def management_token(args: argparse.Namespace, cp: ProxySection) -> bytes | None:
    """The management API's token, when it has one (without the API, the file is refused
    at start: proxy/cli.py _management)."""
    token_file = pick(args.management_token_file, cp.management_token_file)
    if token_file is None or pick(args.management, cp.management) is None:
        return None
    return api_token(
        token_file, named(args, "management_token_file", "proxy", "management_token_file")
    )


def carry_credentials(old: Fronts, new: Fronts) -> None:
    """Once a reload's fronts are built: each owner's new credentials carry on from its old
    ones (tokens used stay used, minted ones stay good), and a target whose credentials
    changed hands keeps the tokens minted for it. Cannot fail."""
    before, after = old.owners(), new.owners()
    for owner, creds in after.items():
        if owner in before:
            creds.inherit(before[owner])
    for scope, policy in new.scopes.items():
        if policy.viewers is None:
            continue
        for creds in before.values():
            policy.viewers.take_minted(scope, creds)


def speaks(route: Route) -> str:
    """What a listener's viewers speak: "plain" or "tls", or "websocket" (either)."""
    if route.web:
        return "websocket"
    return "tls" if route.viewer_tls is not None else "plain"


def route_key(route: Route) -> tuple[str, str, int, str]:
    """A listener's identity across reloads: what it speaks and where. Port 0 (the
    system picks one, each time) is told apart by the target it serves."""
    host, port = route.listen
    target = "" if port or route.target is None or route.target.name is None else route.target.name
    return (speaks(route), host, port, target)
