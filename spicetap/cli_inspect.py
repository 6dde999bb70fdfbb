"""Inspector subcommands: show, stats, sessions, import, export, verify (archives and
captures)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from spicetap.about import ArchiveSeen, about, describe
from spicetap.archive.keys import load_or_create_signing_key, trusted_public_key
from spicetap.archive.privacy import PolicyError, PrivacyPolicy
from spicetap.capture.piped import is_piped, shown_name
from spicetap.errors import UserError, one_line
from spicetap.filter import FilterError, compile_filter
from spicetap.inputs import (
    AnyRecord,
    InputError,
    archive_file,
    check_input,
    is_archive,
    iter_records,
)
from spicetap.outputs import output_file
from spicetap.render import line, to_json, tree

WIDE = 220  # columns for tables written to a file or a pipe, not a terminal
VERIFY_EXIT = {"intact": 0, "truncated": 1, "tampered": 3}


@contextmanager
def progress(what: str, unit: str = "records") -> Iterator[Callable[[int], None]]:
    """A live counter on a terminal; silent otherwise (pipes, CI logs)."""
    console = Console(stderr=True)
    if not console.is_terminal:
        yield lambda _n: None
        return
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        TextColumn("{task.completed:,} " + unit),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as bar:
        task = bar.add_task(what, total=None)
        yield lambda n: bar.update(task, completed=n)


def _records(
    args: argparse.Namespace,
    problems: list[str],
    origin: list[float] | None = None,
    seen: ArchiveSeen | None = None,
) -> Iterator[AnyRecord]:
    """Records of the input that pass the filter; `origin` receives the time of the input's
    first record, which is where the filter's `time` and show's times count from; `seen`
    an archive's header and end record."""
    flt = None
    if getattr(args, "filter", None) is not None:  # -f '' is an empty filter, refused
        try:
            flt = compile_filter(args.filter)
        except FilterError as exc:
            raise UserError(str(exc)) from None
    t0: float | None = None
    try:
        for rec in iter_records(Path(args.input), problems, seen):
            if t0 is None:
                t0 = rec.time
                if origin is not None:
                    origin.append(t0)
            if flt is None or flt.matches(rec, t0):
                yield rec
    except InputError as exc:
        raise UserError(str(exc)) from None


def _report(problems: list[str]) -> None:
    for p in problems:
        print(one_line(f"spicetap: warning: {p}"), file=sys.stderr)


def cmd_show(args: argparse.Namespace) -> int:
    out = sys.stdout
    problems: list[str] = []
    origin: list[float] = []
    live = is_piped(Path(args.input))  # each message out as it comes, even into a pipe
    try:
        for rec in _records(args, problems, origin):
            t0 = origin[0]
            if args.json:
                out.write(to_json(rec) + "\n")
            elif args.verbose:
                out.write("\n".join(tree(rec, t0)) + "\n")
            else:
                out.write(line(rec, t0) + "\n")
            if live:
                out.flush()
    except BrokenPipeError:  # `spicetap show x | head`
        sys.stderr.close()
        return 0
    _report(problems)
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    from spicetap.stats import Stats

    problems: list[str] = []
    stats = Stats()
    seen = ArchiveSeen()
    with progress("reading") as tick:
        for i, rec in enumerate(_records(args, problems, seen=seen)):
            stats.add(rec)
            if i % 4096 == 0:
                tick(i)
    _report(problems)
    data = {"archive": about(seen), **stats.to_dict()}
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    console = Console()
    cov = data["coverage"]
    console.print(
        f"[b]{escape(args.input)}[/b]: {data['duration']:.3f} s, {data['connections']} "
        f"connections, sessions {data['sessions']}, records {data['records']}"
    )
    if data["archive"] is not None:
        for text in describe(data["archive"]):
            console.print(text, markup=False, highlight=False, soft_wrap=True)  # one line
    table = Table("channel", "dir", "message", "count", "bytes", "msg/s", "KB/s")
    for channel, info in data["channels"].items():
        for m in info["messages"]:
            table.add_row(
                channel,
                m["direction"],
                m["name"],
                f"{m['count']:,}",
                f"{m['bytes']:,}",
                f"{m['per_s']:.1f}",
                f"{m['bytes_per_s'] / 1e3:.1f}",
            )
    console.print(table)
    console.print(
        f"coverage: {cov['message_types_seen']} message types seen of "
        f"{cov['message_types_known_in_these_channels']} known in these channels "
        f"({cov['message_types_known']} in all); not fully dissected: "
        f"{cov['not_fully_dissected']}; errors: {cov['errors']}"
    )
    return 0


