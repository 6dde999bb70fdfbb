"""Which listeners serve the main upstream: the flags and the config file agree."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.fronts import build_fronts, speaks
from spicetap.cli import build_parser
from spicetap.config import load_config


def _listeners(tmp_path: Path, flags: list[str], proxy_section: str) -> list[str]:
    """What the fronts built from FLAGS and a file's [proxy] section listen on."""
    path = tmp_path / "gateway.toml"
    path.write_text("[proxy]\n" + proxy_section)
    args = build_parser().parse_args(["proxy", "--config", str(path), *flags])
    fronts = build_fronts(args, load_config(path), None, False)
    routes = [*fronts.routes, *([fronts.websocket] if fronts.websocket else [])]
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
