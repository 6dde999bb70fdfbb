"""A live migration between two QEMUs keeps the viewer on spicetap: the migration messages
are rewritten to spicetap's own listeners, and spicetap follows the server to the new host."""

from __future__ import annotations

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
from tests.integration.proxy_process import ProxyProcess

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
        assert self.dst.port is not None
        self.src.qmp("client_migrate_info", protocol="spice", hostname="127.0.0.1",
                     port=self.dst.port)
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
    proxy_for: Callable[[int], tuple[int, tuple[str, ...]]],
    viewer_for: Callable[[ProxyProcess, int], SpiceEndpoint],
) -> Migrated:
    """Migrate a VM under a spice-gtk client that reaches it through spicetap: `proxy_for`
    (source port) gives ProxyProcess's upstream port and extra arguments, `viewer_for`
    (proxy, source port) where the client connects. Checks what every way of following
    must give: the client migrated, every channel the destination serves came from
    spicetap, and its display was recorded."""
    (incoming,) = reserve_ports(1)
    with (
        peers(),
        QemuServer(guest="boot", spice_options=SEAMLESS) as src,
        QemuServer(
            guest="boot",
            spice_options=SEAMLESS,
            extra_args=["-incoming", f"tcp:127.0.0.1:{incoming}"],
            wait_ready=False,
        ) as dst,
    ):
        assert src.port is not None and dst.port is not None
        upstream, extra = proxy_for(src.port)
        with ProxyProcess(upstream, tmp_path / "rec", tmp_path / "proxy", extra) as proxy:
            migration = Migration(src, dst, incoming, delay=3.0)
            migration.start()
            result = run_gi_client(
                viewer_for(proxy, src.port),
                ClientOptions(duration=14, min_duration=14, expect_display=True),
                tmp_path / "client",
            )
            migration.join(40)
    if migration.status != "completed":
        raise PeerFailed(f"QEMU's migration ended {migration.status!r}")
    assert result.returncode == 0, (result.summary, proxy.log()[-3000:])
    states = [state for _t, state in result.summary.get("migration", [])]
    assert states and states[0] == "migrating" and states[-1] == "none", states
    archives = proxy.archives()
    assert archives and all(verify(a).status == "intact" for a in archives)
    recs = [r for a in archives for r in iter_records(a, [])]
    opens = [r for r in recs if r.kind == "open"]
    to_dst = [r for r in opens if (r.fields or {}).get("server") == f"127.0.0.1:{dst.port}"]
    assert {r.channel for r in to_dst} >= {"main", "display", "inputs"}
    # every channel the destination serves comes from spicetap, none from the viewer
    vias = {str((r.fields or {}).get("via")) for r in to_dst}
    assert migration.dst_peers and migration.dst_peers <= vias, (migration.dst_peers, vias)
    # the display goes on from the destination, recorded
    dst_conns = {r.connection for r in to_dst}
    assert any(r.connection in dst_conns and r.name == "draw_copy" for r in recs)
    return Migrated(proxy, dst.port, recs)


def test_live_migration_keeps_the_viewer_on_spicetap(tmp_path: Path) -> None:
    done = migrate_through_spicetap(
        tmp_path,
        lambda src_port: (src_port, ()),
        lambda proxy, _src_port: SpiceEndpoint(port=proxy.port),
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

    def connect_front(src_port: int) -> tuple[int, tuple[str, ...]]:
        config.write_text(f'[connect]\nlisten = "127.0.0.1:0"\nallow = ["127.0.0.1:{src_port}"]\n')
        return 0, ("--config", str(config))

    def through_front(proxy: ProxyProcess, src_port: int) -> SpiceEndpoint:
        front = f"http://127.0.0.1:{proxy.ports['connect']}"
        return SpiceEndpoint(host="127.0.0.1", port=src_port, proxy=front)

    done = migrate_through_spicetap(tmp_path, connect_front, through_front)
    assert "admitted on the CONNECT front" in done.proxy.log()
    assert not [r for r in done.recs if r.kind == "rewrite"]  # passed on as the server sent it
