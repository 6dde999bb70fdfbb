"""remote-viewer (virt-viewer) under Xvfb renders through spicetap: over TLS on both legs
from a `spicetap vv` file with spicetap's CA inline, and through the CONNECT front."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from spicetap.archive.reader import ArchiveReader
from spicetap.archive.verify import verify
from spicetap.cli import main as spicetap_main
from spicetap.inputs import iter_records
from tests.conftest import peers
from tests.harness import QemuServer
from tests.harness.images import read_ppm
from tests.harness.screenshot import settled_screenshot
from tests.harness.xvfb import RemoteViewer, Rgb, Xvfb, wait_for_image
from tests.integration.proxy_process import ProxyProcess, run_spicetap, tls_both_legs

pytestmark = pytest.mark.peers


def _guest_screen(srv: QemuServer, out: Path) -> Rgb:
    width, height, rgb = read_ppm(settled_screenshot(srv.endpoint(), out))
    return np.frombuffer(rgb, np.uint8).reshape(height, width, 3)


def _spicetap(work: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_spicetap(work / "config", *args, timeout=60)


def test_remote_viewer_over_tls_on_both_legs_from_a_vv_file(tmp_path: Path) -> None:
    with (
        peers(),
        QemuServer(guest="none", plain=False, tls=True, password="s3cret") as srv,
        Xvfb() as xvfb,
    ):
        assert srv.tls_port is not None and srv.tls_material is not None
        guest = _guest_screen(srv, tmp_path / "direct.ppm")
        tlsm = srv.tls_material
        extra = tls_both_legs(srv.tls_port, tlsm.ca_file, tlsm.host_subject)
        work = tmp_path / "proxy"
        with ProxyProcess(0, tmp_path / "rec", work, extra) as proxy:
            vv = tmp_path / "session.vv"
            made = _spicetap(
                work, "vv", f"127.0.0.1:{proxy.port}", "--tls-only", "--password", "s3cret",
                "-o", str(vv),
            )
            assert made.returncode == 0, made.stderr
            text = vv.read_text()
            assert "ca=-----BEGIN CERTIFICATE-----\\n" in text and "secure-channels=all" in text
            assert vv.stat().st_mode & 0o077 == 0  # it holds a password
            with RemoteViewer(xvfb, [str(vv)], tmp_path / "rv.log") as viewer:
                wait_for_image(xvfb, guest, viewer)
    archives = proxy.archives()
    assert archives and all(verify(a).status == "intact" for a in archives)
    recs = [r for a in archives for r in iter_records(a, [])]
    opens = [r for r in recs if r.kind == "open"]
    assert {r.channel for r in opens} >= {"main", "display", "inputs", "cursor"}
    assert all((r.fields or {}).get("tls") == {"viewer": True, "server": True} for r in opens)
    assert any(r.channel == "display" and r.name == "draw_copy" for r in recs)
    assert not [r for r in recs if r.not_fully_dissected or r.kind == "tls"]
    for archive in archives:
        assert b"s3cret" not in archive.read_bytes()


def test_remote_viewer_by_target_name_through_the_connect_front(tmp_path: Path) -> None:
    """A gateway: the .vv file names the target and the CONNECT front (proxy=); the viewer
    never learns the server's address."""
    with peers(), QemuServer(guest="none") as srv, Xvfb() as xvfb:
        assert srv.port is not None
        guest = _guest_screen(srv, tmp_path / "direct.ppm")
        config = tmp_path / "gateway.toml"
        config.write_text(
            '[connect]\nlisten = "127.0.0.1:0"\n\n'
            f'[targets.vm1]\nupstream = "127.0.0.1:{srv.port}"\n'
        )
        work = tmp_path / "proxy"
        with ProxyProcess(0, tmp_path / "rec", work, ("--config", str(config))) as proxy:
            vv = tmp_path / "vm1.vv"
            front = f"http://127.0.0.1:{proxy.ports['connect']}"
            made = _spicetap(work, "vv", "vm1", "--config", str(config), "--proxy", front,
                             "-o", str(vv))
            assert made.returncode == 0, made.stderr
            assert "host=vm1\n" in vv.read_text() and f"proxy={front}\n" in vv.read_text()
            with RemoteViewer(xvfb, [str(vv)], tmp_path / "rv.log") as viewer:
                wait_for_image(xvfb, guest, viewer)
    archives = proxy.archives()
    assert archives and all(verify(a).status == "intact" for a in archives)
    recs = [r for a in archives for r in iter_records(a, [])]
    assert any(r.channel == "display" and r.name == "draw_copy" for r in recs)
    assert f"CONNECT vm1:{srv.port} (spice)" in proxy.log()


