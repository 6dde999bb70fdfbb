"""`spicetap proxy` refuses what it cannot do in one line, naming it."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from spicetap.cli import main


@pytest.mark.parametrize("kind", ["plain", "connect", "management"])
def test_a_taken_port_is_a_one_line_error_naming_the_listener(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SPICETAP_CONFIG_DIR", str(tmp_path))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        option = {"plain": "--listen", "connect": "--connect-listen", "management": "--management"}
        argv = ["proxy", "--upstream", "127.0.0.1:1", "--allow", "127.0.0.1:1"]
        if kind != "plain":
            argv += ["--listen", "127.0.0.1:0"]
        if kind != "connect":
            argv += ["--connect-listen", "127.0.0.1:0"]
        assert main([*argv, option[kind], f"127.0.0.1:{port}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    expected = f"cannot listen ({kind}) on 127.0.0.1:{port}: Address already in use"
    assert err == f"spicetap: error: {expected}"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--listen", "127.0.0.1:0"], "--listen and --tls-listen need --upstream"),
        ([], "nothing to serve"),
        (["--connect-listen", "127.0.0.1:0"], "the CONNECT front allows nothing"),
        (["--upstream", "h:1", "--allow", "h:1"], "--allow needs --connect-listen"),
        (["--connect-listen", "x", "--allow", "h:1"], "--connect-listen 'x': expected HOST:PORT"),
        (["--connect-listen", "127.0.0.1:0", "--allow", "h"], "[connect] allow 'h'"),
    ],
)
def test_bad_fronts_are_one_line_errors(
    argv: list[str],
    message: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("SPICETAP_CONFIG_DIR", str(tmp_path))
    assert main(["proxy", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["proxy", "--max-backlog", "0"], "spicetap proxy: error: argument --max-backlog"),
        # nan would turn the link timeout off; -1 would end every channel at once
        (["proxy", "--link-timeout", "nan"], "spicetap proxy: error: argument --link-timeout"),
        (["proxy", "--link-timeout", "-1"], "spicetap proxy: error: argument --link-timeout"),
        (["proxy", "--idle-timeout", "0"], "spicetap proxy: error: argument --idle-timeout"),
        (["proxy", "--max-message", "-1"], "spicetap proxy: error: argument --max-message"),
        (["proxy", "--flush-interval", "inf"], "spicetap proxy: error: argument --flush-interval"),
        (["proxy", "--upstream", ""], "spicetap proxy: error: argument --upstream: expected a"),
        (["proxy", "--tls-listen", " "], "spicetap proxy: error: argument --tls-listen"),
        (["proxy", "--no-such-flag"], "spicetap: error: unrecognized arguments: --no-such-flag"),
        (["no-such-command"], "spicetap: error: argument command: invalid choice"),
        ([], "spicetap: error: the following arguments are required: command"),
    ],
)
def test_bad_flags_are_one_line_errors_too(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1, err
    assert err.rstrip().endswith("--help)")
