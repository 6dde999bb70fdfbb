"""Certificates kept current while the proxy runs, reload or not.

A gateway may run for years without a reload; what spicetap's CA issued for a TLS listener
(valid 825 days) would then expire under it. Twice a day each TLS listener's certificate,
and the management API's over HTTPS, is looked at: an issued one within REISSUE_BEFORE of
its end is issued again and shown from then on; the operator's own, near its end or past
it, is said in the log (renewing it is the operator's: their file, then a reload).
"""

from __future__ import annotations

import datetime
import logging
from dataclasses import replace

import trio

from proxy.fronts import Fronts, Route, route_key
from proxy.io.reloading import Reloader, RouteKey
from proxy.tls import load_or_create_ca
from proxy.viewer_certs import (
    REISSUE_BEFORE,
    CertificateChoice,
    ViewerCertificate,
    ViewerCertificates,
    issued_folder,
    say_problem,
)

log = logging.getLogger("spicetap.proxy")

CHECK_INTERVAL = 12 * 3600.0  # seconds


async def keep_certificates_current(reloader: Reloader, interval: float = CHECK_INTERVAL) -> None:
    while True:
        await trio.sleep(interval)
        try:
            await renew_certificates(reloader)
        except Exception:  # e.g. the CA unreadable: said, tried again next time
            log.exception("certificates: could not look at the TLS listeners' certificates")


async def renew_certificates(reloader: Reloader, now: datetime.datetime | None = None) -> list[str]:
    """Issue again what nears its end, warn of the rest; returns the listeners ("KIND
    HOST:PORT", or "management API") that show a new certificate."""
    async with reloader.lock:  # not while a reload builds its own
        now = now or datetime.datetime.now(datetime.UTC)
        listeners = reloader.listeners
        shown: dict[RouteKey | None, ViewerCertificate] = {  # None: the management API's
            key: running.route.viewer_tls
            for key, running in listeners.running.items()
            if running.route.viewer_tls is not None
        }
        if reloader.fronts.management_tls is not None:
            shown[None] = reloader.fronts.management_tls
        due: dict[RouteKey | None, ViewerCertificate] = {}
        for key, cert in shown.items():
            if cert.issued_for is not None and cert.not_after - now <= REISSUE_BEFORE:
                due[key] = cert
            else:
                say_problem(cert, now)
        if not due:
            return []
        made = ViewerCertificates(load_or_create_ca, issued_folder(), listeners.keylog, now=now)
        # the management API's TLS keys are never logged: its requests carry its token
        unlogged = ViewerCertificates(load_or_create_ca, issued_folder(), None, now=now)

        def issue() -> dict[RouteKey | None, ViewerCertificate]:
            return {
                key: (made if key is not None else unlogged).present(
                    CertificateChoice(subject=cert.subject), cert.issued_for[0]
                )
                for key, cert in due.items()
                if cert.issued_for is not None
            }

        fresh = await trio.to_thread.run_sync(issue)
        renewed = []
        for key, cert in fresh.items():  # the listeners are as they were: the lock holds
            if key is None:
                where = "management API"
            else:
                running = listeners.running[key]
                listeners.repoint(key, replace(running.route, viewer_tls=cert))
                where = running.where()
            renewed.append(where)
            log.info(
                "certificates: %s shows a new certificate (the one spicetap's CA issued "
                "ends within %d days): %s",
                where, REISSUE_BEFORE.days, cert.describe(),
            )  # fmt: skip
        # the management API takes it from here, and the next reload keeps these instead of
        # issuing them again
        reloader.fronts = _with_certificates(reloader.fronts, fresh)
        return renewed


def _with_certificates(fronts: Fronts, fresh: dict[RouteKey | None, ViewerCertificate]) -> Fronts:
    def updated(route: Route) -> Route:
        cert = fresh.get(route_key(route))
        return route if cert is None else replace(route, viewer_tls=cert)

    websocket = updated(fronts.websocket) if fronts.websocket is not None else None
    return replace(
        fronts,
        routes=[updated(r) for r in fronts.routes],
        websocket=websocket,
        management_tls=fresh.get(None, fronts.management_tls),
    )
