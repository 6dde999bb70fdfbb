"""`spicetap probe` and the management API against real peers: QEMU's spice-server (plain,
TLS, passwords, a TLS-only main channel), a spice-gtk viewer, and small loopback servers
that answer garbage or nothing. Everything on 127.0.0.1; every wait is bounded."""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from proxy.io.management import SESSION_ENDED
from spicetap.cli import main
from spicetap.inputs import iter_records
from tests.conftest import peers
from tests.harness import (
    ClientOptions,
    QemuServer,
    SpiceEndpoint,
    make_tls_material,
    run_gi_client,
)
from tests.harness.client import ClientResult
from tests.harness.procs import reserve_ports, tail
from tests.integration.proxy_process import REPO, ProxyProcess

pytestmark = pytest.mark.peers

PASSWORD = "s3cret"
SUCCESS_KEYS = {
    "success",
    "host",
    "port",
    "protocolVersion",
    "majorVersion",
    "minorVersion",
    "capabilities",
    "authMethods",
}
FAILURE_KEYS = {"success", "host", "port", "error"}  # and "detail" when there is one


# -- peers: QEMU (shared per module: each start costs seconds on 2 cores) -------------------
@pytest.fixture(scope="module")
def plain_qemu() -> Iterator[QemuServer]:
    """Plain port, no password (disable-ticketing)."""
    with peers(), QemuServer(guest="none") as srv:
        yield srv


@pytest.fixture(scope="module")
def secure_qemu() -> Iterator[QemuServer]:
    """Plain and TLS ports, a password, and the main channel only allowed over TLS."""
    with (
        peers(),
        QemuServer(
            guest="none", tls=True, password=PASSWORD, spice_options={"tls-channel": "main"}
        ) as srv,
    ):
        yield srv


def host_subject(srv: QemuServer) -> str:
    assert srv.tls_material is not None
    return srv.tls_material.host_subject


def tls_args(srv: QemuServer) -> list[str]:
    assert srv.tls_material is not None
    return ["--tls", "--ca", str(srv.tls_material.ca_file), "--host-subject", host_subject(srv)]


