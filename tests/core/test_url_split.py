"""Splitting a URL's secrets out and putting them back (core/url.py): the log records
``scheme://user@host/path?X-Amz-Signature=<redacted>`` and the sealed password and query;
the request gets the URL back byte for byte."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from backhaul.core.command import check_remote_name
from backhaul.core.error import BitsError
from backhaul.core.url import (
    holds_url_secret,
    is_secret_parameter_name,
    redact_url,
    request_url,
    same_login,
    same_origin,
    secrets_of,
    shown_query,
    split_url_password,
    split_url_query,
    url_with_password,
    url_with_query,
    with_login_of,
)
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


S3 = (
    "https://b.s3.amazonaws.com/k/o.bin?X-Amz-Algorithm=AWS4-HMAC-SHA256"
    "&X-Amz-Credential=AKIA%2F20261126%2Fus-east-1%2Fs3%2Faws4_request"
    "&X-Amz-Date=20261126T150000Z&X-Amz-Expires=3600&X-Amz-SignedHeaders=host"
    "&X-Amz-Signature=0a1b2c3d"
)


@pytest.mark.parametrize(
    ("url", "shown", "query"),
    [
        (
            S3,
            "https://b.s3.amazonaws.com/k/o.bin?X-Amz-Algorithm=AWS4-HMAC-SHA256"
            "&X-Amz-Credential=<redacted>&X-Amz-Date=20261126T150000Z&X-Amz-Expires=3600"
            "&X-Amz-SignedHeaders=host&X-Amz-Signature=<redacted>",
            S3.split("?", 1)[1],
        ),
        (
            "https://acct.blob.core.windows.net/c/f?sv=2024&se=2026-12-01&sp=r&SIG=abc%2B#top",
            "https://acct.blob.core.windows.net/c/f?sv=2024&se=2026-12-01&sp=r&SIG=<redacted>#top",
            "sv=2024&se=2026-12-01&sp=r&SIG=abc%2B",
        ),
        (  # the parameter's name is compared decoded
            "https://h/f?access%5Ftoken=t&page=2",
            "https://h/f?access%5Ftoken=<redacted>&page=2",
            "access%5Ftoken=t&page=2",
        ),
        (  # a name with a secret word in it, of any spelling
            "https://h/f?X-Upload-Token=t1&keyword=k&sessionToken=t2&author=a",
            "https://h/f?X-Upload-Token=<redacted>&keyword=k&sessionToken=<redacted>&author=a",
            "X-Upload-Token=t1&keyword=k&sessionToken=t2&author=a",
        ),
        ("https://h/f?page=2&sort=a", "https://h/f?page=2&sort=a", None),
        ("https://h/f?sig=", "https://h/f?sig=", None),  # an empty value: nothing secret
        ("https://h/f?sig=<redacted>", "https://h/f?sig=<redacted>", None),  # already shown
        ("https://h/f#sig=abc", "https://h/f#sig=abc", None),  # a fragment is not sent
        ("\\\\server\\share\\f?sig=a", "\\\\server\\share\\f?sig=a", None),
    ],
)
def test_split_url_query(url: str, shown: str, query: str | None) -> None:
    assert split_url_query(url) == (shown, query)
    assert url_with_query(shown, query) == url


@pytest.mark.parametrize(
    "name",
    [
        "X-Api-Key",
        "apiKey",
        "sessionToken",
        "pageToken",
        "oauth_signature",
        "SharedAccessSignature",
        "upload-secret",
        "AWSAccessKeyId",
        "db.password",
        "x_auth",
        "Credentials",
        "sig2",
    ],
)
def test_a_parameter_named_with_a_secret_word_is_a_secret(name: str) -> None:
    assert is_secret_parameter_name(name)
    shown, query = split_url_query(f"https://h/f?a=1&{name}=v")
    assert (shown, query) == (f"https://h/f?a=1&{name}=<redacted>", f"a=1&{name}=v")


@pytest.mark.parametrize(
    "name",
    ["keyword", "author", "authuser", "tokens", "monkey", "passage", "X-Amz-Date", "sv", "page"],
)
def test_a_word_inside_a_longer_word_does_not_make_a_secret(name: str) -> None:
    assert not is_secret_parameter_name(name)
    assert split_url_query(f"https://h/f?{name}=v") == (f"https://h/f?{name}=v", None)


@given(
    secret=st.sampled_from(["sig", "X-Amz-Signature", "token", "Key", "X-Upload-Token"]),
    value=st.text(
        st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="&#"), min_size=1
    ),
    before=st.sampled_from(["", "a=1&", "a&"]),
    after=st.sampled_from(["", "&b=2", "&b"]),
    fragment=st.sampled_from(["", "#f", "#sig=x"]),
)
def test_a_signed_query_comes_out_and_goes_back_byte_for_byte(
    secret: str, value: str, before: str, after: str, fragment: str
) -> None:
    url = f"https://u:pw@h:1/p/a.bin?{before}{secret}={value}{after}{fragment}"
    recorded, password, query = secrets_of(url)
    if value == "<redacted>":
        assert query is None
        return
    assert (password, query) == ("pw", f"{before}{secret}={value}{after}")
    assert recorded == f"https://u@h:1/p/a.bin?{before}{secret}=<redacted>{after}{fragment}"
    assert request_url(recorded, password, query) == url
    assert secrets_of(recorded) == (recorded, None, None)
    assert shown_query(url) == shown_query(recorded) == recorded.split("?", 1)[1].split("#")[0]


def test_redact_url_for_messages() -> None:
    assert redact_url("https://bob:pw@h/a?sig=abc&x=1") == "https://h/a?sig=<redacted>&x=1"
    assert redact_url("https://h/a") == "https://h/a"
    assert redact_url("not a url?sig=abc") == "not a url?sig=abc"


def test_check_remote_name_refuses_a_password_or_a_signature_and_does_not_echo_them() -> None:
    for name in ("https://bob:hunter2@host/a", "https://host/a?X-Amz-Signature=hunter2"):
        with pytest.raises(BitsError) as refused:
            check_remote_name(name, JobType.DOWNLOAD)
        assert "hunter2" not in str(refused.value)
    for name in ("https://bob@host/a", "https://host/a?X-Amz-Signature=<redacted>"):
        assert check_remote_name(name, JobType.DOWNLOAD) == name


def test_holds_url_secret_finds_a_password_or_a_signature_in_free_text() -> None:
    block = "HTTP/1.1 200 OK\r\nBITS-Reply-URL: {}\r\nContent-Length: 0\r\n\r\n"
    assert holds_url_secret(block.format("/r?id=1&sig=abc"))  # relative
    assert holds_url_secret(block.format("https://h/r?X-Amz-Signature=abc"))
    assert holds_url_secret(block.format("https://u:pw@h/r"))
    assert not holds_url_secret(block.format("https://u@h/r?id=1"))
    assert not holds_url_secret(block.format("/r?sig=<redacted>"))
    assert not holds_url_secret("no url here, sig=abc")


def test_the_login_of_one_url_goes_to_another_on_the_same_server() -> None:
    assert same_origin("http://bob@H:1/a", "HTTP://h:1/b?x")
    assert not same_origin("http://bob@h:1/a", "http://h:2/a")
    assert not same_origin("http://h/a", "https://h/a")
    assert with_login_of("http://bob@h:1/a", "http://h:1/r/x?q=1") == "http://bob@h:1/r/x?q=1"
    assert with_login_of("http://h:1/a", "http://eve@h:1/r") == "http://h:1/r"