def policy_from(args: argparse.Namespace, base: PrivacyPolicy | None = None) -> PrivacyPolicy:
    """The privacy switches given on the command line, over `base` (e.g. a config file)."""
    base = base or PrivacyPolicy()
    try:
        return PrivacyPolicy(
            # `--keys ''` is a value given, refused as `--keys ' '` is, not the default
            keys=base.keys if args.keys is None else args.keys,
            clipboard=base.clipboard if args.clipboard is None else args.clipboard,
            files=base.files if args.files is None else args.files,
            display=base.display and not args.no_display,
            audio=base.audio and not args.no_audio,
            sasl_user=base.sasl_user or bool(getattr(args, "sasl_user", False)),  # proxy, import
        )
    except PolicyError as exc:
        raise UserError(str(exc)) from None


def cmd_import(args: argparse.Namespace) -> int:
    from spicetap.archive.importer import import_capture
    from spicetap.capture import CaptureError

    out = Path(args.output)
    try:
        check_input(Path(args.input))
    except InputError as exc:
        raise UserError(str(exc)) from None
    try:
        key = load_or_create_signing_key()
    except (OSError, ValueError) as exc:
        raise UserError(f"signing key: {exc}") from None
    try:
        with output_file(out, Path(args.input)) as partial:
            with progress(f"importing {args.input}") as tick:
                result = import_capture(
                    Path(args.input),
                    partial,
                    policy=policy_from(args),
                    signing_key=key,
                    compress=args.compress,
                    progress=tick,
                )
            _report(result.problems)
            if not result.records:  # nothing was written: no archive either
                raise UserError(f"{args.input}: no SPICE traffic found")
    except CaptureError as exc:
        raise UserError(str(exc)) from None
    print(
        f"{out}: {result.records} records, sessions {result.sessions}"
        + (f", {result.dropped} left out by the privacy policy" if result.dropped else "")
    )
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from spicetap.archive.verify import verify

    trusted = None
    if args.key:
        try:
            key = serialization.load_pem_public_key(Path(args.key).read_bytes())
        except (OSError, ValueError) as exc:
            raise UserError(f"{args.key}: not a PEM public key ({exc})") from None
        if not isinstance(key, Ed25519PublicKey):
            raise UserError(f"{args.key}: not an Ed25519 public key")
        trusted = key
    else:
        try:
            trusted = trusted_public_key()
        except ValueError as exc:
            raise UserError(str(exc)) from None
    worst = 0
    for name in args.archives:
        path = Path(name)
        try:
            check_input(path)
        except InputError as exc:
            raise UserError(str(exc)) from None
        if not is_piped(path) and not is_archive(path):  # a capture, say: not tampered with
            raise UserError(f"{path}: not a spicetap archive")
        try:
            with archive_file(path) as readable:  # a pipe's, copied
                verdict = verify(readable, trusted)
        except InputError as exc:
            raise UserError(str(exc)) from None
        print(one_line(verdict.line(Path(shown_name(path)))))
        worst = max(worst, VERIFY_EXIT[verdict.status])
    return worst


