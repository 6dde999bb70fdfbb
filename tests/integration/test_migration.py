"""A live migration between two QEMUs keeps the viewer on spicetap: the migration messages
are rewritten to spicetap's own listeners, and spicetap follows the server to the new host."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from spicetap.archive.verify import verify
from spicetap.inputs import iter_records
from tests.conftest import peers
from tests.harness import ClientOptions, QemuServer, SpiceEndpoint, run_gi_client
from tests.harness.procs import PeerFailed, reserve_ports
from tests.harness.sasl import SaslAccount
from tests.integration.proxy_process import ProxyProcess, tls_both_legs

pytestmark = pytest.mark.peers

SEAMLESS = {"seamless-migration": "on"}


class Migration(threading.Thread):
    """After `delay`, migrate src to dst over QMP (as libvirt does) and wait until done;
    then note which addresses dst's spice-server sees its channels come from."""

    def __init__(self, src: QemuServer, dst: QemuServer, port: int, delay: float) -> None:
        super().__init__(daemon=True)
        self.src, self.dst, self.port, self.delay = src, dst, port, delay
        self.status = "not started"
        self.dst_peers: set[str] = set()

    def run(self) -> None:
        time.sleep(self.delay)
        where: dict[str, Any] = {"protocol": "spice", "hostname": "127.0.0.1"}
        if self.dst.port is not None:
            where["port"] = self.dst.port
        if self.dst.tls_port is not None and self.dst.tls_material is not None:
            where["tls-port"] = self.dst.tls_port
            where["cert-subject"] = self.dst.tls_material.host_subject
        self.src.qmp("client_migrate_info", **where)
        self.src.qmp("migrate", uri=f"tcp:127.0.0.1:{self.port}")
        for _ in range(150):  # bounded: 30 s
            self.status = str(self.src.qmp("query-migrate").get("status"))
            if self.status in ("completed", "failed"):
                break
            time.sleep(0.2)
        time.sleep(2)  # the viewer reconnects within a second of the switch
        channels: list[dict[str, Any]] = self.dst.qmp("query-spice").get("channels", [])
        self.dst_peers = {f"{c['host']}:{c['port']}" for c in channels}


@dataclass
class Migrated:
    proxy: ProxyProcess
    dst_port: int
    recs: list[Any]


def migrate_through_spicetap(
    tmp_path: Path,
    proxy_for: Callable[[QemuServer], tuple[int, tuple[str, ...]]],
    viewer_for: Callable[[ProxyProcess, QemuServer], SpiceEndpoint],
    tls: bool = False,
    check: bool = True,
    plain: bool = True,
    sasl: SaslAccount | None = None,
    spice_options: dict[str, str] = SEAMLESS,
    password: str | None = None,
) -> Migrated:
    """Migrate a VM under a spice-gtk client that reaches it through spicetap: `proxy_for`
    (source) gives ProxyProcess's upstream port and extra arguments, `viewer_for` (proxy,
    source) where the client connects. With `tls`, both QEMUs have a TLS port too, with
    certificates of one CA; with `plain` False, only that. With `sasl`, both ask viewers
    for that SASL account instead of no password; with `password`, both ask for that
    ticket. With `check`, what every way of
    following must give: the client migrated, every channel the destination serves came
    from spicetap, and its display was recorded."""
    (incoming,) = reserve_ports(1)
    with contextlib.ExitStack() as stack:
        stack.enter_context(peers())
        src = stack.enter_context(
            QemuServer(
                guest="boot",
                spice_options=spice_options,
                plain=plain,
                tls=tls,
                sasl=sasl,
                password=password,
            )
        )
        dst_server = QemuServer(
            guest="boot",
            spice_options=spice_options,
            extra_args=["-incoming", f"tcp:127.0.0.1:{incoming}"],
            wait_ready=False,
            plain=plain,
            tls=tls,
            sasl=sasl,
            password=password,
        )
        dst_server.tls_material = src.tls_material  # one CA, as for hosts of one cluster
        dst = stack.enter_context(dst_server)
        upstream, extra = proxy_for(src)
        with ProxyProcess(upstream, tmp_path / "rec", tmp_path / "proxy", extra) as proxy:
            migration = Migration(src, dst, incoming, delay=3.0)
            migration.start()
            result = run_gi_client(
                viewer_for(proxy, src),
                ClientOptions(duration=14, min_duration=14, expect_display=True),
                tmp_path / "client",
            )
            migration.join(40)
    if migration.status != "completed":
        raise PeerFailed(f"QEMU's migration ended {migration.status!r}")
    archives = proxy.archives()
    assert archives and all(verify(a).status == "intact" for a in archives)
    recs = [r for a in archives for r in iter_records(a, [])]
    dst_port = dst.port if plain else dst.tls_port
    assert dst_port is not None
    if not check:
        return Migrated(proxy, dst_port, recs)
    assert result.returncode == 0, (result.summary, proxy.log()[-3000:])
    states = [state for _t, state in result.summary.get("migration", [])]
    assert states and states[0] == "migrating" and states[-1] == "none", (
        states,
        proxy.log()[-3000:],
    )
    opens = [r for r in recs if r.kind == "open"]
    dst_ends = {f"127.0.0.1:{p}" for p in (dst.port, dst.tls_port) if p is not None}
    to_dst = [r for r in opens if (r.fields or {}).get("server") in dst_ends]
    assert {r.channel for r in to_dst} >= {"main", "display", "inputs"}
    # every channel the destination serves comes from spicetap, none from the viewer
    vias = {str((r.fields or {}).get("via")) for r in to_dst}
    assert migration.dst_peers and migration.dst_peers <= vias, (migration.dst_peers, vias)
    # the display goes on from the destination, recorded
    dst_conns = {r.connection for r in to_dst}
    assert any(r.connection in dst_conns and r.name == "draw_copy" for r in recs)
    return Migrated(proxy, dst_port, recs)


