"""The probe's sans-I/O core against in-memory server answers: every outcome class, the
ticket's encryption, the JSON and human answers."""

from __future__ import annotations

import struct

import pytest
import trio
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from dissectors.api import LINK
from proxy.core.framing import C2S, S2C, ChannelFramer, LinkUnit
from proxy.core.probe import (
    AUTH_FAILED,
    INPUTS,
    INVALID_MAGIC,
    LinkProbe,
    ProbeOutcome,
    cap_names,
    combine,
    failure,
    summary,
    to_json,
)

KEY = rsa.generate_private_key(public_exponent=65537, key_size=1024)
DER = KEY.public_key().public_bytes(
    serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
)
COMMON = 0b1111  # auth selection, spice, sasl, mini header
MAIN_CAPS = 0b1111
OK = struct.pack("<I", 0)
DENIED = struct.pack("<I", 7)


def reply(
    common: int = COMMON, main: int = MAIN_CAPS, error: int = 0, minor: int = 2, major: int = 2
) -> bytes:
    body = LINK.encode_struct(
        "LinkReply",
        {
            "error": error,
            "pub_key": DER if not error else bytes(162),
            "num_common_caps": 1,
            "num_channel_caps": 1,
            "caps_offset": 178,
            "common_caps": [common],
            "channel_caps": [main],
        },
    )
    return struct.pack("<4sIII", b"REDQ", major, minor, len(body)) + body


def decrypt(ticket: bytes) -> bytes:
    sha1 = hashes.SHA1()
    return KEY.decrypt(ticket, padding.OAEP(mgf=padding.MGF1(sha1), algorithm=sha1, label=None))


def run(probe: LinkProbe, *answers: bytes) -> list[bytes]:
    """Feed each server answer; returns what the probe sent after each."""
    return [probe.receive_data(a) for a in answers]


def test_link_message_is_a_modern_clients_main_channel_link() -> None:
    framer = ChannelFramer()
    units = framer.feed(C2S, LinkProbe(None).initial_bytes())
    assert [u.kind for u in units if isinstance(u, LinkUnit)] == ["header", "link_mess"]
    assert framer.channel_type == LINK.enum_names["channel_type"]["MAIN"]
    assert (framer.connection_id, framer.channel_id) == (0, 0)
    assert framer.client_common == (0b1011,)  # auth selection, auth spice, mini header
    assert framer.client_channel == (0b1111,)  # every main-channel capability


def test_password_is_encrypted_with_the_servers_key_and_sent_after_auth_selection() -> None:
    probe = LinkProbe("s3cret")
    framer = ChannelFramer()
    framer.feed(C2S, probe.initial_bytes())
    (sent,) = run(probe, reply())
    assert sent[:4] == struct.pack("<I", 1)  # SPICE_COMMON_CAP_AUTH_SPICE
    assert len(sent) == 4 + 128
    assert decrypt(sent[4:]) == b"s3cret\0"
    framer.feed(S2C, reply())
    kinds = [u.kind for u in framer.feed(C2S, sent) if isinstance(u, LinkUnit)]
    assert kinds == ["auth_mechanism", "ticket"]  # what the proxy's own framer expects
    assert not probe.done
    run(probe, OK)
    assert probe.outcome == ProbeOutcome(
        None, "password accepted", 2, 2, (COMMON,), (MAIN_CAPS,), caps_read=True
    )


def test_without_a_password_the_empty_one_is_sent() -> None:
    probe = LinkProbe(None)
    (sent, _) = run(probe, reply(), OK)
    assert decrypt(sent[4:]) == b"\0"
    assert probe.outcome is not None and probe.outcome.success
    assert probe.outcome.detail == "no password needed"


def test_success_json_has_exactly_the_documented_keys() -> None:
    probe = LinkProbe("pw")
    run(probe, reply(minor=2), OK)
    assert probe.outcome is not None
    answer = to_json("127.0.0.1", 5930, probe.outcome)
    assert answer == {
        "success": True,
        "host": "127.0.0.1",
        "port": 5930,
        "protocolVersion": "2.2",
        "majorVersion": 2,
        "minorVersion": 2,
        "capabilities": [
            "PROTOCOL_AUTH_SELECTION",
            "AUTH_SPICE",
            "AUTH_SASL",
            "MINI_HEADER",
            "SEMI_SEAMLESS_MIGRATE",
            "NAME_AND_UUID",
            "AGENT_CONNECTED_TOKENS",
            "SEAMLESS_MIGRATE",
        ],
        "authMethods": ["spice", "sasl"],
    }


