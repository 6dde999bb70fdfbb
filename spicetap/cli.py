"""The `spicetap` command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from spicetap import __version__, interrupts
from spicetap.errors import UserError, one_line, os_error_line


def _regen(args: argparse.Namespace) -> int:
    from dissectors import regen
    from dissectors.protolang.lexer import ProtoError

    proto = Path(args.proto) if args.proto else regen.default_proto()
    if proto is None:
        raise UserError("no spice.proto found: give --proto PATH (or set SPICETAP_PROTO)")
    if not proto.is_file():
        raise UserError(f"{proto}: no such file")
    try:
        if args.check:
            stale = regen.stale(proto)
            for path in stale:
                print(f"stale: {path} (run `spicetap regen --proto {proto}`)", file=sys.stderr)
            if not stale:
                print(f"generated dissectors are current with {proto}")
            return 1 if stale else 0
        written = regen.write(proto)
    except ProtoError as exc:
        raise UserError(str(exc)) from None
    except UnicodeDecodeError as exc:
        raise UserError(f"{proto}: not a text file ({exc.reason})") from None
    for path in written:
        print(f"wrote {path}")
    if not written:
        print("generated dissectors were already current")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line like every other user error (argparse prints
    the whole usage block first); subcommands' parsers are made of this class too."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, one_line(f"{self.prog}: error: {message} (see {self.prog} --help)") + "\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="spicetap", description="Recording and inspecting proxy for SPICE.")
    parser.add_argument("--version", action="version", version=f"spicetap {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("regen", help="regenerate the dissectors from spice.proto")
    p.add_argument("--proto", help="path of spice.proto (default: the reference copy)")
    p.add_argument("--check", action="store_true", help="fail if the committed output is stale")
    p.set_defaults(func=_regen)

    from proxy.cli import add_proxy_command
    from proxy.probe_cli import add_probe_command
    from proxy.vv import add_vv_command
    from spicetap.cli_inspect import add_commands
    from spicetap.demo.cli import add_demo_command

    add_commands(sub)
    add_proxy_command(sub)
    add_probe_command(sub)
    add_vv_command(sub)
    add_demo_command(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        with interrupts.kept():
            with interrupts.deferred():  # imports much: Ctrl-C may come meanwhile
                args = build_parser().parse_args(argv)
            if interrupts.swallowed():
                raise KeyboardInterrupt
            result: int = args.func(args)
        return result
    except UserError as exc:
        print(one_line(f"spicetap: error: {exc}"), file=sys.stderr)
        return 2
    except OSError as exc:  # a path given (or the config directory) that cannot be used
        print(one_line(f"spicetap: error: {os_error_line(exc)}"), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
