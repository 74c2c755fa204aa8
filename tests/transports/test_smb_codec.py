r"""The pure parts of the SMB transport: remote names, credentials in URLs, the security descriptor
codec and the copy semantics of BITS's ACL flags. No server."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from backhaul.core import hresult as hr
from backhaul.core.error import TransferError
from backhaul.core.vocabulary import AclFlags
from backhaul.transports import smb
from backhaul.transports.smb import (
    ACCESS_ALLOWED_ACE_TYPE,
    ACCESS_DENIED_ACE_TYPE,
    INHERITED_ACE,
    SE_DACL_AUTO_INHERITED,
    SE_DACL_PROTECTED,
    SYSTEM_AUDIT_ACE_TYPE,
    Ace,
    Acl,
    SecurityDescriptor,
    inherited_by_file,
    merge_for_copy,
    parse_smb_name,
    security_information,
    split_smb_credentials,
)

ME = "S-1-5-21-1-2-3-1000"
MY_GROUP = "S-1-5-21-1-2-3-513"
EVERYONE = "S-1-1-0"
ADMINS = "S-1-5-32-544"
USERS = "S-1-5-32-545"

# -------------------------------------------------------------------------------------------------
# split_smb_credentials
# -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("smb://alice:s3cret@host/share/f.bin", ("smb://host/share/f.bin", "alice", "s3cret")),
        ("SMB://alice:pw@host:1445/s/d/f", ("SMB://host:1445/s/d/f", "alice", "pw")),
        ("smb://alice@host/share/f", ("smb://host/share/f", "alice", None)),
        ("smb://alice:@host/share/f", ("smb://host/share/f", "alice", "")),
        ("smb://CORP;alice:pw@host/s/f", ("smb://host/s/f", "CORP\\alice", "pw")),
        ("smb://al%40ice:p%3Aw%2F@host/s/f", ("smb://host/s/f", "al@ice", "p:w/")),
        ("smb://alice:p@ss@host/s/f", ("smb://host/s/f", "alice", "p@ss")),
        ("smb://u:p@[::1]:99/s/f", ("smb://[::1]:99/s/f", "u", "p")),
        ("smb://host/share/user@file", ("smb://host/share/user@file", None, None)),
        ("smb://host/share/f.bin", ("smb://host/share/f.bin", None, None)),
        ("\\\\host\\share\\f.bin", ("\\\\host\\share\\f.bin", None, None)),
        ("https://u:p@host/f", ("https://u:p@host/f", None, None)),
    ],
)
def test_split_smb_credentials_moves_user_and_password_out_of_the_url(
    url: str, expected: tuple[str, str | None, str | None]
) -> None:
    assert split_smb_credentials(url) == expected


def test_split_smb_credentials_leaves_no_trace_of_the_password() -> None:
    clean, _, password = split_smb_credentials("smb://bob:Hunter2%21@files:4445/s/a%20b.bin")
    assert password == "Hunter2!"
    assert "Hunter2" not in clean and "bob" not in clean
    assert clean == "smb://files:4445/s/a%20b.bin"


# -------------------------------------------------------------------------------------------------
# parse_smb_name
# -------------------------------------------------------------------------------------------------


def test_parse_smb_url_with_port_and_percent_encoded_components() -> None:
    name = parse_smb_name("smb://Files.example:1445/Share/dir%20one/f%23.bin")
    assert (name.host, name.port, name.share) == ("Files.example", 1445, "Share")
    assert name.path == "dir one\\f#.bin"
    assert (name.directory, name.name) == ("dir one", "f#.bin")
    assert name.sibling("x") == "dir one\\x"
    assert name.display == "smb://Files.example:1445/Share/dir%20one/f%23.bin"


def test_parse_unc_name_uses_the_default_port() -> None:
    name = parse_smb_name("\\\\srv\\share\\a\\b.txt", default_port=4450)
    assert (name.host, name.port, name.share, name.path) == ("srv", 4450, "share", "a\\b.txt")
    assert parse_smb_name("\\\\srv\\share\\b.txt").port == 445
    assert parse_smb_name("\\\\srv\\share\\b.txt").sibling("t") == "t"


def test_parse_ipv6_literal_and_url_credentials_are_kept_out_of_display() -> None:
    name = parse_smb_name("smb://u:pw@[::1]:4445/s/f")
    assert (name.host, name.port, name.user, name.password) == ("::1", 4445, "u", "pw")
    assert "pw" not in name.display and "pw" not in repr(name)
    assert name.display == "smb://[::1]:4445/s/f"


@pytest.mark.parametrize(
    "bad",
    [
        "smb://host/share",  # no file
        "smb://host/share/",
        "smb://host//f",  # no share
        "smb:///share/f",  # no host
        "smb://host:0/s/f",
        "smb://host:99999/s/f",
        "smb://host:x/s/f",
        "smb://host/s/../f",
        "smb://host/s/./f",
        "smb://host/s/a//f",
        "smb://host/s/a%2Fb",  # an encoded separator
        "smb://host/s/a%5Cb",
        "smb://host/s/f?x",
        "smb://host/s/f#x",
        "smb://[::1/s/f",
        "\\\\host\\share",
        "\\\\host\\share\\",
        "\\\\\\share\\f",
        "\\\\host\\share\\..\\f",
        "\\\\host\\..\\f",  # the share's name: no '..' nor an encoded separator either
        "smb://host/%2E%2E/f",
        "smb://host/s%5Cd/f",
        "smb://host/s%2F..%2F/f",
        "http://host/s/f",
        "file:///etc/passwd",
    ],
)
def test_bad_remote_names_are_refused_with_e_invalidarg(bad: str) -> None:
    with pytest.raises(TransferError) as caught:
        parse_smb_name(bad)
    assert caught.value.hresult == hr.E_INVALIDARG
    assert caught.value.transient is False


@pytest.mark.parametrize("url", ["smb://u:TopSecret@host/share", "http://u:TopSecret@host/f"])
def test_a_refused_url_does_not_repeat_its_password(url: str) -> None:
    with pytest.raises(TransferError) as caught:
        parse_smb_name(url)
    assert "TopSecret" not in str(caught.value)


# -------------------------------------------------------------------------------------------------
# The security descriptor codec
# -------------------------------------------------------------------------------------------------

sids = st.builds(
    lambda authority, subs: "-".join(["S", "1", str(authority), *map(str, subs)]),
    st.integers(0, (1 << 32) - 1),
    st.lists(st.integers(0, (1 << 32) - 1), max_size=15),
)
aces = st.builds(
    Ace.of,
    st.sampled_from([ACCESS_ALLOWED_ACE_TYPE, ACCESS_DENIED_ACE_TYPE, SYSTEM_AUDIT_ACE_TYPE]),
    sids,
    st.integers(0, (1 << 32) - 1),
    st.integers(0, 255),
)
opaque_aces = st.builds(
    Ace,
    st.integers(4, 20),
    st.integers(0, 255),
    st.binary(max_size=40).map(lambda b: b + b"\0" * (-len(b) % 4)),
)
acls = st.builds(
    Acl, st.lists(st.one_of(aces, opaque_aces), max_size=6).map(tuple), st.sampled_from([2, 4])
)
descriptors = st.builds(
    SecurityDescriptor,
    st.none() | sids,
    st.none() | sids,
    st.none() | acls,
    st.none() | acls,
    st.sampled_from([0, SE_DACL_PROTECTED, SE_DACL_AUTO_INHERITED, 0x0001 | 0x0002]),
)


@given(descriptors)
def test_security_descriptor_round_trips_through_the_self_relative_form(
    sd: SecurityDescriptor,
) -> None:
    packed = sd.pack()
    assert SecurityDescriptor.parse(packed) == sd
    assert SecurityDescriptor.parse(packed).pack() == packed


@given(descriptors, st.integers(0, 15))
def test_select_keeps_exactly_the_parts_the_acl_flags_name(
    sd: SecurityDescriptor, flags: int
) -> None:
    chosen = sd.select(flags)
    assert chosen.parts == sd.parts & flags
    assert SecurityDescriptor.parse(chosen.pack()) == chosen


def test_sids_format_like_windows() -> None:
    sd = SecurityDescriptor(owner="S-1-5-21-1-2-3-1000", group="S-1-0x123456789ABC-7")
    again = SecurityDescriptor.parse(sd.pack())
    assert again.owner == "S-1-5-21-1-2-3-1000"
    assert again.group == "S-1-0x123456789ABC-7"
    ace = Ace.of(ACCESS_ALLOWED_ACE_TYPE, EVERYONE, 0x120089, INHERITED_ACE)
    assert (ace.sid, ace.mask, ace.inherited) == (EVERYONE, 0x120089, True)
    assert repr(ace) == "Ace(0, S-1-1-0, 0x00120089, flags=0x10)"


def test_a_null_dacl_is_kept_apart_from_an_absent_one() -> None:
    null = SecurityDescriptor(null_dacl=True)
    assert SecurityDescriptor.parse(null.pack()).null_dacl
    assert null.parts == AclFlags.DACL
    assert SecurityDescriptor().parts == 0
    assert SecurityDescriptor.parse(null.pack()).select(AclFlags.OWNER).parts == 0


def test_a_password_with_an_unencoded_slash_is_never_shown() -> None:
    """'/' ends a URL's authority: in ``smb://alice:s3cr/et@host/...`` the login is not where
    user info is, nothing takes it out, and the port parse failed quoting it whole."""
    with pytest.raises(TransferError) as caught:
        parse_smb_name("smb://alice:s3cr/et@127.0.0.1/share/f.bin")
    assert "s3cr" not in caught.value.message and "alice" not in caught.value.message
    assert "127.0.0.1/share/f.bin" in caught.value.message


def test_an_ace_whose_size_is_no_multiple_of_4_is_malformed() -> None:
    """It parsed, then packing it again (to select or merge) raised a bare ValueError."""
    ace = b"\x00\x00" + struct.pack("<H", 22) + b"\x00" * 18
    acl = struct.pack("<BBHHH", 2, 0, 8 + len(ace), 1, 0) + ace
    data = b"\x01\x00\x04\x80" + struct.pack("<IIII", 0, 0, 0, 20) + acl
    with pytest.raises(ValueError):
        SecurityDescriptor.parse(data)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x01\x00\x04\x80" + b"\x00" * 12,  # short header
        b"\x02\x00\x04\x80" + b"\x00" * 16,  # revision 2
        b"\x01\x00\x04\x00" + b"\x00" * 16,  # not self-relative
        b"\x01\x00\x00\x80" + struct.pack("<IIII", 200, 0, 0, 0),  # owner beyond the end
        b"\x01\x00\x04\x80"
        + struct.pack("<IIII", 0, 0, 0, 20)
        + b"\x02\x00\xff\x00\x01\x00\x00\x00",
    ],
)
def test_malformed_descriptors_raise_value_error(data: bytes) -> None:
    with pytest.raises(ValueError):
        SecurityDescriptor.parse(data)


def test_bad_sid_text_is_refused() -> None:
    for bad in ("S-2-5", "X-1-5", "S-1", "S-1-5-x", f"S-1-{1 << 48}"):
        with pytest.raises(ValueError):
            SecurityDescriptor(owner=bad).pack()


def test_security_information_maps_bg_copy_file_flags() -> None:
    assert security_information(0) == 0
    assert security_information(AclFlags.OWNER | AclFlags.DACL) == 0x1 | 0x4
    assert security_information(AclFlags.ALL) == 0xF


# -------------------------------------------------------------------------------------------------
# Copy semantics: explicit source entries + what the destination directory passes on
# -------------------------------------------------------------------------------------------------

PARENT = Acl(
    (
        Ace.of(ACCESS_ALLOWED_ACE_TYPE, ME, 0x1F01FF),  # not inheritable
        Ace.of(ACCESS_ALLOWED_ACE_TYPE, "S-1-3-0", 0x10000000, 0x0B),  # CREATOR OWNER, GENERIC_ALL
        Ace.of(ACCESS_ALLOWED_ACE_TYPE, "S-1-3-1", 0x80000000, 0x09),  # CREATOR GROUP, GENERIC_READ
        Ace.of(ACCESS_ALLOWED_ACE_TYPE, USERS, 0x120089, 0x03),  # OI|CI
        Ace.of(ACCESS_ALLOWED_ACE_TYPE, EVERYONE, 0x120089, 0x02),  # CI only: folders
    )
)


def test_a_file_inherits_object_inherit_entries_with_creator_sids_replaced() -> None:
    gained = inherited_by_file(PARENT, "S-1-22-1-5", "S-1-22-2-6")
    assert [(a.sid, a.mask, a.flags) for a in gained] == [
        ("S-1-22-1-5", 0x1F01FF, INHERITED_ACE),
        ("S-1-22-2-6", 0x120089, INHERITED_ACE),
        (USERS, 0x120089, INHERITED_ACE),
    ]


def test_copy_keeps_explicit_source_entries_then_the_destination_inheritable_ones() -> None:
    source = SecurityDescriptor(
        ME,
        MY_GROUP,
        Acl(
            (
                Ace.of(ACCESS_DENIED_ACE_TYPE, ADMINS, 2),
                Ace.of(ACCESS_ALLOWED_ACE_TYPE, ME, 0x1F01FF),
                Ace.of(ACCESS_ALLOWED_ACE_TYPE, EVERYONE, 0x1200A9, INHERITED_ACE),  # dropped
            )
        ),
    )
    merged = merge_for_copy(source, SecurityDescriptor(dacl=PARENT), ME, MY_GROUP)
    assert (merged.owner, merged.group) == (ME, MY_GROUP)
    assert merged.dacl is not None
    assert [(a.type, a.sid, a.inherited) for a in merged.dacl.aces] == [
        (ACCESS_DENIED_ACE_TYPE, ADMINS, False),
        (ACCESS_ALLOWED_ACE_TYPE, ME, False),
        (ACCESS_ALLOWED_ACE_TYPE, ME, True),
        (ACCESS_ALLOWED_ACE_TYPE, MY_GROUP, True),
        (ACCESS_ALLOWED_ACE_TYPE, USERS, True),
    ]
    assert merged.control & SE_DACL_AUTO_INHERITED


def test_a_protected_source_dacl_is_copied_alone_and_stays_protected() -> None:
    source = SecurityDescriptor(
        dacl=Acl((Ace.of(ACCESS_ALLOWED_ACE_TYPE, ME, 0x1F01FF),)), control=SE_DACL_PROTECTED
    )
    merged = merge_for_copy(source, SecurityDescriptor(dacl=PARENT), ME, MY_GROUP)
    assert merged.dacl == source.dacl
    assert merged.control & SE_DACL_PROTECTED


def test_a_copy_without_acls_in_the_source_sets_none() -> None:
    merged = merge_for_copy(SecurityDescriptor(owner=ME), SecurityDescriptor(dacl=PARENT), ME, None)
    assert (merged.owner, merged.dacl, merged.sacl) == (ME, None, None)


# -------------------------------------------------------------------------------------------------
# specs/smb.md is executable: its NTSTATUS table is the code's
# -------------------------------------------------------------------------------------------------


def test_the_status_table_of_specs_smb_md_is_the_code_s() -> None:
    spec = Path(__file__).resolve().parents[2] / "specs" / "smb.md"
    rows = [
        [cell.strip() for cell in line.strip("|").split("|")]
        for line in spec.read_text().splitlines()
        if line.startswith("| 0xC")
    ]
    documented = {
        int(status, 16): (int(code, 16), context, kind)
        for status, _name, code, _as, context, kind in rows
    }
    actual = {
        status: (code, context.name, "transient" if smb._is_transient(code) else "fatal")
        for status, (code, context) in smb._STATUS_TABLE.items()
    }
    assert documented == actual