def test_answer_split_into_single_bytes() -> None:
    probe = LinkProbe("pw")
    sent = b"".join(probe.receive_data(bytes([b])) for b in reply())
    assert len(sent) == 132
    for b in OK:
        probe.receive_data(bytes([b]))
    assert probe.outcome is not None and probe.outcome.success


def test_wrong_password_is_authentication_failed() -> None:
    probe = LinkProbe("wrong")
    run(probe, reply(), DENIED)
    assert probe.outcome is not None
    assert probe.outcome.error == AUTH_FAILED and probe.outcome.detail == "wrong password"
    assert to_json("h", 1, probe.outcome) == {
        "success": False,
        "host": "h",
        "port": 1,
        "error": "Authentication failed",
        "detail": "wrong password",
    }


def test_password_protected_server_probed_without_one_still_shows_what_it_is() -> None:
    probe = LinkProbe(None)
    run(probe, reply(), DENIED)
    outcome = probe.outcome
    assert outcome is not None and outcome.error == AUTH_FAILED
    assert "none was given" in outcome.detail
    text = summary("h", 5900, outcome)
    assert text.splitlines()[0].startswith("h:5900: SPICE 2.2, Authentication failed")
    assert "AUTH_SPICE" in text


@pytest.mark.parametrize(
    ("code", "error"),
    [(5, "Link error: NEED_SECURED"), (6, "Link error: NEED_UNSECURED"), (42, "Link error: 42")],
)
def test_link_errors_in_the_reply_are_named(code: int, error: str) -> None:
    probe = LinkProbe("pw")
    assert run(probe, reply(error=code)) == [b""]
    assert probe.outcome is not None and probe.outcome.error == error
    assert "capabilities" not in summary("h", 1, probe.outcome)  # a refused reply has none


def test_other_result_codes_are_named() -> None:
    probe = LinkProbe(None)
    run(probe, reply(), struct.pack("<I", 8))
    assert probe.outcome is not None and probe.outcome.error == "Link error: BAD_CONNECTION_ID"


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 400 Bad Request\r\n\r\n",
        b"SSH-2.0-OpenSSH_9.2\r\n",
        bytes.fromhex("15030300020246") + bytes(9),  # a TLS alert, as a TLS port answers
    ],
)
def test_anything_but_redq_is_invalid_magic(answer: bytes) -> None:
    probe = LinkProbe(None)
    probe.receive_data(answer)
    assert probe.outcome is not None and probe.outcome.error == INVALID_MAGIC
    assert summary("h", 1, probe.outcome).count("\n") == 0  # one line


@pytest.mark.parametrize("cut", [0, 3, 16, 100])
def test_a_peer_closing_before_the_reply_is_complete_is_invalid_magic(cut: int) -> None:
    probe = LinkProbe(None)
    run(probe, reply()[:cut] if cut else b"")
    if not probe.done:
        run(probe, b"")
    assert probe.outcome is not None and probe.outcome.error == INVALID_MAGIC


def test_a_server_closing_after_the_ticket_is_a_generic_link_error() -> None:
    probe = LinkProbe("pw")
    run(probe, reply(), b"")
    assert probe.outcome is not None and probe.outcome.error == "Link error: ERROR"


def test_malformed_replies() -> None:
    huge = struct.pack("<4sIII", b"REDQ", 2, 2, 1 << 30)
    probe = LinkProbe(None)
    probe.receive_data(huge)
    assert probe.outcome is not None and probe.outcome.error == INVALID_MAGIC
    body = bytearray(reply()[16:])
    struct.pack_into("<I", body, 166, 50)  # num_common_caps points past the end
    probe = LinkProbe(None)
    probe.receive_data(reply()[:16] + bytes(body))
    assert probe.outcome is not None and "outside" in probe.outcome.detail
    bad_key = bytearray(reply())
    bad_key[16 + 4 : 16 + 4 + 162] = bytes(162)
    probe = LinkProbe(None)
    probe.receive_data(bytes(bad_key))
    assert probe.outcome is not None and probe.outcome.error == INVALID_MAGIC


def test_another_major_version_is_a_version_mismatch() -> None:
    probe = LinkProbe(None)
    probe.receive_data(reply(major=1))
    assert probe.outcome is not None and probe.outcome.error == "Link error: VERSION_MISMATCH"


def test_server_without_auth_selection_gets_the_bare_ticket() -> None:
    probe = LinkProbe("pw")
    (sent,) = run(probe, reply(common=0b1000))  # mini header only
    assert len(sent) == 128 and decrypt(sent) == b"pw\0"
    run(probe, OK)
    assert probe.outcome is not None and probe.outcome.auth_methods == ["spice"]


