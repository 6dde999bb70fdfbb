"""The proxies the proxy benchmark compares, started and stopped by their own PIDs, and
what /proc says about them (resident memory, CPU time, listening sockets).

Every proxy listens on 127.0.0.1 and forwards to the fake SPICE server, plain or with TLS
on both legs, all certificates issued by one throwaway test CA:
- socat: one process per connection (fork), 256 KiB blocks like spicetap's receive size
  (socat's default is 8 KiB), TCP_NODELAY on both legs like the others;
- haproxy: tcp mode, its default threads (one per CPU: spicetap forwards on a thread per
  channel direction), default buffers, generated config in the work directory;
- mitmproxy (mitmdump): reverse mode, tcp:// (or tls:// for TLS on both legs), recording
  every flow to a file with -w, -q so the terminal costs it nothing;
- spicetap: `spicetap proxy --listen|--tls-listen ... --record DIR`, full dissection and
  signed archives, with its own config directory (signing key) in the work directory;
- spicetap-norecord (only when asked for): the same without --record, to tell the cost of
  forwarding from the cost of recording.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from proxy.tls import issue_server_cert, load_or_create_ca

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
SERVER_SUBJECT = "O=spicetap-bench,CN=server"
PROXY_SUBJECT = "O=spicetap-bench,CN=proxy"
START_TIMEOUT = 60.0  # seconds for a proxy to listen
STOP_TIMEOUT = 600.0  # spicetap drains its recorder on SIGINT: a long backlog takes a while
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
SOCAT_BLOCK = 256 * 1024


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path  # the fake SPICE server's chain and key
    server_key: Path
    proxy_cert: Path  # what every proxy presents to the viewer
    proxy_key: Path
    proxy_pem: Path  # chain and key in one file (haproxy, socat, mitmproxy)


def make_pki(folder: Path) -> Pki:
    ca = load_or_create_ca(folder / "ca")
    names = [HOST, "localhost"]
    server_cert, server_key = issue_server_cert(ca, SERVER_SUBJECT, names, folder / "server")
    proxy_cert, proxy_key = issue_server_cert(ca, PROXY_SUBJECT, names, folder / "proxy")
    proxy_pem = folder / "proxy" / "chain-and-key.pem"
    proxy_pem.write_bytes(proxy_cert.read_bytes() + proxy_key.read_bytes())
    return Pki(ca.cert_path, server_cert, server_key, proxy_cert, proxy_key, proxy_pem)


@dataclass
class RunningProxy:
    name: str
    port: int  # where the viewer connects
    proc: subprocess.Popen[bytes] | None = None
    record_dir: Path | None = None  # spicetap's archives
    flows: Path | None = None  # mitmproxy's flow file
    log: Path | None = None

    @property
    def pids(self) -> list[int]:
        """The proxy and every process it forked (socat forks one per connection)."""
        return [] if self.proc is None else process_tree(self.proc.pid)


def mitmdump_path() -> str | None:
    local = ROOT / "bench" / ".venv" / "bin" / "mitmdump"  # installed by bench/setup
    return str(local) if local.exists() else shutil.which("mitmdump")


def available(name: str) -> str | None:
    """None when the proxy can run here, else what is missing."""
    if name in ("direct", "spicetap", "spicetap-norecord"):
        return None
    if name == "mitmproxy":
        return None if mitmdump_path() else "mitmdump (run bench/setup)"
    return None if shutil.which(name) else f"{name} (run bench/setup)"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def start_proxy(name: str, tls: bool, upstream: int, work: Path, pki: Pki) -> RunningProxy:
    """Start `name` forwarding to 127.0.0.1:upstream; returns once it listens."""
    if name == "direct":
        return RunningProxy(name, upstream)
    work.mkdir(parents=True, exist_ok=True)
    log = work / f"{name}.log"
    if name.startswith("spicetap"):
        return _start_spicetap(tls, upstream, work, pki, log, record=name == "spicetap")
    port = free_port()
    flows = None
    if name == "socat":
        if tls:
            listen = f"OPENSSL-LISTEN:{port},cert={pki.proxy_pem},verify=0"
            connect = f"OPENSSL:{HOST}:{upstream},cafile={pki.ca},verify=1,commonname={HOST}"
        else:
            listen, connect = f"TCP-LISTEN:{port}", f"TCP:{HOST}:{upstream}"
        argv = [
            "socat",
            "-b",
            str(SOCAT_BLOCK),
            f"{listen},bind={HOST},fork,reuseaddr,nodelay,backlog=512",
            f"{connect},nodelay",
        ]
    elif name == "haproxy":
        config = work / "haproxy.cfg"
        config.write_text(_haproxy_config(tls, port, upstream, pki))
        argv = ["haproxy", "-db", "-f", str(config)]
    elif name == "mitmproxy":
        flows = work / "flows.mitm"
        scheme = "tls" if tls else "tcp"
        argv = [
            mitmdump_path() or "mitmdump",
            "-q",
            "--mode",
            f"reverse:{scheme}://{HOST}:{upstream}@{HOST}:{port}",
            "-w",
            str(flows),
            "--set",
            f"confdir={work / 'mitmproxy-conf'}",
        ]
        if tls:
            argv += ["--set", f"certs=*={pki.proxy_pem}"]
            argv += ["--set", f"ssl_verify_upstream_trusted_ca={pki.ca}"]
    else:
        raise ValueError(f"unknown proxy {name}")
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=work)
    running = RunningProxy(name, port, proc, flows=flows, log=log)
    deadline = time.monotonic() + START_TIMEOUT
    while not listening(port):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_proxy(running)
            raise RuntimeError(f"{name} did not start: {log.read_text(errors='replace')[-800:]}")
        time.sleep(0.05)
    return running


def _haproxy_config(tls: bool, port: int, upstream: int, pki: Pki) -> str:
    bind_tls = f" ssl crt {pki.proxy_pem}" if tls else ""
    server_tls = f" ssl verify required ca-file {pki.ca}" if tls else ""
    return f"""global
    maxconn 4096
    log stderr format short local0 emerg

