"""`spicetap proxy` refuses what it cannot do in one line, naming it."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from spicetap.cli import main
from tests.harness import make_tls_material


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
    out, err = capsys.readouterr()
    expected = f"cannot listen ({kind}) on 127.0.0.1:{port}: Address already in use"
    assert err.strip().splitlines()[-1] == f"spicetap: error: {expected}"
    assert "listening" not in out  # no listener is said to serve when the proxy does not


def test_a_taken_ipv6_port_is_named_in_brackets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    monkeypatch.setenv("SPICETAP_CONFIG_DIR", str(tmp_path))
    with socket.socket(socket.AF_INET6) as taken:
        taken.bind(("::1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["proxy", "--upstream", "127.0.0.1:1", "--listen", f"[::1]:{port}"]) == 2
    expected = f"cannot listen (plain) on [::1]:{port}: Address already in use"
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"spicetap: error: {expected}"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--listen", "127.0.0.1:0"], "--listen and --tls-listen need --upstream"),
        ([], "nothing to serve"),
        (["--connect-listen", "127.0.0.1:0"], "the CONNECT front allows nothing"),
        (["--upstream", "h:1", "--allow", "h:1"], "--allow needs --connect-listen"),
        (["--connect-listen", "x", "--allow", "h:1"], "--connect-listen 'x': expected HOST:PORT"),
        (["--connect-listen", "127.0.0.1:0", "--allow", "h"], "--allow 'h': expected HOST:PORT"),
        (
            ["--upstream", "h:1", "--upstream-insecure", "--upstream-ca", "ca.pem"],
            "--upstream-insecure turns off the check --upstream-ca asks for",
        ),
        (
            ["--upstream", "h:1", "--upstream-host-subject", "bogus"],
            "--upstream-host-subject: subject 'bogus': cannot read 'bogus'",
        ),
        (
            ["--upstream", "h:1", "--ws-listen", "127.0.0.1:0", "--ws-origin", "example.org"],
            "--ws-origin 'example.org': expected * or SCHEME://HOST[:PORT]",
        ),
        (["--upstream", "h:1", "--record", "/dev/null"], "--record /dev/null: not a directory"),
        (  # read at start-up: else the first viewer to reach an address finds it missing
            ["--connect-listen", "127.0.0.1:0", "--allow", "h:1", "--upstream-ca", "no.pem"],
            "upstream CA no.pem: [Errno 2] No such file or directory",
        ),
        (["--upstream", "h:1", "--keylog", "/"], "--keylog /: Is a directory"),
        (["--upstream", "h:1", "--ws-origin", "http://x"], "--ws-origin needs --ws-listen"),
        (
            ["--upstream", "h:1", "--ws-listen", "127.0.0.1:0", "--ws-origin", "http://x:99999"],
            "--ws-origin 'http://x:99999': expected * or SCHEME://HOST[:PORT]",
        ),
        (["--connect-listen", "127.0.0.1:0", "--allow", "h:5900-"], "--allow 'h:5900-': port"),
        (["--connect-listen", "127.0.0.1:0", "--allow", "h:٥٩٠٠"], "--allow 'h:٥٩٠٠': port"),
        # isdigit() takes "²", which int() refuses; brackets must close and hold an IPv6
        (
            ["--listen", "127.0.0.1:²", "--upstream", "127.0.0.1:1"],
            "--listen '127.0.0.1:²': expected HOST:PORT",
        ),
        (["--upstream", "[::1"], "--upstream '[::1': expected [IPv6]:PORT"),
        (["--upstream", "::5900"], "an IPv6 address goes in brackets, as [::1]:5900"),
        (
            ["--upstream", "127.0.0.1:1", "--management", "[]:5999"],
            "--management '[]:5999': expected [IPv6]:PORT",
        ),
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
        (["proxy", "--max-connections", "0"], "spicetap proxy: error: argument --max-connecti"),
        (["proxy", "--lockout-failures", "-1"], "spicetap proxy: error: argument --lockout-fail"),
        (["proxy", "--lockout-window", "0"], "spicetap proxy: error: argument --lockout-window"),
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


def _pem_pair(folder: Path, passphrase: bytes | None = None) -> tuple[Path, Path]:
    """The harness's server certificate and key, the key protected when a passphrase is
    given."""
    from cryptography.hazmat.primitives import serialization

    material = make_tls_material(folder / "tls")
    cert, key = material.x509_dir / "server-cert.pem", material.x509_dir / "server-key.pem"
    if passphrase:
        loaded = serialization.load_pem_private_key(key.read_bytes(), password=None)
        key.write_bytes(
            loaded.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(passphrase),
            )
        )
    return cert, key


@pytest.mark.parametrize(
    ("case", "message"),
    [
        # OpenSSL would prompt for the passphrase on the terminal and wait there
        ("protected key", "is protected by a passphrase: give an unprotected key"),
        ("swapped", "not a PEM certificate chain and its private key"),
        ("subject too", "--tls-subject names certificates spicetap issues, not --tls-cert"),
        ("bad subject", "'C=TOOLONG': Attribute's length must be >= 2 and <= 2"),
        ("damaged CA", "not a PEM certificate and key; move them away"),
    ],
)
def test_unusable_tls_material_is_a_one_line_error(
    case: str,
    message: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("SPICETAP_CONFIG_DIR", str(tmp_path))
    cert, key = _pem_pair(tmp_path, b"secret" if case == "protected key" else None)
    argv = ["proxy", "--upstream", "127.0.0.1:1", "--tls-listen", "127.0.0.1:0"]
    if case in ("protected key", "subject too"):
        argv += ["--tls-cert", str(cert), "--tls-key", str(key)]
    if case == "swapped":
        argv += ["--tls-cert", str(key), "--tls-key", str(cert)]
    if case in ("subject too", "bad subject"):
        argv += ["--tls-subject", "C=TOOLONG,CN=x"]
    if case == "damaged CA":
        (tmp_path / "ca-cert.pem").write_text("garbage\n")
        (tmp_path / "ca-key.pem").write_text("garbage\n")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_a_damaged_trusted_key_is_a_one_line_error_for_verify(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from spicetap.archive.keys import PUB_NAME

    monkeypatch.setenv("SPICETAP_CONFIG_DIR", str(tmp_path))
    (tmp_path / PUB_NAME).write_text("garbage\n")
    archive = tmp_path / "a.spta"
    archive.write_bytes(b"\x92\xc4\x00")
    assert main(["verify", str(archive)]) == 2
    err = capsys.readouterr().err
    assert "not a PEM public key (damaged? move it away)" in err and err.count("\n") == 1


def test_the_connection_cap_follows_the_open_files_limit(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import logging

    from proxy import cli as proxy_cli
    from proxy.core.admission import connection_budget
    from proxy.io import guard

    monkeypatch.setattr(proxy_cli, "raise_open_files_limit", lambda: 1024)
    monkeypatch.setattr(guard, "raise_open_files_limit", lambda: 1024)
    with caplog.at_level(logging.INFO, logger="spicetap.proxy"):
        assert proxy_cli._admission(None).limit == connection_budget(1024) == 448
        assert "serving up to 448 connections at once (open files limit 1024)" in caplog.text
        assert proxy_cli._admission(100).limit == 100
        assert "WARNING" not in caplog.text
        assert proxy_cli._admission(5000).limit == 5000  # the user's word, with a warning
    assert "max_connections 5000 needs about 10128 open files; the limit is 1024" in (caplog.text)


@pytest.mark.parametrize(
    ("toml", "names"),
    [
        ('[proxy]\nlisten = "nope"\nupstream = "127.0.0.1:1"\n', "[proxy] listen 'nope'"),
        ('[proxy]\nupstream = "h"\n', "[proxy] upstream 'h'"),
        ('[proxy]\nupstream = "127.0.0.1:1"\nmanagement = "m"\n', "[proxy] management 'm'"),
        ('[proxy]\nupstream = "127.0.0.1:1"\nws_listen = "w"\n', "[proxy] ws_listen 'w'"),
        ('[connect]\nlisten = "c"\nallow = ["h:1"]\n', "[connect] listen 'c'"),
        ('[targets.vm1]\nupstream = "127.0.0.1:1"\nlisten = "t"\n', "[targets.vm1] listen 't'"),
        (
            '[proxy]\nupstream = "127.0.0.1:1"\n[recording]\ndirectory = "/dev/null"\n',
            "[recording] directory /dev/null: not a directory",
        ),
        (
            '[proxy]\nupstream = "127.0.0.1:1"\nlog_format = "xml"\n',
            "[proxy] log_format 'xml': expected one of text, json",
        ),
    ],
)
def test_bad_values_from_the_config_file_are_named_by_file_and_key(
    toml: str,
    names: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Not by the command-line flag the user never gave."""
    monkeypatch.setenv("SPICETAP_CONFIG_DIR", str(tmp_path))
    config = tmp_path / "spicetap.toml"
    config.write_text(toml)
    assert main(["proxy", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert (
        err
        == f"spicetap: error: {config}: {names}"
        + ("" if "directory" in names or "log_format" in names else ": expected HOST:PORT")
        + "\n"
    )


@pytest.mark.parametrize(
    ("module", "missing", "said"),
    [
        ("proxy.core.framing", "proxy.core._fastframe", "the C framer is not built"),
        ("proxy.io.ends", "proxy.io._forward", "the C forwarder is not built"),
    ],
)
def test_a_proxy_without_a_c_extension_says_so_at_start(
    module: str,
    missing: str,
    said: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    import importlib

    monkeypatch.setenv("SPICETAP_CONFIG_DIR", str(tmp_path))
    uses = importlib.import_module(module)
    assert uses.WITHOUT_C is None  # the install built it
    monkeypatch.setattr(uses, "WITHOUT_C", f"No module named '{missing}'")
    assert main(["proxy", "--upstream", "bad"]) == 2  # stops at once, after saying it
    assert f"{said} (No module named '{missing}')" in caplog.text
    assert "; reinstall with gcc" in caplog.text


def test_a_proxy_whose_tls_cannot_be_forwarded_in_c_says_so_at_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from proxy.io import ends

    monkeypatch.setenv("SPICETAP_CONFIG_DIR", str(tmp_path))
    assert ends.TLS_WITHOUT_C is None  # this install's Python and extension share OpenSSL
    monkeypatch.setattr(ends, "TLS_WITHOUT_C", "another OpenSSL")
    assert main(["proxy", "--upstream", "bad"]) == 2
    assert "TLS channels forward in Python, more slowly: another OpenSSL" in caplog.text


@pytest.mark.parametrize(
    ("content", "extra", "message"),
    [
        (None, [], "--management-token-file {file}: cannot read (No such file or directory)"),
        ("\xff\xfesecret-bytes", [], "--management-token-file {file}: not UTF-8 text"),
        ("", [], "--management-token-file {file}: a token needs at least 16 characters"),
        ("tiny-secret\n", [], "--management-token-file {file}: a token needs at least 16"),
        ("has spaces in the token\n", [], "--management-token-file {file}: a token may hold"),
        ("0123456789abcdef0123", ["--no-management"], "--management-token-file needs --man"),
    ],
)
def test_a_bad_api_token_file_is_a_one_line_error_without_the_token(
    content: str | None,
    extra: list[str],
    message: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("SPICETAP_CONFIG_DIR", str(tmp_path))
    token = tmp_path / "token"
    if content is not None:
        token.write_bytes(content.encode("latin-1"))  # "\xff": a byte UTF-8 cannot start with
    argv = ["proxy", "--upstream", "127.0.0.1:1", "--listen", "127.0.0.1:0"]
    if extra != ["--no-management"]:
        argv += ["--management", "127.0.0.1:0"]
    assert main([*argv, "--management-token-file", str(token)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"spicetap: error: {message.format(file=token)}")
    assert err.count("\n") == 1
    assert content is None or not content.strip() or content.strip() not in err


def test_an_api_beyond_loopback_without_a_token_is_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from proxy.cli import _management
    from proxy.fronts import management_token
    from spicetap.cli import build_parser
    from spicetap.config import ProxySection

    for listen, warned in (
        ("0.0.0.0:0", True),
        ("[::]:0", True),
        ("127.0.0.1:0", False),
        ("[::1]:0", False),
        ("localhost:0", False),
        ("example.org:0", True),
    ):
        caplog.clear()
        args = build_parser().parse_args(["proxy", "--management", listen])
        options = _management(args, ProxySection(), management_token(args, ProxySection()))
        assert options is not None and options.token is None and options.https is None
        said = [r.getMessage() for r in caplog.records if "has no token" in r.getMessage()]
        assert bool(said) == warned, listen
    token = tmp_path / "token"
    token.write_text("0123456789abcdef0123456789abcdef\n")
    caplog.clear()
    args = build_parser().parse_args(
        ["proxy", "--management", "0.0.0.0:0", "--management-token-file", str(token)]
    )
    options = _management(args, ProxySection(), management_token(args, ProxySection()))
    assert options is not None and options.token == b"0123456789abcdef0123456789abcdef"
    assert "0123456789abcdef" not in repr(options)  # a logged options object keeps it
    assert not [r for r in caplog.records if "has no token" in r.getMessage()]


def test_https_for_the_api_from_the_config_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from proxy.cli import _management
    from proxy.fronts import build_fronts
    from spicetap.cli import build_parser
    from spicetap.config import load_config

    monkeypatch.setenv("SPICETAP_CONFIG_DIR", str(tmp_path))
    path = tmp_path / "spicetap.toml"
    path.write_text(
        '[proxy]\nupstream = "127.0.0.1:1"\nmanagement = "127.0.0.1:0"\nmanagement_tls = true\n'
    )
    args = build_parser().parse_args(["proxy", "--config", str(path)])
    config = load_config(path)
    fronts = build_fronts(args, config, None, False)
    assert fronts.management_tls is not None  # issued by spicetap's CA
    options = _management(args, config.proxy, None, fronts.management_tls)
    assert options is not None and options.https is fronts.management_tls.context
    assert (tmp_path / "ca-cert.pem").is_file()
    path.write_text('[proxy]\nupstream = "127.0.0.1:1"\nmanagement_tls = true\n')
    assert main(["proxy", "--config", str(path)]) == 2
    needs = "[proxy] management_tls needs --management (or [proxy] management)"
    assert capsys.readouterr().err == f"spicetap: error: {path}: {needs}\n"


def test_a_file_size_limit_below_the_backlog_ring_is_a_one_line_error(tmp_path: Path) -> None:
    """`ulimit -f` (or a service's LimitFSIZE) smaller than the recording ring: the proxy
    says what it could not make and which option sizes it, instead of "File too large"."""
    import os
    import resource
    import subprocess
    import sys

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    env = {**os.environ, "SPICETAP_CONFIG_DIR": str(tmp_path)}
    argv = ["proxy", "--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:1"]
    done = subprocess.run(
        [sys.executable, "-m", "spicetap", *argv, "--record", str(tmp_path / "rec")],
        env=env, capture_output=True, text=True, timeout=60, preexec_fn=limit, check=False,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.splitlines()[-1] == (
        "spicetap: error: recording: cannot make its 512 MiB backlog ring in shared memory "
        "(--max-backlog): File too large"
    )
    assert "Traceback" not in done.stderr


def test_an_absurd_backlog_is_a_one_line_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """2^43 MiB and more overflowed a C long in ftruncate(): a traceback."""
    monkeypatch.setenv("SPICETAP_CONFIG_DIR", str(tmp_path))
    argv = ["--upstream", "127.0.0.1:1", "--record", str(tmp_path / "rec")]
    assert main(["proxy", *argv, "--max-backlog", "9" * 20]) == 2
    err = capsys.readouterr().err
    assert err.endswith(
        f"cannot make its {'9' * 20} MiB backlog ring in shared memory (--max-backlog): too large\n"
    )
    assert err.count("\n") == 1
