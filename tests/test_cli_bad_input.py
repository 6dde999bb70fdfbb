"""One-line errors for bad arguments to probe and demo, and a quiet early Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from spicetap.cli import main
from tests.integration.proxy_process import REPO


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["probe", "127.0.0.1", "²"], "port '²': expected a number from 1 to 65535"),
        (["probe", " ", "5900"], "host: empty"),
        (["probe", "127.0.0.1", "5900", "--tls", "--ca", "."], "--ca .: not a file"),
        (["demo", "--minutes", "nan"], "--minutes nan: expected a number of minutes above 0"),
        (["demo", "--minutes", "0"], "--minutes 0: expected a number of minutes above 0"),
        (["demo", "--record", "/dev/null"], "--record /dev/null: not a directory"),
    ],
)
def test_bad_arguments_are_one_line_errors(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err == f"spicetap: error: {message}\n"


@pytest.mark.parametrize("after", [0.2, 0.5, 0.8, 1.2])
def test_ctrl_c_while_the_proxy_starts_is_a_quiet_stop(tmp_path: Path, after: float) -> None:
    """Ctrl-C reaches the whole process group: the proxy may still be importing, or trio's
    signal receiver not yet up, and the recording process may still be starting. None of
    them may print a traceback."""
    env = {**os.environ, "SPICETAP_CONFIG_DIR": str(tmp_path / "cfg"), "PYTHONPATH": str(REPO)}
    argv = [sys.executable, "-m", "spicetap", "proxy", "--listen", "127.0.0.1:0"]
    argv += ["--upstream", "127.0.0.1:1", "--record", str(tmp_path / "rec")]
    proc = subprocess.Popen(
        argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        process_group=0,  # a group of its own, as a terminal's job is
    )  # fmt: skip
    time.sleep(after)
    os.killpg(proc.pid, signal.SIGINT)  # the group we made, by its leader's PID
    _out, err = proc.communicate(timeout=60)
    assert "Traceback" not in err, err
    # -SIGINT: the interpreter itself had not started yet (its default action)
    assert proc.returncode in (0, 130, -signal.SIGINT), err