# -- small loopback servers ------------------------------------------------------------------
@contextmanager
def loopback_server(answer: bytes | None) -> Iterator[int]:
    """Listen on 127.0.0.1; to each connection send `answer` once something arrives, or
    (None) never say anything. Stops by itself when the block ends."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.settimeout(0.1)
    stop = threading.Event()
    held: list[socket.socket] = []

    def serve() -> None:
        for _ in range(600):  # at most a minute
            if stop.is_set():
                return
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            held.append(conn)
            if answer is not None:
                conn.settimeout(5)
                try:
                    conn.recv(4096)
                    conn.sendall(answer)
                except OSError:
                    pass

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        stop.set()
        thread.join(5)
        for conn in held:
            conn.close()
        server.close()


def closed_port() -> int:
    (port,) = reserve_ports(1)  # free a moment ago, and nobody listens there
    return port


GARBAGE = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n"


# -- the CLI ---------------------------------------------------------------------------------
def probe_json(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, Any]]:
    rc = main(["probe", *args, "--json"])
    out = capsys.readouterr().out
    answer = json.loads(out)
    assert set(answer) - {"detail"} == (SUCCESS_KEYS if answer["success"] else FAILURE_KEYS)
    assert answer["success"] or isinstance(answer.get("detail", ""), str)
    assert rc == (0 if answer["success"] else 1)
    return rc, answer


def test_probe_plain_qemu(plain_qemu: QemuServer, capsys: pytest.CaptureFixture[str]) -> None:
    port = str(plain_qemu.port)
    _, answer = probe_json(capsys, "127.0.0.1", port)
    assert answer["success"] and answer["port"] == plain_qemu.port
    assert answer["protocolVersion"] == "2.2"
    assert (answer["majorVersion"], answer["minorVersion"]) == (2, 2)
    assert {"PROTOCOL_AUTH_SELECTION", "AUTH_SPICE", "MINI_HEADER"} <= set(answer["capabilities"])
    assert "AGENT_CONNECTED_TOKENS" in answer["capabilities"]  # main-channel caps too
    assert answer["authMethods"] == ["spice"]
    # disable-ticketing takes any ticket
    assert probe_json(capsys, "127.0.0.1", port, "--password", "anything")[1]["success"]
    assert main(["probe", "127.0.0.1", port]) == 0
    assert capsys.readouterr().out.startswith(f"127.0.0.1:{port}: SPICE 2.2, link ok")


def test_probe_tls_with_passwords(
    secure_qemu: QemuServer, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    port = str(secure_qemu.tls_port)
    tls = tls_args(secure_qemu)
    ok = probe_json(capsys, "127.0.0.1", port, *tls, "--password", PASSWORD)[1]
    assert ok["success"] and ok["protocolVersion"] == "2.2"
    wrong = probe_json(capsys, "127.0.0.1", port, *tls, "--password", "wrong")[1]
    assert wrong["error"] == "Authentication failed"
    secret = tmp_path / "pw"
    secret.write_text(PASSWORD + "\n")
    from_file = probe_json(capsys, "127.0.0.1", port, *tls, "--password-file", str(secret))[1]
    assert from_file["success"]
    # no password: not admitted, yet the human answer says what the server is
    assert main(["probe", "127.0.0.1", port, *tls]) == 1
    first = capsys.readouterr().out.splitlines()[0]
    assert first == (
        f"127.0.0.1:{port}: SPICE 2.2, Authentication failed "
        "(the server wants a password; none was given)"
    )


def test_probe_tls_failures(
    secure_qemu: QemuServer, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    tls_port, plain_port = str(secure_qemu.tls_port), str(secure_qemu.port)
    tls = tls_args(secure_qemu)
    other_ca = make_tls_material(tmp_path / "other").ca_file
    cases = [
        (plain_port, tls),  # TLS to the plain port: spice-server answers REDQ, not TLS
        (tls_port, ["--tls", "--ca", str(other_ca)]),  # a CA that did not sign it
        (tls_port, [*tls[:3], "--host-subject", "C=XX,O=someone-else,CN=127.0.0.1"]),
    ]
    for port, args in cases:
        answer = probe_json(capsys, "127.0.0.1", port, *args, "--password", PASSWORD)[1]
        assert answer["error"] == "TLS handshake failed", args
    insecure = ["--tls", "--insecure", "--password", PASSWORD]
    assert probe_json(capsys, "127.0.0.1", tls_port, *insecure)[1]["success"]


def test_plain_probe_of_a_tls_only_main_channel(
    secure_qemu: QemuServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """tls-channel=main: the plain port answers with a link reply carrying NEED_SECURED."""
    answer = probe_json(capsys, "127.0.0.1", str(secure_qemu.port), "--password", PASSWORD)[1]
    assert answer["error"] == "Link error: NEED_SECURED"


def test_plain_probe_of_a_tls_only_qemu(capsys: pytest.CaptureFixture[str]) -> None:
    """What spice-server really does with plaintext on its TLS port: it closes, silent."""
    with peers(), QemuServer(guest="none", plain=False, tls=True) as srv:
        answer = probe_json(capsys, "127.0.0.1", str(srv.tls_port))[1]
        assert answer["error"] == "Invalid SPICE magic"
        assert main(["probe", "127.0.0.1", str(srv.tls_port)]) == 1
        assert "closed after 0 bytes" in capsys.readouterr().out


def test_probe_of_what_is_not_a_spice_server(capsys: pytest.CaptureFixture[str]) -> None:
    answer = probe_json(capsys, "127.0.0.1", str(closed_port()))[1]
    assert answer["error"] == "Connection refused"
    with loopback_server(GARBAGE) as port:
        assert probe_json(capsys, "127.0.0.1", str(port))[1]["error"] == "Invalid SPICE magic"
        tls = probe_json(capsys, "127.0.0.1", str(port), "--tls", "--insecure")[1]
        assert tls["error"] == "TLS handshake failed"
    with loopback_server(None) as port:
        started = time.monotonic()
        answer = probe_json(capsys, "127.0.0.1", str(port), "--timeout", "0.5")[1]
        assert answer["error"] == "Timeout"
        assert time.monotonic() - started < 3
        answer = probe_json(capsys, "127.0.0.1", str(port), "--tls", "--timeout", "0.5")[1]
        assert answer["error"] == "Timeout"


def test_cli_failure_is_one_line_and_exit_status_1() -> None:
    with loopback_server(GARBAGE) as port:
        proc = subprocess.run(
            [sys.executable, "-m", "spicetap", "probe", "127.0.0.1", str(port)],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=REPO,
            check=False,
        )
    assert proc.returncode == 1
    assert proc.stdout.count("\n") == 1 and proc.stderr == ""
    assert proc.stdout.startswith(f"127.0.0.1:{port}: Invalid SPICE magic (the peer answered")


# -- probing does not throw the connected viewer out (unless asked to) -----------------------
def viewer_in_background(
    endpoint: SpiceEndpoint, work: Path, seconds: float
) -> tuple[threading.Thread, list[ClientResult]]:
    out: list[ClientResult] = []
    options = ClientOptions(duration=seconds, min_duration=seconds - 2)
    thread = threading.Thread(target=lambda: out.append(run_gi_client(endpoint, options, work)))
    thread.start()
    return thread, out


def wait_for(check: Callable[[], Any], what: str, timeout: float = 20.0) -> Any:
    for _ in range(int(timeout / 0.2)):
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def wait_for_session(proxy: ProxyProcess, channels: int, query: str = "") -> Any:
    """The first session in GET /api/sessions (with `query`, e.g. "?user=NAME") once it
    has `channels` channels open."""

    def live_session() -> Any:
        _, data = api_call(proxy, "GET", "/api/sessions" + query)
        full = [s for s in data["sessions"] if len(s["channels"]) >= channels]
        return full and full[0]

    return wait_for(live_session, f"a session of {channels} channels in /api/sessions{query}")


def test_probe_leaves_the_connected_viewer_alone_unless_full_link(
    plain_qemu: QemuServer, tmp_path: Path
) -> None:
    """spice-server drops its current client whenever a new main channel authenticates:
    the default probe checks the ticket on an inputs channel instead. QMP is the oracle."""

    def viewer_channels() -> set[int]:
        return {
            c["connection-id"] for c in plain_qemu.qmp("query-spice")["channels"]
        }  # one id per session

    thread, _ = viewer_in_background(plain_qemu.endpoint(), tmp_path / "client", 20)
    try:
        (session,) = wait_for(viewer_channels, "the viewer's channels in query-spice")
        wait_for(lambda: len(plain_qemu.qmp("query-spice")["channels"]) >= 5, "its channels")
        before = len(plain_qemu.qmp("query-spice")["channels"])
        assert main(["probe", "127.0.0.1", str(plain_qemu.port)]) == 0
        time.sleep(1)
        now = plain_qemu.qmp("query-spice")["channels"]
        # still all there (a late usbredir may even have joined); dropped, it would be 0
        assert len([c for c in now if c["connection-id"] == session]) >= before
        assert main(["probe", "127.0.0.1", str(plain_qemu.port), "--full-link"]) == 0
        wait_for(lambda: session not in viewer_channels(), "the full link to drop the viewer")
    finally:
        thread.join(60)


# -- the management API on a real `spicetap proxy` -------------------------------------------
@pytest.fixture(scope="module")
def proxy(
    plain_qemu: QemuServer, secure_qemu: QemuServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    """Recording, with --management; API probes with "tls" trust secure_qemu's CA."""
    work = tmp_path_factory.mktemp("proxy")
    assert plain_qemu.port is not None and secure_qemu.tls_material is not None
    extra = (
        "--management",
        "127.0.0.1:0",
        "--upstream-ca",
        str(secure_qemu.tls_material.ca_file),
    )
    with ProxyProcess(plain_qemu.port, work / "rec", work, extra=extra) as running:
        yield running


