"""`spicetap vv`: the connection file remote-viewer reads."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from cryptography import x509

from spicetap.cli import main


def _vv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *args: str) -> dict[str, str]:
    monkeypatch.setenv("SPICETAP_CONFIG_DIR", str(tmp_path / "cfg"))
    out = tmp_path / "out.vv"
    assert main(["vv", *args, "-o", str(out)]) == 0
    lines = out.read_text().splitlines()
    assert lines[0] == "[virt-viewer]"
    return dict(line.split("=", 1) for line in lines[1:])


def test_tls_only_listener_carries_spicetaps_ca_inline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    vv = _vv(tmp_path, monkeypatch, "0.0.0.0:5901", "--tls-only", "--password", "pw")
    assert vv["type"] == "spice" and vv["host"] == "127.0.0.1" and vv["tls-port"] == "5901"
    assert "port" not in vv and vv["secure-channels"] == "all"
    assert vv["host-subject"] == "O=spicetap,CN=127.0.0.1"  # what the proxy issues by default
    ca = x509.load_pem_x509_certificate(vv["ca"].replace("\\n", "\n").encode())
    on_disk = (tmp_path / "cfg" / "ca-cert.pem").read_bytes()
    assert ca == x509.load_pem_x509_certificate(on_disk)  # the CA the proxy signs with
    assert vv["password"] == "pw"
    assert (tmp_path / "out.vv").stat().st_mode & 0o777 == 0o600


def test_a_listener_reached_through_a_proxy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    vv = _vv(tmp_path, monkeypatch, "10.1.2.3:5900", "--proxy", "http://127.0.0.1:3128")
    assert vv["proxy"] == "http://127.0.0.1:3128"


def test_plain_listener_needs_no_ca(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    vv = _vv(tmp_path, monkeypatch, "10.1.2.3:5900", "--title", "VM 1")
    assert vv == {"type": "spice", "host": "10.1.2.3", "port": "5900", "title": "VM 1"}


def test_named_target_with_its_own_listeners(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "c.toml"
    config.write_text(
        '[targets.vm1]\nupstream = "10.0.0.5:5900"\nlisten = "127.0.0.1:5910"\n'
        'tls_listen = "127.0.0.1:5911"\n'
    )
    vv = _vv(tmp_path, monkeypatch, "vm1", "--config", str(config))
    assert (vv["host"], vv["port"], vv["tls-port"]) == ("127.0.0.1", "5910", "5911")
    assert "secure-channels" not in vv and "proxy" not in vv


def test_named_target_through_the_connect_front(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "c.toml"
    config.write_text(
        '[connect]\nlisten = "0.0.0.0:3128"\n\n'
        '[targets.vm1]\nupstream = "10.0.0.5:5900"\nupstream_tls = "10.0.0.5:5901"\n'
    )
    vv = _vv(tmp_path, monkeypatch, "vm1", "--config", str(config))
    assert vv["host"] == "vm1" and vv["proxy"] == "http://127.0.0.1:3128"
    assert (vv["port"], vv["tls-port"]) == ("5900", "5901")
    assert vv["host-subject"] == "O=spicetap,CN=vm1"  # issued per CONNECTed host name


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["nosuch"], "'nosuch' is neither HOST:PORT nor a target name"),
        (["h:70000"], "TARGET 'h:70000': expected HOST:PORT"),
        (["h:1", "--tls-port", "0"], "--tls-port 0: expected 1-65535"),
        # a line break would add keys of its own to the file: host=elsewhere
        (["h:1", "--title", "x\nhost=evil"], "--title: has a line break or control character"),
        (["h:1", "--password", "pw\r"], "--password: has a line break or control character"),
        (["h:1", "--proxy", "bogus"], "--proxy 'bogus': expected http://HOST:PORT"),
        (["h:1", "--proxy", "http://h:70000"], "--proxy 'http://h:70000': expected http://"),
        (["h:1", "--proxy", "http://[::1"], "--proxy 'http://[::1': expected http://"),
        (["h:1", "--host-subject", "bogus"], "--host-subject: subject 'bogus': cannot read"),
        # the viewer would send it and spice-server refuse it
        (["h:1", "--password", "p" * 61], "--password: a SPICE password is at most 60 bytes"),
        (["[::1"], "TARGET '[::1': expected [IPv6]:PORT"),
        # --mint-token's options, checked before any request
        (["h:1", "--mint-token", "--password", "pw"], "--password and --mint-token: give one"),
        (["h:1", "--mint-token"], "--mint-token needs the API's address and token"),
        (["h:1", "--mint-token", "--management", "h:0", "--management-token-file", "F"],
         "port 0 is picked"),
        (["h:1", "--mint-token", "--management", "h:9", "--management-token-file", "/none/f"],
         "the API's token file /none/f: cannot read"),
        (["h:1", "--mint-token", "--token-ttl", "nan"], "--token-ttl nan: expected 0 < SECONDS"),
        (["h:1", "--mint-token", "--token-ttl", "0"], "--token-ttl 0: expected"),
        (["h:1", "--mint-token", "--token-user", ""], "--token-user: a user name is not empty"),
    ],
)  # fmt: skip
def test_bad_targets_are_one_line_errors(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    message: str,
) -> None:
    monkeypatch.setenv("SPICETAP_CONFIG_DIR", str(tmp_path / "cfg"))
    assert main(["vv", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_named_target_without_any_way_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[targets.vm1]\nupstream = "10.0.0.5:5900"\n')
    monkeypatch.setenv("SPICETAP_CONFIG_DIR", str(tmp_path / "cfg"))
    assert main(["vv", "vm1", "--config", str(config)]) == 2
    assert "no CONNECT front" in capsys.readouterr().err


def test_an_api_that_is_not_there_is_a_one_line_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SPICETAP_CONFIG_DIR", str(tmp_path / "cfg"))
    token = tmp_path / "api-token"
    token.write_text("api-token-0123456789abcdef\n")
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "out.vv"
    argv = ["vv", "127.0.0.1:5900", "--mint-token", "--management", f"127.0.0.1:{port}"]
    assert main([*argv, "--management-token-file", str(token), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"management API http://127.0.0.1:{port}: Connection refused" in err
    assert err.count("\n") == 1 and "api-token" not in err and not out.exists()


def test_the_config_says_which_certificate_a_tls_listener_shows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The subject the proxy's certificate carries, as its config file sets it: [proxy]
    tls_subject, a target's own; the operator's own certificate is checked by the viewer's
    trust store and host name, so the file names neither spicetap's CA nor a subject."""
    config = tmp_path / "c.toml"
    config.write_text(
        '[proxy]\ntls_subject = "O=Example,CN=gw"\n\n[connect]\nlisten = "127.0.0.1:3128"\n\n'
        '[targets.vm1]\nupstream = "10.0.0.5:5900"\ntls_listen = "127.0.0.1:5911"\n\n'
        '[targets.vm2]\nupstream = "10.0.0.6:5900"\ntls_listen = "127.0.0.1:5912"\n'
        'tls_subject = "C=XX,O=Example,CN=hv2"\n\n'
        '[targets.vm3]\nupstream = "10.0.0.7:5900"\ntls_listen = "127.0.0.1:5913"\n'
        'tls_cert = "/etc/gw/cert.pem"\ntls_key = "/etc/gw/key.pem"\n\n'
        '[targets.vm4]\nupstream_tls = "10.0.0.8:5901"\n'
    )
    subjects = {}
    for name in ("vm1", "vm2", "vm3", "vm4"):
        vv = _vv(tmp_path, monkeypatch, name, "--config", str(config))
        subjects[name] = (vv.get("host-subject"), "ca" in vv)
    assert subjects == {
        "vm1": ("O=Example,CN=gw", True),
        "vm2": ("C=XX,O=Example,CN=hv2", True),
        "vm3": (None, False),
        "vm4": ("O=Example,CN=gw", True),  # through the CONNECT front
    }
