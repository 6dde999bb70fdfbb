"""`spicetap proxy` link options: names checked, secrets read from files and never echoed."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from proxy.linksetup import add_link_options, link_policy_from, target_policy
from spicetap.cli import main
from spicetap.config import ProxySection, TargetSection
from spicetap.errors import UserError


def parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_link_options(p)
    return p.parse_args(list(argv))


def test_default_is_pass_through_and_inactive() -> None:
    policy = link_policy_from(parse(), ProxySection())
    assert policy.auth == "pass-through" and not policy.active


def test_cli_names_override_the_config() -> None:
    section = ProxySection(mask_caps=("display:codec_vp8",))
    assert link_policy_from(parse(), section).mask.names == ("display:codec_vp8",)
    args = parse(
        "--mask-caps", "display:codec_h264,common:mini_header", "--mask-caps", "main:name_and_uuid"
    )
    names = link_policy_from(args, section).mask.names
    assert names == ("display:codec_h264", "common:mini_header", "main:name_and_uuid")


def test_unknown_cap_is_a_one_line_error(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["proxy", "--upstream", "127.0.0.1:1", "--mask-caps", "display:stream_codec_h264"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "--mask-caps: unknown capability 'display:stream_codec_h264'" in err
    assert "display:codec_h264" in err


def test_inject_needs_both_sides_and_reads_secret_files(tmp_path: Path) -> None:
    server = tmp_path / "server"
    server.write_text("real-password\n")
    with pytest.raises(UserError, match="server password"):
        link_policy_from(parse("--auth", "inject"), ProxySection(viewer_password="v"))
    with pytest.raises(UserError, match="a viewer password, a viewer tokens file, or a"):
        link_policy_from(
            parse("--auth", "inject", "--server-password-file", str(server)), ProxySection()
        )
    # tokens to come: an API that mints them, or a tokens file empty at start
    minting = link_policy_from(
        parse("--auth", "inject", "--server-password-file", str(server)),
        ProxySection(),
        mintable=True,
    )
    assert minting.viewers is not None and minting.viewers.counts() == (0, 0)
    empty = tmp_path / "tokens"
    empty.write_text("# none yet\n")
    args = ("--auth", "inject", "--server-password-file", str(server))
    later = link_policy_from(parse(*args, "--viewer-tokens-file", str(empty)), ProxySection())
    assert later.viewers is not None and later.viewers.tokens_file == str(empty)
    policy = link_policy_from(
        parse("--auth", "inject", "--server-password-file", str(server)),
        ProxySection(viewer_password="viewer-pw"),
    )
    assert policy.server_password == b"real-password" and policy.key is not None
    assert "real-password" not in repr(policy) and "viewer-pw" not in repr(policy)


def test_secrets_belong_to_inject_only_and_bad_files_name_no_content(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="inject only"):
        link_policy_from(parse("--auth", "intercept"), ProxySection(server_password="x"))
    tokens = tmp_path / "tokens"
    tokens.write_text("very-secret-token next-week\n")
    with pytest.raises(UserError) as exc:
        link_policy_from(
            parse("--auth", "inject", "--viewer-tokens-file", str(tokens)),
            ProxySection(server_password="x"),
        )
    assert "line 1" in str(exc.value) and "very-secret-token" not in str(exc.value)
    with pytest.raises(UserError, match="cannot read"):
        link_policy_from(
            parse("--auth", "inject", "--server-password-file", str(tmp_path / "missing")),
            ProxySection(viewer_password="v"),
        )


def test_a_target_may_have_its_own_authentication(tmp_path: Path) -> None:
    base = link_policy_from(parse("--mask-caps", "display:codec_vp8"), ProxySection())
    assert target_policy("vm1", TargetSection(upstream="127.0.0.1:5930"), base) is None
    server = tmp_path / "vm2-password"
    server.write_text("vm2-real\n")
    own = TargetSection(
        upstream="127.0.0.1:5931",
        auth="inject",
        viewer_password="vm2-viewer",
        server_password_file=str(server),
    )
    policy = target_policy("vm2", own, base)
    assert policy is not None and policy.auth == "inject"
    assert policy.server_password == b"vm2-real"
    assert policy.viewers is not None
    assert policy.viewers.check(b"vm2-viewer", 1, 0, 0.0).ok
    assert not policy.viewers.check(b"vm2-real", 1, 0, 0.0).ok
    assert policy.mask == base.mask  # masking stays the proxy's
    assert "vm2-real" not in repr(policy) and "vm2-viewer" not in repr(policy)


@pytest.mark.parametrize(
    ("section", "message"),
    [
        (
            TargetSection(auth="inject", viewer_password="v"),
            "[targets.vm1] auth inject needs the server password",
        ),
        (
            TargetSection(auth="intercept", server_password="s"),
            "[targets.vm1] auth: viewer and server passwords and tokens are for inject only",
        ),
        (TargetSection(auth="open-sesame"), "[targets.vm1] auth 'open-sesame': expected one of"),
    ],
)
def test_a_target_auth_mistake_names_the_target(section: TargetSection, message: str) -> None:
    with pytest.raises(UserError) as exc:
        target_policy("vm1", section, link_policy_from(parse(), ProxySection()))
    assert message in str(exc.value)
