"""Reloading `spicetap proxy`'s config file while it serves (SIGHUP, POST /api/reload).

A gateway adds and removes VMs far more often than it may drop every session, so a reload
re-reads the file and applies it to connections that arrive from then on; channels already
relayed stay on the upstream, policy and listener they began with. All or nothing: the new
fronts are built in full first (files read, certificates issued, in a worker thread), and
a file that cannot be served leaves everything as it was. What only a restart applies is
named (proxy/core/reload.py). A listener that cannot be opened (its port taken) is the one
thing that can fail part-way: it is reported, and the next reload tries it again.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import trio

from proxy.core.admission import Admission
from proxy.core.endpoint import endpoint_text, listen_text
from proxy.core.reload import TargetChanges, plan, restart_needed, target_changes
from proxy.fronts import Fronts, Route, carry_credentials, route_key, speaks
from proxy.io.connect import ConnectFront, serve_connect
from proxy.io.guard import connection_limit, raise_open_files_limit
from proxy.io.migration import MigrationListeners
from proxy.io.server import ChannelProxy, Routing, Serving, serve_tcp
from proxy.io.tokens import TokenDesk
from proxy.io.websocket import serve_websocket
from proxy.targets import Address
from proxy.viewer_certs import ViewerCertificate
from spicetap.config import Config, ConfigError, load_config
from spicetap.errors import UserError

log = logging.getLogger("spicetap.proxy")

RouteKey = tuple[str, str, int, str]
CONNECT_FRONT = "HTTP CONNECT front"  # what its "listening" line says it is
# (config, previous fronts) -> new fronts; blocking (reads files), UserError when unusable
Rebuild = Callable[[Config, Fronts], Fronts]


class ReloadFailed(Exception):
    """The config file cannot be used; nothing was changed. The message is one line."""


@dataclass(frozen=True)
class ReloadReport:
    targets: TargetChanges
    opened: list[str]  # "KIND HOST:PORT"
    stopped: list[str]
    repointed: list[str]  # "KIND HOST:PORT -> UPSTREAM"
    failed: list[str]  # "KIND HOST:PORT: why"
    restart_needed: list[str]  # "[section] key"
    renewed: list[str] = field(default_factory=list)  # "KIND HOST:PORT: its new certificate"

    def json(self) -> dict[str, Any]:
        return {
            "success": not self.failed,
            "targets": {
                "added": self.targets.added,
                "removed": self.targets.removed,
                "changed": self.targets.changed,
            },
            "listeners": {
                "opened": self.opened,
                "stopped": self.stopped,
                "repointed": self.repointed,
                "failed": self.failed,
                "renewed": self.renewed,
            },
            "restartNeeded": self.restart_needed,
        }

    def summary(self) -> str:
        t = self.targets
        parts = [
            f"{len(t.added)} target(s) added, {len(t.removed)} removed, {len(t.changed)} changed",
            f"{len(self.opened)} listener(s) opened, {len(self.stopped)} stopped, "
            f"{len(self.repointed)} re-pointed",
        ]
        if self.renewed:
            parts.append(f"{len(self.renewed)} show a new certificate")
        if self.failed:
            parts.append(f"{len(self.failed)} could not be opened")
        return "; ".join(parts)


@dataclass
class _Running:
    route: Route
    routing: Routing
    serving: Serving
    bound: tuple[str, int]  # the port as bound (the config's may be 0)

    def where(self) -> str:
        """KIND HOST:PORT"""
        return f"{listener_kind(self.route)} {endpoint_text(self.bound)}"


@dataclass
class _RunningConnect:
    listen: Address  # as configured (port 0: the system picked `bound`)
    front: ConnectFront  # the one serving: reloads change it in place
    serving: Serving
    bound: tuple[str, int]

    def where(self) -> str:
        return f"connect {endpoint_text(self.bound)}"


def listener_kind(route: Route) -> str:
    """How log lines and the "listening" lines name a listener: plain or tls and the
    target's name, or websocket."""
    kind = speaks(route)
    return kind if route.upstream.target is None else f"{kind}:{route.upstream.target}"


def _bound(serving: Serving) -> tuple[str, int]:
    host, port = serving.listeners[0].socket.getsockname()[:2]
    return str(host), int(port)