def test_live_migration_keeps_the_viewer_on_spicetap(tmp_path: Path) -> None:
    done = migrate_through_spicetap(
        tmp_path,
        lambda src: (src.port or 0, ()),
        lambda proxy, _src: SpiceEndpoint(port=proxy.port),
    )
    assert f"following a migration to 127.0.0.1 (port {done.dst_port}" in done.proxy.log()
    rewrites = [r for r in done.recs if r.kind == "rewrite"]
    assert {r.name for r in rewrites} >= {"migrate_begin_seamless"}
    assert all((r.fields or {})["from"]["port"] == done.dst_port for r in rewrites)


def test_viewer_behind_the_connect_front_follows_a_migration_through_it(tmp_path: Path) -> None:
    """A viewer set up with spicetap as its CONNECT proxy: the migration message passes
    unchanged, the destination (not in the allow-list) is admitted, and the viewer's
    channels to it come back through the CONNECT front, recorded."""
    config = tmp_path / "gateway.toml"

    def connect_front(src: QemuServer) -> tuple[int, tuple[str, ...]]:
        config.write_text(f'[connect]\nlisten = "127.0.0.1:0"\nallow = ["127.0.0.1:{src.port}"]\n')
        return 0, ("--config", str(config))

    def through_front(proxy: ProxyProcess, src: QemuServer) -> SpiceEndpoint:
        front = f"http://127.0.0.1:{proxy.ports['connect']}"
        return SpiceEndpoint(host="127.0.0.1", port=src.port, proxy=front)

    done = migrate_through_spicetap(tmp_path, connect_front, through_front)
    assert "admitted on the CONNECT front" in done.proxy.log()
    assert not [r for r in done.recs if r.kind == "rewrite"]  # passed on as the server sent it


def test_a_session_opened_with_a_one_time_token_survives_its_migration(tmp_path: Path) -> None:
    """Inject mode: the viewer's one-time token opened the session; after the migration its
    channels link again at spicetap's listener for the destination, main channel included,
    with the same token, and spicetap logs them in with the server password."""
    server_pw, tokens, config = (tmp_path / n for n in ("server-pw", "tokens", "spicetap.toml"))
    server_pw.write_text("migrating-server-pw\n")
    tokens.write_text("one-time-tok-7c1e\n")
    config.write_text(
        f'[proxy]\nauth = "inject"\nserver_password_file = "{server_pw}"\n'
        f'viewer_tokens_file = "{tokens}"\n'
    )
    done = migrate_through_spicetap(
        tmp_path,
        lambda src: (src.port or 0, ("--config", str(config))),
        lambda proxy, _src: SpiceEndpoint(port=proxy.port, password="one-time-tok-7c1e"),
        password="migrating-server-pw",
    )
    auth = [r.fields for r in done.recs if r.kind == "auth"]
    assert auth and all(f["result"] == "OK" and f["credential"] == "token" for f in auth)
    for archive in done.proxy.archives():
        blob = archive.read_bytes()
        assert b"one-time-tok-7c1e" not in blob and b"migrating-server-pw" not in blob


SUBJECT = "C=XX,O=spicetap-test,CN=127.0.0.1"  # spicetap's certificate for the viewer