def test_sasl_only_server_is_not_attempted() -> None:
    probe = LinkProbe("pw")
    assert run(probe, reply(common=0b1101)) == [b""]
    assert probe.outcome is not None and probe.outcome.error == AUTH_FAILED
    assert "SASL" in probe.outcome.detail


def test_bytes_after_the_outcome_are_ignored() -> None:
    probe = LinkProbe(None)
    run(probe, reply() + OK + b"\x67\x00" + bytes(100))  # MAIN INIT follows the result
    assert probe.outcome is not None and probe.outcome.success
    assert probe.receive_data(b"more") == b""


@pytest.mark.parametrize("password", ["x" * 61, "a\0b", "é" * 31])
def test_unsendable_passwords_are_refused_before_any_io(password: str) -> None:
    with pytest.raises(ValueError, match="SPICE password"):
        LinkProbe(password)


def test_unknown_capability_bits_are_shown_not_hidden() -> None:
    assert cap_names((1 << 3 | 1 << 9, 1), "common_caps", "COMMON") == [
        "MINI_HEADER",
        "COMMON_CAP_9",
        "COMMON_CAP_32",
    ]


def test_shell_failures_summarise_in_one_line() -> None:
    outcome = failure("Connection refused", "Connection refused")  # no echo of the same words
    assert summary("127.0.0.1", 9, outcome) == "127.0.0.1:9: Connection refused"
    outcome = failure("Connection refused", "Name or service not known")
    assert summary("x", 9, outcome) == "x:9: Connection refused (Name or service not known)"
    assert to_json("127.0.0.1", 9, failure("Timeout")) == {
        "success": False,
        "host": "127.0.0.1",
        "port": 9,
        "error": "Timeout",
    }
    # the error is one of a documented few; "detail" says which case (an unknown name here)
    assert to_json("x", 9, outcome)["detail"] == "Name or service not known"


def test_main_channel_stopped_before_the_ticket() -> None:
    """The default probe's first connection: version and caps, no ticket (no viewer is
    disconnected by it)."""
    probe = LinkProbe("pw", authenticate=False)
    assert run(probe, reply()) == [b""]
    assert probe.outcome is not None and probe.outcome.success and probe.outcome.caps_read
    assert probe.outcome.main_caps == (MAIN_CAPS,)


def test_ticket_check_on_an_inputs_channel() -> None:
    probe = LinkProbe("pw", channel_type=INPUTS)
    framer = ChannelFramer()
    framer.feed(C2S, probe.initial_bytes())
    assert framer.channel_type == INPUTS and framer.connection_id == 0
    assert framer.client_channel == ()
    (sent,) = run(probe, reply(main=0))
    assert decrypt(sent[4:]) == b"pw\0"
    run(probe, struct.pack("<I", 8))  # BAD_CONNECTION_ID: the ticket passed, no session
    assert probe.outcome is not None and probe.outcome.success
    assert probe.outcome.main_caps == ()  # not main's: combine() takes those from main
    wrong = LinkProbe("pw", channel_type=INPUTS)
    run(wrong, reply(main=0), DENIED)
    assert wrong.outcome is not None and wrong.outcome.error == AUTH_FAILED


def test_combine_takes_version_and_caps_from_main_and_the_verdict_from_the_check() -> None:
    main = LinkProbe(None, authenticate=False)
    run(main, reply(minor=1))
    check = LinkProbe(None, channel_type=INPUTS)
    run(check, reply(main=0), DENIED)
    assert main.outcome is not None and check.outcome is not None
    both = combine(main.outcome, check.outcome)
    assert (both.error, both.major, both.minor) == (AUTH_FAILED, 2, 1)
    assert both.main_caps == (MAIN_CAPS,) and "none was given" in both.detail
    refused = failure("Link error: NEED_SECURED")
    assert combine(refused, check.outcome) is refused


def test_a_name_idna_cannot_encode_is_refused_not_raised() -> None:
    """An empty or 64-letter label: getaddrinfo raised UnicodeError through the probe (a 500
    from the API, a traceback from `spicetap probe`)."""
    from proxy.io.probe import ProbeTarget, probe

    for host in ("a..b", "a" * 64 + ".invalid"):
        outcome = trio.run(probe, ProbeTarget(host, 1, timeout=5))
        assert (outcome.error, outcome.detail) == ("Connection refused", "not a valid host name")
