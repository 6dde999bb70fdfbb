"""`spicetap import --sasl-user`: whom a capture's SASL logins were for, from a real
capture (QEMU with DIGEST-MD5, spice-gtk: the lab's), never the proof; none without it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dissectors.regen import LAB_CAPTURES
from spicetap.archive.sasllogins import SaslLogins
from spicetap.cli import main
from spicetap.inputs import iter_records
from spicetap.records import Record
from spicetap.show import iter_capture
from tests.conftest import require

CAPTURE = LAB_CAPTURES / "sasl-digest-md5.pcapng"
USER = b"spiceuser"  # the lab's SASL account


def imported(tmp_path: Path, *flags: str) -> Path:
    require(CAPTURE.is_file(), f"the lab's SASL capture at {CAPTURE}")
    out = tmp_path / f"import{len(flags)}.spta"
    assert main(["import", str(CAPTURE), "-o", str(out), *flags]) == 0
    return out


def proofs() -> list[bytes]:
    """The DIGEST-MD5 responses the viewer sent (RFC 2831's response=, the proof)."""
    found = []
    for rec in iter_capture(CAPTURE):
        if rec.kind == "link" and rec.name == "sasl" and b"response=" in rec.raw:
            found.append(rec.raw.split(b"response=", 1)[1].split(b",", 1)[0])
    return found


def test_each_channels_login_names_its_user_and_the_listing_finds_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = imported(tmp_path, "--sasl-user")
    capsys.readouterr()
    recs = list(iter_records(out, []))
    logins = [r for r in recs if r.kind == "auth" and r.name == "sasl_login"]
    opened = {r.connection for r in recs if r.kind == "link" and r.name == "link_mess"}
    assert {r.connection for r in logins} == opened and len(opened) == 10
    for login in logins:
        assert login.fields == {
            "sasl_mechanism": "DIGEST-MD5",
            "user": "spiceuser",
            "realm": "vm",
            "outcome": "accepted",
        }
    # each login after its connection's SASL result, before what the link does next
    for login in logins:
        mine = [r for r in recs if r.connection == login.connection]
        at = mine.index(login)
        assert mine[at - 1].kind == "link" and mine[at - 1].name == "sasl_result"
    exchange = [r for r in recs if r.kind == "link" and r.name == "sasl"]
    # the exchange is still kept as its lengths only
    assert exchange and all(not r.raw and getattr(r, "redacted", None) for r in exchange)
    data = out.read_bytes()
    assert proofs() and not any(proof in data for proof in proofs())
    assert main(["sessions", "--json", "--user", "spiceuser", str(out)]) == 0
    (listed,) = json.loads(capsys.readouterr().out)
    assert listed["users"] == ["spiceuser"] and "user" not in listed["session"]
    assert listed["policy"]["sasl"] == "the user name only"
    assert main(["sessions", "--json", "--user", "mallory", str(out)]) == 0
    assert json.loads(capsys.readouterr().out) == []


def test_without_the_option_no_name_is_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = imported(tmp_path)
    assert USER not in out.read_bytes()
    assert not [r for r in iter_records(out, []) if r.name == "sasl_login"]
    capsys.readouterr()
    assert main(["sessions", "--json", str(out)]) == 0
    (listed,) = json.loads(capsys.readouterr().out)
    assert listed["users"] == []


def _rec(conn: int, kind: str, name: str, direction: str = "c2s", **extra: object) -> Record:
    return Record(0.0, None, conn, "main", 0, direction, kind, None, name, b"", **extra)  # type: ignore[arg-type]


def test_refused_cut_and_unfinished_logins_name_no_user() -> None:
    logins = SaslLogins()
    said = []
    for conn, outcome_record in [
        (1, _rec(1, "link", "sasl_result", "s2c", fields={"error": "OK"})),
        (2, _rec(2, "link", "sasl_result", "s2c", fields={"error": "PERMISSION_DENIED"})),
        (3, _rec(3, "close", "fin")),
        (4, None),  # the capture ends inside the exchange
    ]:
        name = f"user{conn}".encode()
        for data in (b"PLAIN", b"\0" + name + b"\0secret"):  # u32 length, then the data
            step = _rec(conn, "link", "sasl")._replace(raw=len(data).to_bytes(4, "little") + data)
            assert logins.feed(step) is None
        if outcome_record is not None:
            said.append(logins.feed(outcome_record))
            assert logins.feed(outcome_record) is None  # said once
    said += logins.finish()
    assert [(r.connection, r.kind, r.name, r.direction) for r in said if r] == [
        (c, "auth", "sasl_login", "s2c") for c in (1, 2, 3, 4)
    ]
    outcomes = [(r.fields or {})["outcome"] for r in said if r]
    assert outcomes == ["accepted", "refused", "unfinished", "unfinished"]
    assert all((r.fields or {})["user"] == f"user{r.connection}" for r in said if r)
    assert logins.users == ["user1"]
    assert not any(b"secret" in repr(r.fields).encode() for r in said if r)