def test_remote_viewer_with_a_token_minted_into_its_vv_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A gateway that injects vm1's password: `spicetap vv --mint-token` asks the running
    proxy's API for a one-time token and writes it into the file; the viewer gets in with
    it, deletes the file, and the token is nowhere in the archives."""
    with peers(), QemuServer(guest="none", password="vm1-server-pw") as srv, Xvfb() as xvfb:
        assert srv.port is not None
        guest = _guest_screen(srv, tmp_path / "direct.ppm")
        server_pw = tmp_path / "vm1-password"
        server_pw.write_text("vm1-server-pw\n")
        api_token = tmp_path / "api-token"
        api_token.write_text("api-token-0123456789abcdef\n")
        config = tmp_path / "gateway.toml"
        config.write_text(
            f'[proxy]\nmanagement = "127.0.0.1:0"\nmanagement_token_file = "{api_token}"\n\n'
            '[connect]\nlisten = "127.0.0.1:0"\n\n'
            f'[targets.vm1]\nupstream = "127.0.0.1:{srv.port}"\nauth = "inject"\n'
            f'server_password_file = "{server_pw}"\n'
        )
        work = tmp_path / "proxy"
        with ProxyProcess(0, tmp_path / "rec", work, ("--config", str(config))) as proxy:
            vv = tmp_path / "vm1.vv"
            front = f"http://127.0.0.1:{proxy.ports['connect']}"
            api = f"127.0.0.1:{proxy.ports['management']}"
            made = _spicetap(work, "vv", "vm1", "--config", str(config), "--proxy", front,
                             "--mint-token", "--management", api, "--token-user", "dana",
                             "-o", str(vv))
            assert made.returncode == 0, made.stderr
            text = vv.read_text()
            assert "delete-this-file=1\n" in text and "password=" in text
            token = text.split("password=", 1)[1].split("\n", 1)[0]
            assert len(token) == 32
            with RemoteViewer(xvfb, [str(vv)], tmp_path / "rv.log") as viewer:
                wait_for_image(xvfb, guest, viewer)
                assert not vv.exists()  # the viewer deleted it, token and all
            # no main upstream here: the API says so, and what it has
            main = _spicetap(work, "vv", "127.0.0.1:5900", "--config", str(config),
                             "--mint-token", "--management", api)
            assert main.returncode == 2 and "404 no main upstream" in main.stderr
            assert "targets: vm1" in main.stderr and "password=" not in main.stdout
            wrong = tmp_path / "wrong-token"
            wrong.write_text("not-the-api-token-0123\n")
            refused = _spicetap(work, "vv", "vm1", "--config", str(config), "--proxy", front,
                                "--mint-token", "--management", api,
                                "--management-token-file", str(wrong))
            assert refused.returncode == 2 and "401 wrong bearer token" in refused.stderr
    assert "token minted for target 'vm1' (user dana)" in proxy.log()
    archives = proxy.archives()
    assert archives and all(verify(a).status == "intact" for a in archives)
    recs = [r for a in archives for r in iter_records(a, [])]
    auth = [r.fields or {} for r in recs if r.kind == "auth"]
    auth = [f for f in auth if f["by"] == "server"]
    assert auth and all(f["result"] == "OK" and f["credential"] == "token" for f in auth)
    assert all(f["user"] == "dana" for f in auth)  # whose the session was
    sessions = []
    for archive in archives:
        with ArchiveReader(archive) as reader:
            sessions.append(reader.header["session"])
    assert {s.get("user") for s in sessions if s["id"] is not None} == {"dana"}, sessions
    # an auditor finds dana's session among the recordings
    assert spicetap_main(["sessions", "--json", "--user", "dana", str(archives[0].parent)]) == 0
    (found,) = json.loads(capsys.readouterr().out)
    assert found["session"]["id"] is not None and found["end"]["status"] == "complete"
    for blob in [a.read_bytes() for a in archives] + [proxy.log().encode()]:
        assert token.encode() not in blob and b"vm1-server-pw" not in blob