def _tls_proxy(src: QemuServer) -> tuple[int, tuple[str, ...]]:
    assert src.tls_port is not None and src.tls_material is not None
    tlsm = src.tls_material
    legs = tls_both_legs(src.tls_port, tlsm.ca_file, tlsm.host_subject)
    return 0, (*legs, "--tls-subject", SUBJECT)


def _tls_viewer(tmp_path: Path) -> Callable[[ProxyProcess, QemuServer], SpiceEndpoint]:
    def viewer(proxy: ProxyProcess, _src: QemuServer) -> SpiceEndpoint:
        ca = tmp_path / "proxy" / "config" / "ca-cert.pem"
        return SpiceEndpoint(tls_port=proxy.port, ca_file=ca, host_subject=SUBJECT)

    return viewer


def test_live_migration_behind_a_tls_front_keeps_the_viewer_on_spicetap(tmp_path: Path) -> None:
    """QEMUs with a plain and a TLS port, the viewer on spicetap's TLS front: the migration
    message names both of the destination's ports and its subject; spicetap offers the
    viewer both of its own (its own subject on the TLS one) and follows the server, the TLS
    leg verified against the same CA."""
    done = migrate_through_spicetap(tmp_path, _tls_proxy, _tls_viewer(tmp_path), tls=True)
    rewrites = [(r.fields or {})["to"] for r in done.recs if r.kind == "rewrite"]
    assert rewrites and all(
        t["port"] and t["tls_port"] and t["cert_subject"] == SUBJECT for t in rewrites
    ), rewrites


def test_a_sasl_session_over_tls_is_followed_through_its_migration(tmp_path: Path) -> None:
    """QEMUs that ask for SASL and TLS on every channel (tls-channel=default), with plain
    and TLS ports, the viewer on spicetap's TLS front. Over TLS spice-server adds no SASL
    security layer, so the main channel is clear after SASL's exchange: spicetap reads
    its migration message and rewrites it; the viewer, refused on the plain port it tries
    first, authenticates to the destination over TLS through spicetap, and the channels
    from there are dissected too."""
    account = SaslAccount("migrant", "sasl-pw-77d1e0")

    def viewer(proxy: ProxyProcess, src: QemuServer) -> SpiceEndpoint:
        ca = tmp_path / "proxy" / "config" / "ca-cert.pem"
        return SpiceEndpoint(
            tls_port=proxy.port,
            ca_file=ca,
            host_subject=SUBJECT,
            username=account.username,
            password=account.password,
        )

    options = {**SEAMLESS, "tls-channel": "default"}
    done = migrate_through_spicetap(
        tmp_path, _tls_proxy, viewer, tls=True, sasl=account, spice_options=options
    )
    rewrites = [r for r in done.recs if r.kind == "rewrite"]
    assert rewrites, "the migration message was not rewritten"
    linked = {r.connection for r in done.recs if r.kind == "link" and r.name == "link_result"}
    opens = [r for r in done.recs if r.kind == "open" and r.connection in linked]
    assert opens and all((r.fields or {})["tls"] == {"viewer": True, "server": True}
                         for r in opens)  # fmt: skip
    auths = [(r.fields or {}) for r in done.recs if r.kind == "auth" and r.connection in linked]
    assert auths and all(a.get("may_be_encrypted") is False for a in auths), auths
    archived = "\n".join(str(r.fields) for r in done.recs)
    assert account.password not in archived and account.username not in archived


def test_a_tls_only_destination_is_offered_to_the_viewer_over_tls_only(tmp_path: Path) -> None:
    """QEMUs with a TLS port alone. QEMU then sends port -1 (65535 on the wire), which
    spice-gtk takes for a plain port, and its channels fail to reach the destination: the
    same happens without spicetap. spicetap must not make it "work" with a plain port of
    its own, which would carry the viewer's channels in clear where the server allows TLS
    alone; and following such a migration must not stop the proxy."""
    done = migrate_through_spicetap(
        tmp_path, _tls_proxy, _tls_viewer(tmp_path), tls=True, plain=False, check=False
    )
    rewrites = [(r.fields or {})["to"] for r in done.recs if r.kind == "rewrite"]
    assert rewrites and all(t["port"] is None and t["tls_port"] for t in rewrites), rewrites
    opens = [r.fields or {} for r in done.recs if r.kind == "open"]
    assert opens and all(f.get("tls") == {"viewer": True, "server": True} for f in opens)
    assert "following a migration" in done.proxy.log()
    assert "Traceback" not in done.proxy.log()