class FrontListeners:
    """The listeners that run now: the reverse ones and the WebSocket front's by route_key,
    and the CONNECT front's. Opened at start and by reloads, stopped, re-pointed and moved
    by reloads."""

    def __init__(
        self,
        proxy: ChannelProxy,
        nursery: trio.Nursery,
        follow_migration: bool,
        keylog: Path | None,
    ) -> None:
        self.proxy = proxy
        self.nursery = nursery
        self.follow_migration = follow_migration
        self.keylog = keylog
        self.running: dict[RouteKey, _Running] = {}
        self.connect: _RunningConnect | None = None

    def _migration(self, route: Route) -> MigrationListeners | None:
        if not self.follow_migration or route.target is None:
            return None
        return MigrationListeners(
            self.proxy,
            self.nursery,
            ca=route.target.ca,
            insecure=route.target.insecure,
            keylog=self.keylog,
            viewer_tls=route.context,
            tls_subject=route.subject,
        )

    async def open(self, route: Route) -> Serving:
        """OSError when the address cannot be listened on."""
        migration = self._migration(route)
        routing = Routing(
            route.upstream, migration, origins=route.origins, trusted=route.trusted,
            proxied=route.proxied, tls=route.context,
        )  # fmt: skip
        serve: Any = serve_websocket if route.web else serve_tcp
        serving: Serving = await self.nursery.start(serve, self.proxy, routing, *route.listen)
        self.running[route_key(route)] = _Running(route, routing, serving, _bound(serving))
        return serving

    def stop(self, key: RouteKey) -> _Running:
        running = self.running.pop(key)
        running.serving.stop()
        return running

    def repoint(self, key: RouteKey, route: Route) -> Route:
        """New viewers on this listener go where `route` says, and are shown its
        certificate; returns the route before. The listener keeps its migration listeners
        while the target's TLS checks and the certificate stay the same."""
        running = self.running[key]
        before = running.route
        renewed = before.viewer_tls != route.viewer_tls  # by fingerprint, subject, source
        if not renewed:
            route = replace(route, viewer_tls=before.viewer_tls)
        routing = running.routing
        routing.tls = tls = route.context
        if not self.follow_migration or route.target is None:
            routing.migration = None
        elif _checks(before) != _checks(route) or routing.migration is None:
            routing.migration = self._migration(route)
        elif renewed and isinstance(routing.migration, MigrationListeners):
            # migrations from now on show it; those under way keep theirs
            routing.migration.viewer_tls, routing.migration.tls_subject = tls, route.subject
        if _destination(before) != _destination(route):
            # sessions begun there keep it for the channels they open later
            routing.retired = self.proxy.in_use([before.upstream, *routing.retired])
        routing.upstream = route.upstream
        routing.origins = route.origins
        routing.trusted = route.trusted
        routing.proxied = route.proxied
        running.route = route
        return before

    def certificates(self) -> list[tuple[str, ViewerCertificate]]:
        """What each TLS listener shows viewers now, by "KIND HOST:PORT"."""
        return [
            (running.where(), running.route.viewer_tls)
            for running in self.running.values()
            if running.route.viewer_tls is not None
        ]

    async def open_connect(self, listen: Address, front: ConnectFront) -> Serving:
        """OSError when the address cannot be listened on."""
        front.follow_migration = self.follow_migration
        serving: Serving = await self.nursery.start(serve_connect, self.proxy, front, *listen)
        self.connect = _RunningConnect(listen, front, serving, _bound(serving))
        return serving

    def stop_connect(self) -> _RunningConnect:
        running, self.connect = self.connect, None
        assert running is not None
        running.serving.stop()
        return running

    def follow(self, follow_migration: bool) -> None:
        """Whether channels from now on follow migrations (re-pointing applies it to the
        reverse listeners)."""
        self.follow_migration = follow_migration
        if self.connect is not None:
            self.connect.front.follow_migration = follow_migration


def _destination(route: Route) -> tuple[str, str | None]:
    """Where a listener forwards: the server, and the target's name."""
    return route.upstream.label, route.upstream.target


def _checks(route: Route) -> tuple[Path | None, bool] | None:
    """How a migration's destination is checked: its target's CA, or not at all."""
    target = route.target
    return None if target is None else (target.ca, target.insecure)


