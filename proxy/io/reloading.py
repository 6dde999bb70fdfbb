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
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import trio

from proxy.core.reload import TargetChanges, plan, restart_needed, target_changes
from proxy.fronts import Fronts, Route, carry_credentials, route_key, speaks
from proxy.io.migration import MigrationListeners
from proxy.io.server import ChannelProxy, Routing, Serving, serve_tcp
from proxy.io.tokens import TokenDesk
from spicetap.config import Config, ConfigError, load_config
from spicetap.errors import UserError

log = logging.getLogger("spicetap.proxy")

RouteKey = tuple[str, str, int, str]
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
        return f"{listener_kind(self.route)} {self.bound[0]}:{self.bound[1]}"


def listener_kind(route: Route) -> str:
    """How log lines and the "listening" lines name a reverse listener: plain or tls, and
    the target's name."""
    kind = speaks(route)
    return kind if route.upstream.target is None else f"{kind}:{route.upstream.target}"


class RouteListeners:
    """The reverse listeners that run now, by route_key: opened at start and by reloads,
    stopped and re-pointed by reloads."""

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

    def _migration(self, route: Route) -> MigrationListeners | None:
        if not self.follow_migration or route.target is None:
            return None
        return MigrationListeners(
            self.proxy,
            self.nursery,
            ca=route.target.ca,
            insecure=route.target.insecure,
            keylog=self.keylog,
            viewer_tls=route.viewer_tls,
            tls_subject=route.subject,
        )

    async def open(self, route: Route) -> Serving:
        """OSError when the address cannot be listened on."""
        routing = Routing(route.upstream, self._migration(route))
        serving: Serving = await self.nursery.start(
            serve_tcp, self.proxy, routing, *route.listen, route.viewer_tls
        )
        host, port = serving.listeners[0].socket.getsockname()[:2]
        self.running[route_key(route)] = _Running(route, routing, serving, (host, port))
        return serving

    def stop(self, key: RouteKey) -> _Running:
        running = self.running.pop(key)
        running.serving.stop()
        return running

    def repoint(self, key: RouteKey, route: Route) -> Route:
        """New viewers on this listener go where `route` says; returns the route before.
        The listener keeps its TLS context (from flags, which a reload does not change),
        and its migration listeners while the target's TLS checks stay the same."""
        running = self.running[key]
        before = running.route
        route = replace(route, viewer_tls=before.viewer_tls, subject=before.subject)
        routing = running.routing
        if _checks(before) != _checks(route) or routing.migration is None:
            routing.migration = self._migration(route)
        if _destination(before) != _destination(route):
            # sessions begun there keep it for the channels they open later
            routing.retired = self.proxy.in_use([before.upstream, *routing.retired])
        routing.upstream = route.upstream
        running.route = route
        return before


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
        listeners: RouteListeners,
        tokens: TokenDesk,
        websocket: Routing | None = None,
    ) -> None:
        self.config_path = config_path
        self.started_with = config  # what restart-only keys are compared with
        self.config = config
        self.fronts = fronts
        self.rebuild = rebuild
        self.listeners = listeners
        self.tokens = tokens
        self.websocket = websocket
        self._lock = trio.Lock()

    @property
    def reloadable(self) -> bool:
        return self.config_path is not None and self.rebuild is not None

    async def reload(self) -> ReloadReport:
        """ReloadFailed (nothing changed) when the file cannot be read or served."""
        path, rebuild = self.config_path, self.rebuild
        if path is None or rebuild is None:
            raise ReloadFailed("no --config file to re-read")
        async with self._lock:
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
        proxy = self.listeners.proxy
        proxy.link_policy = fronts.link_policy
        # for channels from now on (a relay keeps the limits it began with)
        proxy.limits = replace(fronts.limits, max_message=proxy.limits.max_message)
        if old.connect is not None and fronts.connect is not None:
            old.connect[1].router.reconfigure(fronts.connect[1].router)
        self.tokens.reconfigure(fronts.scopes, fronts.link_policy)
        if self.websocket is not None and fronts.websocket is not None:
            self.websocket.upstream = fronts.websocket.upstream
            self.websocket.origins = fronts.websocket.origins
        targets = target_changes(self.config.targets, config.targets)
        for name in targets.added:
            log.info("reload: target %s added", name)
        for name in targets.removed:
            log.info("reload: target %s removed (its open channels carry on)", name)
        for name in targets.changed:
            log.info("reload: target %s changed (for new connections)", name)
        wanted = {route_key(route): route for route in fronts.routes}
        steps = plan(self.listeners.running, wanted)
        stopped, repointed, opened, failed = [], [], [], []
        for key in steps.stop:
            where = self.listeners.stop(key).where()
            stopped.append(where)
            log.info("reload: stopped listening (%s); its open channels carry on", where)
        for key in steps.keep:
            route = wanted[key]
            before = self.listeners.repoint(key, route)
            # re-pointed: it forwards elsewhere (other settings of a target show as changed)
            if _destination(before) != _destination(route):
                where = self.listeners.running[key].where()
                repointed.append(f"{where} -> {route.upstream.label}")
                log.info("reload: %s now forwards to %s", where, route.upstream.label)
        self.fronts, self.config = fronts, config
        for key in steps.open:
            route = wanted[key]
            kind = listener_kind(route)
            try:
                serving = await self.listeners.open(route)
            except OSError as exc:
                why = exc.strerror or str(exc)
                failed.append(f"{kind} {route.listen[0]}:{route.listen[1]}: {why}")
                log.error("reload: cannot listen (%s) on %s:%d: %s", kind, *route.listen, why)
                continue
            opened.append(self.listeners.running[key].where())
            announce(kind, serving.listeners, f"forwarding to {route.upstream.label}")
        later = restart_needed(self.started_with, config)
        if later:
            log.warning(
                "reload: changed in the file, applied at the next start only: %s",
                ", ".join(later),
            )
        report = ReloadReport(targets, opened, stopped, repointed, failed, later)
        log.info("config reloaded from %s: %s", self.config_path, report.summary())
        return report

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


def announce(kind: str, listeners: list[trio.SocketListener], what: str) -> None:
    """One log line, and one stdout line scripts and tests read: the bound port (port 0 in
    --listen lets the system pick one). "spicetap proxy ready" follows the last of them."""
    host, port = listeners[0].socket.getsockname()[:2]
    log.info("listening (%s) on %s:%d, %s", kind, host, port, what)
    print(f"spicetap proxy listening ({kind}) on {host}:{port}", flush=True)