defaults
    mode tcp
    timeout connect 10s
    timeout client 10m
    timeout server 10m

frontend viewers
    bind {HOST}:{port}{bind_tls}
    default_backend spice

backend spice
    server spice {HOST}:{upstream}{server_tls}
"""


BULK_BACKLOG_MB = 1536


def _start_spicetap(
    tls: bool, upstream: int, work: Path, pki: Pki, log: Path, record: bool
) -> RunningProxy:
    archives = work / "archives" if record else None
    argv = [sys.executable, "-m", "spicetap", "proxy"]
    if archives is not None:
        # A bulk transfer is a 1 GiB burst at full speed: on 2 cores shared with both
        # endpoints the recording process catches up after it, so the burst waits in the
        # proxy's backlog (the default bound, 512 MiB, would mark a gap in it). The bulk
        # peak MB column shows what that memory cost.
        argv += ["--record", str(archives), "--max-backlog", str(BULK_BACKLOG_MB)]
    if tls:
        argv += ["--tls-listen", f"{HOST}:0", "--upstream-tls", f"{HOST}:{upstream}"]
        argv += ["--upstream-ca", str(pki.ca), "--upstream-host-subject", SERVER_SUBJECT]
        argv += ["--tls-cert", str(pki.proxy_cert), "--tls-key", str(pki.proxy_key)]
    else:
        argv += ["--listen", f"{HOST}:0", "--upstream", f"{HOST}:{upstream}"]
    env = {**os.environ, "SPICETAP_CONFIG_DIR": str(work / "spicetap-config")}
    with log.open("wb") as err:
        # unbuffered: select() then sees every line (a buffered reader would hide the
        # second line in its buffer when both arrive together)
        proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=err, env=env, cwd=ROOT, bufsize=0
        )
    name = "spicetap" if record else "spicetap-norecord"
    running = RunningProxy(name, 0, proc, record_dir=archives, log=log)
    assert proc.stdout is not None
    deadline = time.monotonic() + START_TIMEOUT
    for _ in range(16):  # one line per listener, then "spicetap proxy ready"
        ready, _w, _x = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
        line = proc.stdout.readline().decode() if ready else ""
        if line.startswith("spicetap proxy listening ("):
            running.port = int(line.rsplit(":", 1)[1])
        elif line.startswith("spicetap proxy ready") and running.port:
            return running
        else:
            break
    stop_proxy(running)
    raise RuntimeError(f"spicetap did not start: {log.read_text(errors='replace')[-800:]}")


def stop_proxy(running: RunningProxy) -> int | None:
    """SIGINT for the recorders (spicetap closes and signs its archives, mitmdump writes
    its flows), SIGTERM for the others; then whatever the proxy forked, by PID."""
    proc = running.proc
    if proc is None:
        return None
    forked = [pid for pid in running.pids if pid != proc.pid]
    if proc.poll() is None:
        recorder = running.name.startswith("spicetap") or running.name == "mitmproxy"
        proc.send_signal(signal.SIGINT if recorder else signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT if recorder else 10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    for pid in forked:  # socat's per-connection children end with their connections
        _stop_forked(pid, running.name)
    if proc.stdout is not None:
        proc.stdout.close()
    return proc.returncode


def _stop_forked(pid: int, name: str) -> None:
    deadline = time.monotonic() + 5
    while _comm(pid) == name and time.monotonic() < deadline:
        time.sleep(0.05)
    if _comm(pid) == name:  # still ours (same program) after 5 s: end it
        os.kill(pid, signal.SIGTERM)


def _comm(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return None


# -- /proc ----------------------------------------------------------------------------------
def process_tree(pid: int) -> list[int]:
    pids: list[int] = []
    todo = [pid]
    while todo and len(pids) < 10_000:
        current = todo.pop()
        pids.append(current)
        try:  # a forked child (socat's) may exit while it is looked at
            tasks = list(Path(f"/proc/{current}/task").glob("*/children"))
        except OSError:
            continue
        for task in tasks:
            try:
                todo += [int(p) for p in task.read_text().split()]
            except OSError:
                continue
    return pids


def rss_bytes(pids: list[int], field: str = "VmRSS") -> int:
    """VmRSS summed over the processes (a forking proxy's children included); with
    field="VmHWM", each process's peak so far."""
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith(f"{field}:"):
                    total += int(line.split()[1]) * 1024
                    break
        except OSError:
            continue
    return total


def pss_bytes(pids: list[int]) -> int:
    """Proportional set size summed over the processes: shared pages (libc, libssl) count
    once in all, where summing VmRSS over socat's forked children counts them per child."""
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
                    break
        except OSError:
            continue
    return total


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of the processes, from /proc/PID/stat; for the first (the
    proxy itself) also that of its children already gone (socat's, per connection)."""
    ticks = 0
    for index, pid in enumerate(pids):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)"
        ticks += int(fields[11]) + int(fields[12])  # utime, stime
        if index == 0:
            ticks += int(fields[13]) + int(fields[14])  # cutime, cstime: reaped children
    return ticks / CLOCK_TICKS


def wait_quiet(running: RunningProxy, window: float = 0.1, limit: float = 600.0) -> float:
    """Seconds the proxy kept working after the viewer had everything: until its CPU time
    grows by at most two clock ticks (20 ms) in `window` (a busy thread takes all 10:
    spicetap's recorder catching up, mitmdump writing a flow). Bounded by `limit`."""
    if running.proc is None:
        return 0.0
    start = time.monotonic()
    before = cpu_seconds(running.pids)
    while time.monotonic() - start < limit:
        time.sleep(window)
        now = cpu_seconds(running.pids)
        if now - before <= 2 / CLOCK_TICKS:
            return max(0.0, time.monotonic() - start - window)
        before = now
    return time.monotonic() - start


def listening(port: int) -> bool:
    """Whether something listens on 127.0.0.1:port (from /proc/net/tcp: no connection is
    made, so no proxy forwards a probe to the server)."""
    wanted = f"0100007F:{port:04X}"
    try:
        lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
    except OSError:
        return False
    return any(line.split()[1] == wanted and line.split()[3] == "0A" for line in lines)