def api_call(proxy: ProxyProcess, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", proxy.ports["management"], timeout=30)
    try:
        payload = None if body is None else json.dumps(body).encode()
        conn.request(method, path, body=payload)
        response = conn.getresponse()
        data = response.read()
    finally:
        conn.close()
    kind = response.getheader("content-type", "")
    return response.status, json.loads(data) if "json" in kind else data.decode()


def connect(proxy: ProxyProcess, **body: Any) -> dict[str, Any]:
    status, answer = api_call(proxy, "POST", "/api/spice/connect", body)
    assert status == 200, answer
    assert set(answer) - {"detail"} == (SUCCESS_KEYS if answer["success"] else FAILURE_KEYS)
    assert answer["success"] or isinstance(answer.get("detail", ""), str)
    return dict(answer)


def metrics(proxy: ProxyProcess) -> dict[str, float]:
    status, text = api_call(proxy, "GET", "/metrics")
    assert status == 200
    return {
        name: float(value)
        for line in text.splitlines()
        if not line.startswith("#")
        for name, value in [line.rsplit(" ", 1)]
    }


def test_connect_api_answers_as_probe_does(
    proxy: ProxyProcess, plain_qemu: QemuServer, secure_qemu: QemuServer
) -> None:
    # "spicetap proxy listening (management) on HOST:PORT" came before "ready"
    assert proxy.ports["management"] > 0
    ok = connect(proxy, host="127.0.0.1", port=plain_qemu.port, timeout=5)
    assert ok["success"] and ok["protocolVersion"] == "2.2"
    assert "MINI_HEADER" in ok["capabilities"] and ok["authMethods"] == ["spice"]
    tls = {"host": "127.0.0.1", "port": secure_qemu.tls_port, "timeout": 5, "tls": True}
    subject = host_subject(secure_qemu)
    assert connect(proxy, **tls, hostSubject=subject, password=PASSWORD)["success"]
    assert connect(proxy, **tls, password="wrong")["error"] == "Authentication failed"
    assert connect(proxy, **tls)["error"] == "Authentication failed"
    bad_subject = connect(proxy, **tls, hostSubject="C=XX,CN=nobody", password=PASSWORD)
    assert bad_subject["error"] == "TLS handshake failed"
    plain_to_tls_main = connect(proxy, host="127.0.0.1", port=secure_qemu.port, timeout=5)
    assert plain_to_tls_main["error"] == "Link error: NEED_SECURED"
    tls_to_plain = connect(proxy, host="127.0.0.1", port=plain_qemu.port, timeout=5, tls=True)
    assert tls_to_plain["error"] == "TLS handshake failed"
    refused = connect(proxy, host="127.0.0.1", port=closed_port(), timeout=5)
    assert refused == {
        "success": False,
        "host": "127.0.0.1",
        "port": refused["port"],
        "error": "Connection refused",
        "detail": "Connection refused",
    }
    with loopback_server(GARBAGE) as port:
        assert connect(proxy, host="127.0.0.1", port=port)["error"] == "Invalid SPICE magic"
    with loopback_server(None) as port:
        silent = connect(proxy, host="127.0.0.1", port=port, timeout=0.5)
        assert silent["error"] == "Timeout"


def test_api_refuses_bad_requests(proxy: ProxyProcess) -> None:
    assert api_call(proxy, "POST", "/api/spice/connect", {"host": "x"})[0] == 400
    assert api_call(proxy, "POST", "/api/spice/connect", {"host": "x", "port": 1, "x": 1})[0] == 400
    assert api_call(proxy, "GET", "/api/spice/connect")[0] == 405
    assert api_call(proxy, "GET", "/nowhere") == (404, {"error": "no such path: /nowhere"})
    with socket.create_connection(("127.0.0.1", proxy.ports["management"]), timeout=10) as raw:
        raw.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        assert raw.recv(4096).startswith(b"HTTP/1.1 400 ")
    assert proxy.proc.poll() is None


def test_sessions_and_metrics_follow_a_real_viewer(
    proxy: ProxyProcess, plain_qemu: QemuServer, tmp_path: Path
) -> None:
    before = metrics(proxy)
    thread, result = viewer_in_background(SpiceEndpoint(port=proxy.port), tmp_path / "client", 12)
    try:

        def live_session() -> Any:
            _, data = api_call(proxy, "GET", "/api/sessions")
            wanted = {"main", "display", "inputs"}  # the viewer opens them in any order
            full = [
                s
                for s in data["sessions"]
                if len(s["channels"]) >= 5 and wanted <= {c["channel"] for c in s["channels"]}
            ]
            return full and data

        data = wait_for(live_session, "a session with its channels in /api/sessions")
        (session,) = [s for s in data["sessions"] if len(s["channels"]) >= 5]
        names = [c["channel"] for c in session["channels"]]
        assert names[0] == "main" and "display" in names and "inputs" in names
        assert session["connectionId"]  # the id spice-server gave, main channel included
        assert session["viewer"].startswith("127.0.0.1:")
        assert session["upstream"] == f"127.0.0.1:{plain_qemu.port}"
        main_channel = session["channels"][0]
        assert main_channel["linked"] and main_channel["messages"]["s2c"] > 0
        assert session["bytes"]["s2c"] > 1000
        assert data["totals"]["channelsOpen"] >= len(session["channels"])
        during = metrics(proxy)
        assert during['spicetap_channels_open_by_type{channel="main"}'] == 1
        assert during['spicetap_channels_open_by_type{channel="display"}'] == 1
        assert during["spicetap_channels_open"] >= 5
        assert "spicetap_recorder_backlog" in during
        assert during["process_resident_memory_bytes"] > 10_000_000
        # an API probe of the same server leaves the viewer connected
        assert connect(proxy, host="127.0.0.1", port=plain_qemu.port)["success"]
        time.sleep(1)
        _, again = api_call(proxy, "GET", "/api/sessions")
        assert len(again["sessions"][0]["channels"]) >= len(session["channels"])
    finally:
        thread.join(60)
    assert result and result[0].returncode == 0, result[0].summary if result else None
    after = wait_for(
        lambda: (m := metrics(proxy))["spicetap_channels_open"] == 0 and m, "channels closed"
    )
    assert after["spicetap_channels_total"] >= before["spicetap_channels_total"] + 5
    for direction in ("c2s", "s2c"):
        key = f'spicetap_bytes_total{{direction="{direction}"}}'
        assert after[key] > during[key] >= before[key]  # counters only grow, closed included
    assert after['spicetap_messages_total{direction="s2c"}'] > 10


def test_the_operator_ends_a_session_and_its_archive_says_why(
    proxy: ProxyProcess, plain_qemu: QemuServer, tmp_path: Path
) -> None:
    """DELETE /api/sessions/ID, as a bastion's operator would end a user's session: every
    channel closes, the viewer is disconnected at once, each channel's close is recorded
    with the reason, and the proxy serves the next viewer."""
    thread, result = viewer_in_background(SpiceEndpoint(port=proxy.port), tmp_path / "client", 40)
    try:
        sid = wait_for_session(proxy, 5)["connectionId"]
        status, missing = api_call(proxy, "DELETE", f"/api/sessions/{sid ^ 1}")
        assert status == 404 and "no session" in missing["error"]
        status, ended = api_call(proxy, "DELETE", f"/api/sessions/{sid}")
        assert status == 200, ended
        assert ended["success"] is True and ended["open"] == []
        assert ended["connectionId"] == sid and len(ended["channels"]) >= 5
        _, after = api_call(proxy, "GET", "/api/sessions")
        assert sid not in [s["connectionId"] for s in after["sessions"]]
    finally:
        thread.join(60)
    (client,) = result
    events = client.summary["events"]
    opened = {e.removesuffix(" opened") for _, e in events if e.endswith(" opened")}
    closed = {e.removesuffix(" closed"): t for t, e in events if e.endswith(" closed")}
    # spice-gtk saw each channel closed at once, long before the end of its 40 s
    assert set(closed) == opened and max(closed.values()) < 20, events
    assert f"ending session {sid} (" in proxy.log()

    def ended_archive() -> Any:
        for archive in proxy.archives():
            closes = [r for r in iter_records(archive, []) if r.kind == "close"]
            if any(r.name == SESSION_ENDED for r in closes):
                return closes
        return None

    closes = wait_for(ended_archive, "the ended session's archive")
    assert [r.name for r in closes].count(SESSION_ENDED) == len(ended["channels"])
    # the next viewer is served as before
    again, out = viewer_in_background(SpiceEndpoint(port=proxy.port), tmp_path / "next", 6)
    again.join(60)
    said = (out[0].summary if out else None, plain_qemu.alive(), tail(plain_qemu.qemu_log))
    assert out and out[0].returncode == 0, (*said, proxy.log()[-3000:])


def test_a_locked_https_api_probes_qemu_for_the_token_only(
    plain_qemu: QemuServer, tmp_path: Path
) -> None:
    """--management-tls and --management-token-file on a real proxy: curl, trusting
    spicetap's CA, gets the probe's JSON with the token and 401 without; the token reaches
    neither the log nor the archive directory."""
    import ssl

    assert plain_qemu.port is not None
    token = "Tk-" + "0123456789abcdef" * 3
    token_file = tmp_path / "api-token"
    token_file.write_text(token + "\n")
    extra = (
        "--management", "127.0.0.1:0", "--management-tls",
        "--management-token-file", str(token_file),
    )  # fmt: skip
    with ProxyProcess(plain_qemu.port, tmp_path / "rec", tmp_path, extra=extra) as running:
        port = running.ports["management"]
        ca = tmp_path / "config" / "ca-cert.pem"
        url = f"https://127.0.0.1:{port}/api/spice/connect"
        body = json.dumps({"host": "127.0.0.1", "port": plain_qemu.port, "timeout": 5})

        def curl(*headers: str) -> tuple[int, str]:
            args = ["curl", "-sS", "--max-time", "20", "--cacert", str(ca), "-X", "POST"]
            for header in headers:
                args += ["-H", header]
            args += ["-d", body, "-w", "\n%{http_code}", url]
            done = subprocess.run(args, capture_output=True, text=True, timeout=30, check=False)
            assert done.returncode == 0, done.stderr
            text, _, code = done.stdout.rpartition("\n")
            return int(code), text

        status, answer = curl(f"Authorization: Bearer {token}")
        assert status == 200 and json.loads(answer)["success"] is True, (answer, plain_qemu.alive())
        assert json.loads(answer)["protocolVersion"] == "2.2"
        status, answer = curl()
        assert status == 401 and json.loads(answer) == {"error": "a bearer token is required"}
        status, _ = curl("Authorization: Bearer " + token[:-1] + "X")
        assert status == 401
        # plain HTTP to the HTTPS API gets no answer
        with pytest.raises((http.client.HTTPException, OSError)):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            try:
                conn.request("GET", "/metrics")
                conn.getresponse()
            finally:
                conn.close()
        # Python's own client, with the CA: the same answer
        context = ssl.create_default_context(cafile=str(ca))
        conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=10, context=context)
        conn.request("GET", "/metrics", headers={"Authorization": f"Bearer {token}"})
        assert conn.getresponse().status == 200
        conn.close()
    log = running.log_path.read_text()
    assert "request(s) refused" in log and token not in log
    for path in (tmp_path / "rec").rglob("*"):
        assert token.encode() not in path.read_bytes()
