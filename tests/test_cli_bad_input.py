"""One-line errors for bad arguments to probe and demo, and a quiet early Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from spicetap import interrupts
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
    try:
        time.sleep(after)
        os.killpg(proc.pid, signal.SIGINT)  # the group we made, by its leader's PID
        _out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:  # a proxy that missed it must not outlive the test
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert "Traceback" not in err, err
    # -SIGINT: the interpreter itself had not started yet (its default action)
    assert proc.returncode in (0, 130, -signal.SIGINT), err


class _SwallowsCtrlC:
    """What importlib's module-lock callbacks do to a Ctrl-C that lands in them: Python
    cannot raise from a finaliser, so it reports the KeyboardInterrupt and goes on."""

    def __del__(self) -> None:
        raise KeyboardInterrupt


def _lose_a_ctrl_c() -> None:
    _SwallowsCtrlC()  # finalised at once


def test_ctrl_c_lost_while_importing_still_stops(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import spicetap.cli

    real = spicetap.cli.build_parser

    def build_and_lose() -> Any:
        parser = real()
        _lose_a_ctrl_c()
        return parser

    monkeypatch.setattr(spicetap.cli, "build_parser", build_and_lose)
    # a command that ends by itself either way (a refused port): only the stop is tested
    assert main(["probe", "127.0.0.1", "1"]) == 130
    assert capsys.readouterr().err == ""  # no "Exception ignored ... Traceback"


_LOSE_ONE_WHILE_STARTING = """
import sys
import proxy.cli
from spicetap import interrupts
from spicetap.cli import main
from tests.test_cli_bad_input import _lose_a_ctrl_c

real = proxy.cli.build_fronts

def build_and_lose(*args):
    fronts = real(*args)
    _lose_a_ctrl_c()
    return fronts

proxy.cli.build_fronts = build_and_lose
sys.exit(main(sys.argv[1:]))
"""


def test_ctrl_c_lost_while_the_proxy_starts_stops_it_before_ready(tmp_path: Path) -> None:
    env = {**os.environ, "SPICETAP_CONFIG_DIR": str(tmp_path / "cfg"), "PYTHONPATH": str(REPO)}
    argv = [sys.executable, "-c", _LOSE_ONE_WHILE_STARTING, "proxy", "--listen", "127.0.0.1:0"]
    argv += ["--upstream", "127.0.0.1:1", "--record", str(tmp_path / "rec")]
    pipe = subprocess.PIPE
    proc = subprocess.Popen(argv, env=env, stdout=pipe, stderr=pipe, text=True)
    try:
        out, err = proc.communicate(timeout=60)  # without the fix it serves until killed
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert "spicetap proxy ready" not in out
    assert "stopping: draining archives" in err and "Traceback" not in err, err


def test_ctrl_c_while_importing_is_raised_once_the_imports_end() -> None:
    """Held back, not lost: raised where it cannot turn into another error (in a class's
    `__set_name__` it comes out as a RuntimeError)."""
    before = signal.getsignal(signal.SIGINT)
    finished = []
    with pytest.raises(KeyboardInterrupt), interrupts.deferred():
        signal.raise_signal(signal.SIGINT)  # to this process: its handler runs at once
        finished.append("imports")
    assert finished == ["imports"]
    assert signal.getsignal(signal.SIGINT) is before


def test_ctrl_c_as_the_entry_point_is_imported_is_a_quiet_stop() -> None:
    """A Ctrl-C right after `spicetap.entry` is imported, before any command code runs (the
    console script imports it, then calls run()): noted, and the command stops with 130,
    no traceback, nothing run."""
    script = (
        "import signal, sys\n"
        "import spicetap.entry\n"
        "signal.raise_signal(signal.SIGINT)\n"
        "sys.argv = ['spicetap', 'proxy', '--listen', '127.0.0.1:0', '--upstream', '127.0.0.1:9']\n"
        "code = spicetap.entry.run()\n"
        "assert signal.getsignal(signal.SIGINT) is signal.default_int_handler\n"
        "sys.exit(code)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 130, done.stderr
    assert done.stdout == "" and "Traceback" not in done.stderr, done.stderr
