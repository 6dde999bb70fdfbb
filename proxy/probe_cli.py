"""`spicetap probe HOST PORT`: is there a SPICE server, which version, which capabilities,
and does it take this password? Exit status 0 when the link completes, 1 when the target
fails (one line saying why), 2 for bad options."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import trio

from proxy.core.probe import check_password, summary, to_json
from proxy.io.probe import ProbeTarget, probe
from proxy.tls import TlsSetupError, client_context, parse_subject
from spicetap.errors import UserError


def add_probe_command(sub: Any) -> None:
    p = sub.add_parser(
        "probe",
        help="link to a SPICE server's main channel and report version, capabilities, auth",
        description="Link to HOST:PORT as a SPICE client would. Success means a viewer would "
        "be admitted: with --password, the server accepted it; without, the server needs "
        "none. A server that wants a password still shows its version and capabilities.",
    )
    p.add_argument("host", help="the server's name or address")
    p.add_argument("port", help="its SPICE port (QEMU's -spice port= or, with --tls, tls-port=)")
    p.add_argument("--tls", action="store_true", help="connect with TLS (QEMU's tls-port)")
    p.add_argument("--ca", help="CA file that signed the server's certificate (with --tls)")
    p.add_argument(
        "--host-subject",
        help="subject the server's certificate must have, e.g. 'C=XX,O=Example,CN=host'",
    )
    p.add_argument(
        "--insecure", action="store_true", help="with --tls: do not check the certificate"
    )
    secret = p.add_mutually_exclusive_group()
    secret.add_argument(
        "--password", help="authenticate with it (other local users can see it: prefer a file)"
    )
    secret.add_argument("--password-file", help="read the password from this file's first line")
    p.add_argument(
        "--full-link",
        action="store_true",
        help="authenticate on the main channel itself, as a viewer does; spice-server then "
        "DISCONNECTS the viewer connected now (default: check the password on an inputs "
        "channel, which disturbs nobody)",
    )
    p.add_argument("--timeout", default="5", help="seconds for the whole probe (default 5)")
    p.add_argument("--json", action="store_true", help="answer in JSON")
    p.set_defaults(func=cmd_probe)


def _target(args: argparse.Namespace) -> ProbeTarget:
    digits = args.port.isascii() and args.port.isdigit()  # isdigit() alone takes "²"
    if not digits or not 1 <= int(args.port) < 65536:
        raise UserError(f"port {args.port!r}: expected a number from 1 to 65535")
    if not args.host.strip():
        raise UserError("host: empty")
    try:
        timeout = float(args.timeout)
    except ValueError:
        timeout = math.nan
    if not (math.isfinite(timeout) and timeout > 0):
        raise UserError(f"--timeout {args.timeout!r}: expected a number of seconds above 0")
    if not args.tls and (args.ca or args.host_subject or args.insecure):
        raise UserError("--ca, --host-subject and --insecure go with --tls")
    if args.insecure and (args.ca or args.host_subject):
        raise UserError("--insecure checks nothing: it excludes --ca and --host-subject")
    try:
        if args.host_subject:
            parse_subject(args.host_subject)  # only to refuse a malformed one up front
    except TlsSetupError as exc:
        raise UserError(f"--host-subject: {exc}") from None
    password = args.password
    if args.password_file:
        try:
            lines = Path(args.password_file).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"--password-file {args.password_file}: {exc}") from None
        password = lines[0] if lines else ""
    problem = check_password(password)
    if problem is not None:
        raise UserError(problem)
    context = None
    if args.ca and not Path(args.ca).is_file():
        what = "not a file" if Path(args.ca).exists() else "no such file"
        raise UserError(f"--ca {args.ca}: {what}")
    if args.tls:
        try:
            context = client_context(Path(args.ca) if args.ca else None, args.insecure, None)
        except TlsSetupError as exc:
            raise UserError(str(exc)) from None
    return ProbeTarget(
        args.host.strip("[]"),
        int(args.port),
        password=password,
        tls=context,
        host_subject=args.host_subject,
        timeout=timeout,
        full_link=args.full_link,
    )


def cmd_probe(args: argparse.Namespace) -> int:
    target = _target(args)
    outcome = trio.run(probe, target)
    if args.json:
        print(json.dumps(to_json(target.host, target.port, outcome)))
    else:
        print(summary(target.host, target.port, outcome))
    return 0 if outcome.success else 1