def cmd_sessions(args: argparse.Namespace) -> int:
    from spicetap.about import row
    from spicetap.listing import ListingError, archive_files, matches, summary

    try:
        paths = archive_files(Path(p) for p in args.paths)
    except OSError as exc:
        raise UserError(str(exc)) from None
    problems: list[str] = []
    found: list[tuple[float, dict[str, Any]]] = []
    with progress("listing", "archives") as tick:
        for i, path in enumerate(paths):
            tick(i + 1)
            try:
                started, info = summary(path)
            except ListingError as exc:
                problems.append(f"{exc}: skipped")
                continue
            if matches(info, args.user):
                found.append((started, info))
    _report(problems)
    found.sort(key=lambda item: item[0])
    listed = [info for _started, info in found]
    if args.json:
        print(json.dumps(listed, indent=2))
        return 0
    table = Table()
    for title in ("started", "session", "user", "viewer", "route", "ended", "archive"):
        table.add_column(title, overflow="fold")  # whole values, never cut with "…"
    for info in listed:
        table.add_row(*(escape(one_line(text)) for text in row(info)))
    console = Console()
    if not console.is_terminal:  # a file or a pipe: lines as long as the values
        console = Console(width=WIDE)
    console.print(table)
    print(f"{len(listed)} of {len(paths)} archives" + (f" (user {args.user})" if args.user else ""))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from spicetap.export import export_json, export_pcap

    problems: list[str] = []
    records = _records(args, problems)
    out = Path(args.output)
    with (
        output_file(out, Path(args.input)) as partial,
        progress(f"exporting {args.format}") as tick,
    ):
        if args.format == "pcap":
            streams: list[str] = []  # about the streams written: the input names them
            n = export_pcap(records, partial, tick, streams)
            problems += [f"{args.input}: {p}" for p in streams]
        else:
            n = export_json(records, partial, tick)
    _report(problems)
    print(f"{out}: {n} records")
    return 0


def add_commands(sub: Any) -> None:
    def inputs(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "input", help="an archive (.spta) or a pcap/pcapng capture; - reads standard input"
        )
        p.add_argument("-f", "--filter", help="only records matching this filter expression")

    p = sub.add_parser("show", help="print the SPICE messages of an archive or a capture")
    inputs(p)
    p.add_argument("-V", "--verbose", action="store_true", help="full field tree per message")
    p.add_argument("--json", action="store_true", help="one JSON object per message")
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("stats", help="counts, bytes, rates and dissection coverage")
    inputs(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser(
        "sessions",
        help="list recorded sessions: when, whose, from where, to what, how they ended",
    )
    p.add_argument(
        "paths", nargs="+", metavar="PATH", help="archives, or folders to search for them"
    )
    p.add_argument(
        "--user",
        help="only sessions of this user (a token's under inject, a SASL login's with "
        "--sasl-user)",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_sessions)

    p = sub.add_parser("import", help="convert a pcap/pcapng capture into an archive")
    p.add_argument("input", help="a .pcap or .pcapng capture; - reads standard input")
    p.add_argument("-o", "--output", required=True, help="the archive to write (.spta)")
    p.add_argument("--compress", action="store_true", help="zstd-compress the archive")
    add_privacy_options(p)
    p.add_argument(
        "--sasl-user",
        action="store_true",
        help="read from SASL logins the user name each viewer gave (never its password) "
        "and record it",
    )
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("export", help="export an archive or capture as pcapng or JSON lines")
    p.add_argument("format", choices=("pcap", "json"))
    inputs(p)
    p.add_argument("-o", "--output", required=True, help="the file to write")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("verify", help="check archives: intact, truncated, or tampered")
    p.add_argument(
        "archives", nargs="+", help="archives (.spta); - reads one from standard input"
    )
    p.add_argument("--key", help="trusted Ed25519 public key (PEM); default: the config dir's")
    p.set_defaults(func=cmd_verify)


def add_privacy_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("privacy (what the archive keeps; tickets and passwords never)")
    g.add_argument("--keys", help="text | events | none (default text)")
    g.add_argument("--clipboard", help="content | hash (default content)")
    g.add_argument("--files", help="content | metadata (default content)")
    g.add_argument("--no-display", action="store_true", help="drop display pixel data")
    g.add_argument("--no-audio", action="store_true", help="drop audio samples")
