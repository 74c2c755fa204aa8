"""Splitting the password out of a URL and putting it back (core/command.py): the log
records ``scheme://user@host/...`` and the sealed password; the request gets the URL back
byte for byte."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from backhaul.core.command import (
    check_remote_name,
    same_login,
    split_url_password,
    url_with_password,
)
from backhaul.core.error import BitsError
from backhaul.core.vocabulary import JobType


@pytest.mark.parametrize(
    ("url", "name", "password"),
    [
        ("http://bob:pw@host/a", "http://bob@host/a", "pw"),
        ("https://bob:p:w@host:8443/a?x=1#f", "https://bob@host:8443/a?x=1#f", "p:w"),
        ("http://bob:p@ss@host/a", "http://bob@host/a", "p@ss"),  # the last @ ends it, as curl
        ("http://bob:p%40ss@[::1]:8080/", "http://bob@[::1]:8080/", "p%40ss"),
        ("http://:pw@host/", "http://@host/", "pw"),
        ("smb://DOM;bob:pw@server/share/f", "smb://DOM;bob@server/share/f", "pw"),
        ("http://host/a:b@c", "http://host/a:b@c", None),  # an @ in the path is no user info
        ("http://bob@host/a", "http://bob@host/a", None),
        ("http://bob:@host/a", "http://bob:@host/a", None),  # an empty password: nothing secret
        ("http://host/?u=a:b@c", "http://host/?u=a:b@c", None),
        ("\\\\server\\share\\f", "\\\\server\\share\\f", None),
    ],
)
def test_split_url_password(url: str, name: str, password: str | None) -> None:
    assert split_url_password(url) == (name, password)
    assert url_with_password(name, password) == url


_text = st.text(
    st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="/?#"), min_size=1
)


@given(
    scheme=st.sampled_from(["http", "https", "HTTP", "ftp"]),
    user=_text.filter(lambda u: ":" not in u and "@" not in u),
    password=_text,
    host=_text.filter(lambda h: "@" not in h),
    rest=st.sampled_from(["", "/", "/a/b.bin", "/a?sig=x@y:z", "#frag"]),
)
def test_the_password_comes_out_and_goes_back_byte_for_byte(
    scheme: str, user: str, password: str, host: str, rest: str
) -> None:
    url = f"{scheme}://{user}:{password}@{host}{rest}"
    name, taken = split_url_password(url)
    assert taken == password
    assert name == f"{scheme}://{user}@{host}{rest}"
    assert url_with_password(name, taken) == url
    assert split_url_password(name) == (name, None)


def test_same_login_compares_scheme_user_host_and_port() -> None:
    assert same_login("http://bob@h:1/a", "HTTP://bob@h:1/b?x")
    assert not same_login("http://bob@h:1/a", "http://bob@h:2/a")
    assert not same_login("http://bob@h/a", "http://eve@h/a")
    assert not same_login("http://bob@h/a", "https://bob@h/a")
    assert not same_login("\\\\s\\share\\a", "\\\\s\\share\\a")


def test_a_password_cannot_go_into_a_url_without_user_info() -> None:
    with pytest.raises(ValueError):
        url_with_password("http://host/a", "pw")


def test_check_remote_name_refuses_a_password_and_does_not_echo_it() -> None:
    with pytest.raises(BitsError) as refused:
        check_remote_name("https://bob:hunter2@host/a", JobType.DOWNLOAD)
    assert "hunter2" not in str(refused.value)
    assert check_remote_name("https://bob@host/a", JobType.DOWNLOAD) == "https://bob@host/a"