class Reloader:
    """Re-reads the config file and applies it (one reload at a time)."""

    def __init__(
        self,
        config_path: Path | None,
        config: Config,
        fronts: Fronts,
        rebuild: Rebuild | None,
        listeners: FrontListeners,
        tokens: TokenDesk,
    ) -> None:
        self.config_path = config_path
        self.started_with = config  # what restart-only keys are compared with
        self.config = config
        self.fronts = fronts
        self.rebuild = rebuild
        self.listeners = listeners
        self.tokens = tokens
        # told of each applied reload's fronts (the management API: its token)
        self.on_applied: list[Callable[[Fronts], None]] = []
        # told as each reload begins and ends, however asked for and whatever its outcome
        # (systemd's RELOADING, then READY)
        self.on_begin: list[Callable[[], None]] = []
        self.on_end: list[Callable[[], None]] = []
        self.lock = trio.Lock()  # one reload, or certificate renewal, at a time

    @property
    def reloadable(self) -> bool:
        return self.config_path is not None and self.rebuild is not None

    async def reload(self) -> ReloadReport:
        """ReloadFailed (nothing changed) when the file cannot be read or served."""
        path, rebuild = self.config_path, self.rebuild
        if path is None or rebuild is None:
            raise ReloadFailed("no --config file to re-read")
        async with self.lock:
            for begin in self.on_begin:
                begin()
            try:
                return await self._reload(path, rebuild)
            finally:
                for end in self.on_end:
                    end()

    async def _reload(self, path: Path, rebuild: Rebuild) -> ReloadReport:
        try:
            config, fronts = await trio.to_thread.run_sync(self._build, path, rebuild)
        except (ConfigError, UserError) as exc:
            raise ReloadFailed(str(exc)) from None
        except OSError as exc:  # e.g. a certificate that cannot be issued
            raise ReloadFailed(f"{exc.filename or 'a file'}: {exc.strerror or exc}") from None
        return await self._apply(config, fronts)

    def _build(self, path: Path, rebuild: Rebuild) -> tuple[Config, Fronts]:
        config = load_config(path)
        return config, rebuild(config, self.fronts)

    async def _apply(self, config: Config, fronts: Fronts) -> ReloadReport:
        # no await until the listeners: the other trio tasks see all of this or none
        old = self.fronts
        carry_credentials(old, fronts)
        listeners = self.listeners
        proxy = listeners.proxy
        proxy.link_policy = fronts.link_policy
        proxy.sasl_user = fronts.sasl_user
        # for channels from now on (a relay keeps the limits it began with)
        proxy.limits = replace(fronts.limits, max_message=proxy.limits.max_message)
        if proxy.state.admission is not None:
            _resize(proxy.state.admission, fronts.max_connections, old.max_connections)
        lockout = proxy.state.lockout
        if lockout is not None and lockout.policy != fronts.lockout:
            # the addresses' counts and locks stay: a reload is no way out of a lockout
            lockout.policy = fronts.lockout
            log.info("reload: lockout: %s", fronts.lockout.describe())
        listeners.follow(fronts.follow_migration)
        self.tokens.reconfigure(fronts.scopes, fronts.link_policy)
        targets = target_changes(self.config.targets, config.targets)
        for name in targets.added:
            log.info("reload: target %s added", name)
        for name in targets.removed:
            log.info("reload: target %s removed (its open channels carry on)", name)
        for name in targets.changed:
            log.info("reload: target %s changed (for new connections)", name)
        wanted = {route_key(route): route for route in fronts.fronts()}
        steps = plan(listeners.running, wanted)
        report = ReloadReport(targets, [], [], [], [], restart_needed(self.started_with, config))
        # every listener that goes is closed before any opens: its port may be wanted again
        for key in steps.stop:
            _stopped(report, listeners.stop(key).where())
        connect = self._connect_front(fronts.connect, report)
        if connect is not None:
            fronts = replace(fronts, connect=connect)
        for key in steps.keep:
            route = wanted[key]
            before = listeners.repoint(key, route)
            where = listeners.running[key].where()
            # re-pointed: it forwards elsewhere (other settings of a target show as changed)
            if _destination(before) != _destination(route):
                report.repointed.append(f"{where} -> {route.upstream.label}")
                log.info("reload: %s now forwards to %s", where, route.upstream.label)
            shown = listeners.running[key].route.viewer_tls
            if shown is not None and shown != before.viewer_tls:
                report.renewed.append(f"{where}: {shown.describe()}")
                log.info("reload: %s shows viewers a new certificate: %s", where, shown.describe())
        shown = fronts.management_tls  # the management API's HTTPS, from its next request
        if shown is not None and shown != old.management_tls:
            report.renewed.append(f"management API: {shown.describe()}")
            log.info("reload: the management API shows a new certificate: %s", shown.describe())
        self.fronts, self.config = fronts, config
        for apply in self.on_applied:
            apply(fronts)
        for key in steps.open:
            route = wanted[key]
            kind, what = listener_kind(route), f"forwarding to {route.upstream.label}"
            await self._open(report, kind, route.listen, what, listeners.open, route)
        if connect is not None and listeners.connect is None:
            await self._open(
                report, "connect", connect[0], CONNECT_FRONT, listeners.open_connect, *connect
            )
        if report.restart_needed:
            log.warning(
                "reload: changed in the file, applied at the next start only: %s",
                ", ".join(report.restart_needed),
            )
        log.info("config reloaded from %s: %s", self.config_path, report.summary())
        return report

    def _connect_front(
        self, wanted: tuple[Address, ConnectFront] | None, report: ReloadReport
    ) -> tuple[Address, ConnectFront] | None:
        """The CONNECT front as the file now has it: the running one reconfigured (its
        router remembers where moved targets were), on its listener unless the address
        changed (then closed here, opened by the caller), or a new one; None: none."""
        running = self.listeners.connect
        if running is None or wanted is None:
            if running is not None:
                _stopped(report, self.listeners.stop_connect().where())
            return wanted
        listen, fresh = wanted
        running.front.router.reconfigure(fresh.router)
        running.front.proxied = fresh.proxied
        certificates = running.front.certificates
        if (certificates.subject, certificates.ca.cert) != (
            fresh.certificates.subject, fresh.certificates.ca.cert
        ):  # [proxy] tls_subject changed, or the CA was replaced: viewers from now on
            running.front.certificates = fresh.certificates
        if listen != running.listen:
            _stopped(report, self.listeners.stop_connect().where())
        return listen, running.front

    async def _open(
        self,
        report: ReloadReport,
        kind: str,
        listen: Address,
        what: str,
        open_: Callable[..., Awaitable[Serving]],
        *args: Any,
    ) -> None:
        try:
            serving = await open_(*args)
        except OSError as exc:
            why = exc.strerror or str(exc)
            report.failed.append(f"{kind} {listen_text(listen)}: {why}")
            log.error("reload: cannot listen (%s) on %s: %s", kind, listen_text(listen), why)
            return
        host, port = _bound(serving)
        report.opened.append(f"{kind} {endpoint_text((host, port))}")
        announce(kind, serving.listeners, what)

    async def reload_logged(self) -> None:
        """A reload asked for by SIGHUP: its outcome goes to the log (and a line to stdout
        that scripts may wait for)."""
        try:
            await self.reload()
        except ReloadFailed as exc:
            log.error("reload failed, the running config stays: %s", exc)
        except Exception:  # a bug must cost the reload, never the proxy and its sessions
            log.exception("reload failed")
        else:
            print("spicetap proxy reloaded", flush=True)
            return
        print("spicetap proxy reload failed", flush=True)


def _stopped(report: ReloadReport, where: str) -> None:
    report.stopped.append(where)
    log.info("reload: stopped listening (%s); its open channels carry on", where)


def _resize(admission: Admission, max_connections: int | None, before: int | None) -> None:
    # the open-files limit is read again (an operator may have raised it), but a cap it
    # cannot serve was warned about when it was set: not at every reload
    files = raise_open_files_limit()
    limit = connection_limit(max_connections, files, warn=max_connections != before)
    if limit != admission.limit:
        log.info("reload: serving up to %d connections at once (was %d)", limit, admission.limit)
        admission.resize(limit)


def announce(kind: str, listeners: list[trio.SocketListener], what: str) -> None:
    """One log line, and one stdout line scripts and tests read: the bound port (port 0 in
    --listen lets the system pick one). "spicetap proxy ready" follows the last of them."""
    host, port = listeners[0].socket.getsockname()[:2]
    log.info("listening (%s) on %s, %s", kind, endpoint_text((host, port)), what)
    print(f"spicetap proxy listening ({kind}) on {endpoint_text((host, port))}", flush=True)
