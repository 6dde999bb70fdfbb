"""Which listeners serve the main upstream: the flags and the config file agree."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.fronts import Fronts, build_fronts, speaks
from spicetap.cli import build_parser
from spicetap.config import load_config
from spicetap.errors import UserError
from tests.harness import make_tls_material


def _listeners(tmp_path: Path, flags: list[str], proxy_section: str) -> list[str]:
    """What the fronts built from FLAGS and a file's [proxy] section listen on."""
    path = tmp_path / "gateway.toml"
    path.write_text("[proxy]\n" + proxy_section)
    args = build_parser().parse_args(["proxy", "--config", str(path), *flags])
    fronts = build_fronts(args, load_config(path), None, False)
    routes = fronts.fronts()
    return [f"{speaks(r)} {r.listen[0]}:{r.listen[1]}" for r in routes]


UPSTREAM = 'upstream = "127.0.0.1:5930"\n'


@pytest.mark.parametrize(
    ("flags", "section", "expected"),
    [
        ([], UPSTREAM, ["plain 127.0.0.1:5900"]),  # the documented default
        ([], UPSTREAM + 'listen = "127.0.0.2:6000"\n', ["plain 127.0.0.2:6000"]),
        # the WebSocket front alone, asked for in the file as with the flag: no port 5900
        ([], UPSTREAM + 'ws_listen = "127.0.0.1:5959"\n', ["websocket 127.0.0.1:5959"]),
        (["--ws-listen", "127.0.0.1:5959"], UPSTREAM, ["websocket 127.0.0.1:5959"]),
        (
            [],
            UPSTREAM + 'listen = "127.0.0.1:5900"\nws_listen = "127.0.0.1:5959"\n',
            ["plain 127.0.0.1:5900", "websocket 127.0.0.1:5959"],
        ),
        (
            ["--listen", "127.0.0.1:5901"],
            UPSTREAM + 'ws_listen = "127.0.0.1:5959"\n',
            ["plain 127.0.0.1:5901", "websocket 127.0.0.1:5959"],
        ),
        # a plain listen the file names is served beside --tls-listen (it was dropped)
        (
            ["--tls-listen", "127.0.0.1:5961", "--upstream-tls", "127.0.0.1:5931"],
            UPSTREAM + 'listen = "127.0.0.1:5900"\n',
            ["plain 127.0.0.1:5900", "tls 127.0.0.1:5961"],
        ),
    ],
)
def test_the_main_upstream_is_served_where_asked_and_nowhere_else(
    flags: list[str],
    section: str,
    expected: list[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SPICETAP_CONFIG_DIR", str(tmp_path / "ca"))
    assert _listeners(tmp_path, flags, section) == expected


def _fronts(tmp_path: Path, flags: list[str], text: str) -> Fronts:
    path = tmp_path / "gateway.toml"
    path.write_text(text)
    args = build_parser().parse_args(["proxy", "--config", str(path), *flags])
    return build_fronts(args, load_config(path), None, False)


def test_the_file_says_what_tls_fronts_present(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A gateway run from its file alone (the systemd unit) chooses its certificates
    there: [proxy]'s for every TLS front, a target's own for its tls_listen."""
    monkeypatch.setenv("SPICETAP_CONFIG_DIR", str(tmp_path / "ca"))
    material = make_tls_material(tmp_path / "pki").x509_dir
    files = (
        f'tls_cert = "{material / "server-cert.pem"}"\n'
        f'tls_key = "{material / "server-key.pem"}"\n'
    )
    text = (
        f"[proxy]\n{UPSTREAM}{files}"
        'ws_listen = "127.0.0.1:5959"\nws_tls = true\n\n'
        '[targets.vm1]\nupstream = "127.0.0.1:5931"\ntls_listen = "127.0.0.1:5961"\n\n'
        '[targets.vm2]\nupstream = "127.0.0.1:5932"\ntls_listen = "127.0.0.1:5962"\n'
        'tls_subject = "C=XX,O=Example,CN=vm2"\n'
    )
    shown = {
        f"{speaks(r)} {r.listen[1]}": (r.viewer_tls.subject, r.subject)
        for r in _fronts(tmp_path, [], text).fronts()
        if r.viewer_tls is not None
    }
    ours = ("C=XX,O=spicetap-test,CN=127.0.0.1", None)  # checked by host name: no subject
    assert shown == {
        "websocket 5959": ours,
        "tls 5961": ours,
        "tls 5962": ("C=XX,O=Example,CN=vm2", "C=XX,O=Example,CN=vm2"),
    }
    # the flags win over the file
    flags = ["--tls-subject", "O=Flagged,CN=gw"]
    text_without_files = text.replace(files, "")
    fronts = _fronts(tmp_path, flags, text_without_files)
    subjects = {r.listen[1]: r.subject for r in fronts.fronts() if r.viewer_tls is not None}
    flagged = "O=Flagged,CN=gw"
    assert subjects == {5959: flagged, 5961: flagged, 5962: "C=XX,O=Example,CN=vm2"}


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ('tls_cert = "/x/cert.pem"\n', "[proxy] tls_cert and {path}: [proxy] tls_key go together"),
        (
            'tls_cert = "/x/c.pem"\ntls_key = "/x/k.pem"\ntls_subject = "CN=a"\n',
            "[proxy] tls_subject names certificates spicetap issues, not {path}: [proxy] tls_cert",
        ),
        ('tls_subject = "CN"\n', "[proxy] tls_subject: subject 'CN': cannot read 'CN'"),
        ('ws_tls = true\n', "[proxy] ws_tls needs --ws-listen (or [proxy] ws_listen)"),
        (
            'tls_cert = "/nonexistent/c.pem"\ntls_key = "/nonexistent/k.pem"\n'
            '\n[targets.vm1]\nupstream = "127.0.0.1:5931"\ntls_listen = "127.0.0.1:5961"\n',
            "certificate /nonexistent/c.pem / key /nonexistent/k.pem: No such file or directory",
        ),
    ],
)
def test_unusable_certificate_settings_are_named_where_the_file_has_them(
    section: str, message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SPICETAP_CONFIG_DIR", str(tmp_path / "ca"))
    with pytest.raises(UserError) as failed:
        _fronts(tmp_path, [], f"[proxy]\n{UPSTREAM}{section}")
    assert message.format(path=tmp_path / "gateway.toml") in str(failed.value)


def test_the_lockout_comes_from_the_flags_over_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SPICETAP_CONFIG_DIR", str(tmp_path / "ca"))
    text = "[proxy]\n" + UPSTREAM + "lockout_failures = 0\nlockout_window = 60\n"
    fronts = _fronts(tmp_path, [], "[proxy]\n" + UPSTREAM)
    assert (fronts.lockout.failures, fronts.lockout.window, fronts.lockout.duration) == (
        10, 300.0, 300.0,
    )  # fmt: skip
    fronts = _fronts(tmp_path, [], text)
    assert not fronts.lockout.active and fronts.lockout.window == 60
    fronts = _fronts(tmp_path, ["--lockout-failures", "4", "--lockout-seconds", "9"], text)
    assert (fronts.lockout.failures, fronts.lockout.window, fronts.lockout.duration) == (
        4, 60.0, 9.0,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("flags", "privacy", "expected"),
    [
        ([], "", False),  # the default: SASL's exchange is a secret, its user name too
        (["--sasl-user"], "", True),
        ([], "[recording.privacy]\nsasl_user = true\n", True),
        ([], "[recording.privacy]\nsasl_user = false\n", False),
    ],
)
def test_sasl_user_names_are_read_only_when_asked(
    flags: list[str], privacy: str, expected: bool, tmp_path: Path
) -> None:
    fronts = _fronts(tmp_path, flags, f"[proxy]\n{UPSTREAM}{privacy}")
    assert fronts.sasl_user is expected
