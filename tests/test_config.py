"""The TOML configuration: the example loads; mistakes are one-line errors naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from spicetap.cli import main
from spicetap.config import ConfigError, load_config

EXAMPLE = Path(__file__).resolve().parents[1] / "config" / "spicetap.example.toml"


def test_example_config_loads() -> None:
    config = load_config(EXAMPLE)
    assert config.proxy.upstream == "127.0.0.1:5930"
    assert config.recording.flush_interval == 0.1
    assert config.recording.privacy.keys == "text"
    assert config.recording.privacy.sasl_user is False
    assert (config.recording.max_backlog_mb, config.recording.nice) == (512, 10)
    assert config.recording.chain_hash == "blake3"
    assert config.connect.allow == ("127.0.0.1:5930-5939",)
    assert config.targets["lab"].upstream_tls == "127.0.0.1:5931"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[proxy]\nlisten = 5\n", "[proxy] listen = 5: expected a string"),
        ("[proxy]\nlisen = '1:2'\n", "[proxy] unknown key 'lisen'"),
        ("[recordings]\n", "unknown section [recordings]"),
        ("[recording]\nflush_interval = 'soon'\n", "flush_interval = 'soon': expected a number"),
        ("[recording]\nbacklog = 'drop'\n", "backlog = 'drop': expected 'gap' or 'close'"),
        ("[recording]\nmax_backlog_mb = 0\n", "max_backlog_mb = 0: expected a positive"),
        ("[recording]\nchain_hash = 'md5'\n", "chain_hash = 'md5': expected 'blake3' or 'sha256'"),
        ("[recording]\nnice = 20\n", "nice = 20: expected 0 (off) to 19"),
        ("[recording.privacy]\nkeys = 'all'\n", "[recording.privacy] keys = 'all'"),
        ("[recording.privacy]\npasswords = true\n", "[recording.privacy] unknown key 'pass"),
        # as the file spells them, not as Python would
        ("[recording]\nflush_interval = 1979-05-27\n", "flush_interval = 1979-05-27: expec"),
        ("[proxy]\nlink_timeout = true\n", "link_timeout = true: expected a number"),
        ("[connect]\nallow = [1, 'a']\n", "allow = [1, 'a']: expected a list of strings"),
        ("[recording.privacy]\ndisplay = 'no'\n", "display = 'no': expected true or false"),
        ("[recording.privacy]\nsasl_user = 1\n", "sasl_user = 1: expected true or false"),
        ("[proxy\n", "not valid TOML"),
        ("[connect]\nallow = '1.2.3.4:5'\n", "allow = '1.2.3.4:5': expected a list of strings"),
        ("[connect]\nallow = [5]\n", "allow = [5]: expected a list of strings"),
        ("[targets.vm1]\nlisten = '1:2'\n", "[targets.vm1] needs upstream or upstream_tls"),
        ("[targets.vm1]\nupstream = 1\n", "[targets.vm1] upstream = 1: expected a string"),
        ("[targets.vm1]\nupstrem = 'h:1'\n", "[targets.vm1] unknown key 'upstrem'"),
        ("[targets.'a b']\nupstream = 'h:1'\n", "[targets.a b]: a target name is"),
        ("[targets]\nvm1 = 'h:1'\n", "targets.vm1 must be a table"),
        # TOML has nan and inf: a nan timeout would turn the timeout off
        ("[proxy]\nlink_timeout = nan\n", "link_timeout = nan: expected a positive number"),
        ("[proxy]\nidle_timeout = inf\n", "idle_timeout = inf: expected a positive number"),
        ("[proxy]\nmax_message = -1\n", "max_message = -1: expected a positive number"),
        ("[proxy]\nmax_connections = 0\n", "max_connections = 0: expected a positive number"),
        ("[proxy]\nlockout_failures = -2\n", "lockout_failures = -2: expected 0 or more"),
        ("[proxy]\nlockout_seconds = 0\n", "lockout_seconds = 0: expected a positive number"),
        ("[recording]\nflush_interval = -1\n", "flush_interval = -1: expected 0 or more"),
        ("[recording]\nrotate_seconds = 0\n", "rotate_seconds = 0: expected a positive number"),
        ("[proxy]\nupstream = ''\n", "[proxy] upstream = '': expected a value"),
        ("[targets.vm1]\nupstream = ' '\n", "[targets.vm1] upstream = ' ': expected a value"),
    ],
)
def test_mistakes_name_file_and_key(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(str(path)) and expected in message
    assert "\n" not in message


def test_proxy_refuses_a_bad_config_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[proxy]\nupstream = 'nowhere'\n")
    assert main(["proxy", "--config", str(path)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"spicetap: error: {path}: [proxy] upstream 'nowhere': expected HOST:PORT"
    )
    assert main(["proxy", "--config", str(tmp_path / "missing.toml")]) == 2
    assert "no such file" in capsys.readouterr().err
