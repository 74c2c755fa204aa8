"""The secrets a URL can carry, and the URL as the log records it.

Two parts of a URL are credentials: the password of its user info
(``https://user:password@host/``) and, in a signed URL, the values of its signature
parameters (``X-Amz-Signature=...``, Azure's ``sig=...``, ``access_token=...``: the names in
``SECRET_QUERY_PARAMETERS``, and any name with a word of ``SECRET_NAME_WORDS`` in it, such
as ``sessionToken`` or ``X-Upload-Signature``; and the names the application declared
secret, ``declare_secret_parameters``). The log never holds either in plain text
(specs/event-log.md §6): the adapters take them out with ``split_url_password`` and
``split_url_query``, seal them (``FileSpec.password``, ``FileSpec.query``), and record the
URL as ``https://user@host/path?X-Amz-Signature=<redacted>``; the engine builds the real URL
for the request only (``url_with_password``, ``url_with_query``). Pure string work: the
URL is put back byte for byte.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Final, cast
from urllib.parse import unquote_plus

REDACTED: Final = "<redacted>"

# Query parameters whose value is a credential (compared without case). A name that is not
# a secret after all costs nothing but its value shown as <redacted>: the request still gets
# the real one.
SECRET_QUERY_PARAMETERS: Final = frozenset(
    {
        "x-amz-signature",  # AWS Signature Version 4 (S3 presigned URLs)
        "x-amz-credential",
        "x-amz-security-token",
        "x-goog-signature",  # Google Cloud Storage V4
        "x-goog-credential",
        "signature",  # AWS V2, Google V2, CloudFront
        "sig",  # Azure shared access signatures
        "token",
        "access_token",
        "id_token",
        "refresh_token",
        "api_key",
        "apikey",
        "key",
        "password",
        "passwd",
        "secret",
        "client_secret",
        "auth",
    }
)

# A parameter whose name holds one of these words is a secret too (``X-Api-Key``,
# ``sessionToken``, ``oauth_signature``, ``SharedAccessSignature``, ``upload-secret``): the
# name is cut into words at anything but letters and digits and where a capital starts a
# word, so ``keyword``, ``author`` or ``tokens`` hold none of them.
SECRET_NAME_WORDS: Final = frozenset(
    {
        "sig",
        "signature",
        "token",
        "secret",
        "password",
        "passwd",
        "pwd",
        "credential",
        "credentials",
        "apikey",
        "key",
        "auth",
    }
)
_WORD = re.compile(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+|[0-9]+")

# The names an application declared secret (lower case): a signed URL whose signature
# parameter has no secret word (``?h=...``, ``?X-Foo-Hash=...``). The store keeps them in its
# engine-wide policy (``TransferManager.set_secret_parameters``); every manager and engine
# declares them here before it records a URL. The set only grows in a process: a name kept
# secret that no longer needs to be costs only a value shown as <redacted>, while a name
# dropped too early would put a credential in the log.
_DECLARED: set[str] = set()
_NOT_IN_A_NAME = re.compile(r"[=&?#\s]")


def is_parameter_name(name: object) -> bool:
    """A query parameter name as ``declare_secret_parameters`` takes it?"""
    return isinstance(name, str) and bool(name) and not _NOT_IN_A_NAME.search(name)


def check_secret_parameter_name(name: object) -> str:
    """``name``, if ``is_parameter_name``; else ValueError."""
    if not is_parameter_name(name):
        raise ValueError(f"{name!r} is not a query parameter name")
    return cast(str, name)


def declare_secret_parameters(names: Iterable[str]) -> None:
    """From now on, in this process, treat these query parameters as secrets."""
    for name in names:
        _DECLARED.add(check_secret_parameter_name(name).lower())


_AUTHORITY = re.compile(
    r"^(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<authority>[^/?#]*)(?P<tail>.*)$", re.S
)
_QUERY = re.compile(r"^(?P<base>[^?#]*)(?:\?(?P<query>[^#]*))?(?P<fragment>#.*)?$", re.S)


# -- the password ---------------------------------------------------------------------------


def _parts(name: str) -> tuple[str, str, str, str] | None:
    """(``scheme://``, the user info with its ``@`` or "", ``host[:port]``, the rest) of a
    URL, or None for anything else. The user info ends at the authority's last ``@`` (as
    curl reads ``user:p@ss@host``)."""
    match = _AUTHORITY.match(name) if isinstance(name, str) else None
    if match is None:
        return None
    authority = match["authority"]
    at = authority.rfind("@") + 1
    return match["head"], authority[:at], authority[at:], match["tail"]


def split_url_password(name: str) -> tuple[str, str | None]:
    """(``name`` without the password of its user info, that password as written), or
    (``name``, None) when it has none. ``scheme://user:password@host/path`` gives
    ``scheme://user@host/path``; ``url_with_password`` puts it back, byte for byte."""
    parts = _parts(name)
    if parts is None:
        return name, None
    head, userinfo, host, tail = parts
    user, colon, password = userinfo[:-1].partition(":")
    if not colon or not password:
        return name, None
    return f"{head}{user}@{host}{tail}", password


def has_user_info(name: str) -> bool:
    """Does the URL ``name`` have user info (``scheme://user@host``) to hold a password?"""
    parts = _parts(name)
    return parts is not None and bool(parts[1])


def url_with_password(name: str, password: str | None) -> str:
    """``name`` (as ``split_url_password`` left it) with ``password`` back in its user info."""
    if password is None:
        return name
    parts = _parts(name)
    if parts is None or not parts[1]:
        raise ValueError("the URL has no user info to hold a password")
    head, userinfo, host, tail = parts
    return f"{head}{userinfo[:-1]}:{password}@{host}{tail}"


def same_login(a: str, b: str) -> bool:
    """Do the URLs ``a`` and ``b`` name the same scheme, user, host and port (so that the
    password of one is the password of the other)?"""
    pa, pb = _parts(a), _parts(b)
    if pa is None or pb is None:
        return False
    return (pa[0].lower(), pa[1], pa[2]) == (pb[0].lower(), pb[1], pb[2])


def same_origin(a: str, b: str) -> bool:
    """Do the URLs ``a`` and ``b`` name the same scheme, host and port, whoever the user?"""
    pa, pb = _parts(a), _parts(b)
    if pa is None or pb is None:
        return False
    return (pa[0].lower(), pa[2].lower()) == (pb[0].lower(), pb[2].lower())


def same_file(a: str, b: str) -> bool:
    """Do the URLs ``a`` and ``b`` name the same file: the same scheme, host, port and path,
    whatever their user and query (a URL signed anew)?"""
    pa, pb = _parts(a), _parts(b)
    if pa is None or pb is None or not same_origin(a, b):
        return False
    return _query_of(pa[3])[0] == _query_of(pb[3])[0]


def with_login_of(source: str, name: str) -> str:
    """``name`` with the user info of ``source`` (as recorded: the user, no password)."""
    ps, pn = _parts(source), _parts(name)
    if ps is None or pn is None:
        return name
    return f"{pn[0]}{ps[1]}{pn[2]}{pn[3]}"


# -- the signed query -----------------------------------------------------------------------


def _query_of(name: str) -> tuple[str, str | None, str]:
    """(everything before the query, the query without ``?`` or None, the fragment)."""
    match = _QUERY.match(name)
    assert match is not None  # every string matches
    return match["base"], match["query"], match["fragment"] or ""


def _is_secret(parameter: str) -> bool:
    key, equals, value = parameter.partition("=")
    if not equals or not value or value == REDACTED:
        return False
    return is_secret_parameter_name(unquote_plus(key))


def is_secret_parameter_name(name: str) -> bool:
    """Is a query parameter of this (decoded) name a credential? One of
    ``SECRET_QUERY_PARAMETERS`` or a declared name (without case), or a name with a word of
    ``SECRET_NAME_WORDS``."""
    name = name.strip()
    lowered = name.lower()
    if lowered in SECRET_QUERY_PARAMETERS or lowered in _DECLARED:
        return True
    return any(word.lower() in SECRET_NAME_WORDS for word in _WORD.findall(name))


def split_url_query(name: str) -> tuple[str, str | None]:
    """(``name`` with the value of each secret query parameter shown as ``<redacted>``, the
    whole query as written), or (``name``, None) when no parameter is a secret. Only URLs
    (``scheme://``) have one. ``url_with_query`` puts the query back, byte for byte."""
    if not isinstance(name, str) or _AUTHORITY.match(name) is None:
        return name, None
    base, query, fragment = _query_of(name)
    if not query:
        return name, None
    parameters = query.split("&")
    if not any(_is_secret(p) for p in parameters):
        return name, None
    shown = [f"{p.partition('=')[0]}={REDACTED}" if _is_secret(p) else p for p in parameters]
    return f"{base}?{'&'.join(shown)}{fragment}", query


def url_with_query(name: str, query: str | None) -> str:
    """``name`` with its query replaced by ``query`` (as ``split_url_query`` took it)."""
    if query is None:
        return name
    base, _, fragment = _query_of(name)
    return f"{base}?{query}{fragment}"


def shown_query(name: str) -> str | None:
    """The query of ``name`` as recorded (secret values ``<redacted>``), or None."""
    return _query_of(split_url_query(name)[0])[1]


# -- for messages ---------------------------------------------------------------------------

URL_IN_TEXT: Final = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s\"'<>]+")
_QUERY_IN_TEXT = re.compile(r"\?([^\s#\"'<>]+)")


def holds_url_secret(text: str) -> bool:
    """Does ``text`` (a response's header block, a message) hold a URL's password or a
    secret query parameter, in an absolute URL or a relative one (``/r?sig=...``)?"""
    if "@" not in text and "?" not in text:
        return False  # no user info, no query: most header blocks (checked once a file)
    if any(split_url_password(m[0])[1] is not None for m in URL_IN_TEXT.finditer(text)):
        return True
    return any(any(_is_secret(p) for p in m[1].split("&")) for m in _QUERY_IN_TEXT.finditer(text))


_USER_INFO_IN_TEXT: Final = re.compile(r"//[^/?#@]*@")


def scrub_text(text: str) -> str:
    """``text`` that may hold URLs (an exception's text, a redirect's Location) fit for a
    message: every absolute URL in it as ``redact_url`` shows it. What the redactor cannot
    read (a relative or broken URL: ``//bob:pw@host:abc/x``, ``/x?sig=...``, a space in a
    host) is scrubbed crudely first: whatever sits between ``//`` and ``@`` is cut, and every
    query value whose name counts as a secret becomes ``<redacted>``."""
    text = _USER_INFO_IN_TEXT.sub("//", text)
    text = URL_IN_TEXT.sub(lambda m: redact_url(m[0]), text)
    return _QUERY_IN_TEXT.sub(
        lambda m: "?" + "&".join(_scrubbed_parameter(p) for p in m[1].split("&")), text
    )


def _scrubbed_parameter(parameter: str) -> str:
    name, equals, value = parameter.partition("=")
    if equals and value and is_secret_parameter_name(unquote_plus(name)):
        return f"{name}={REDACTED}"
    return parameter


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def one_line(value: object) -> str:
    """A value from a job (its names, a server's error text) as one line of a terminal
    shows it: control characters as Python escapes (\\x1b, \\n), so that a job's name
    cannot send escape sequences to the terminal of whoever lists it, nor break one line
    per job. JSON output keeps values as they are (JSON escapes them)."""
    return _CONTROL.sub(lambda c: c[0].encode("unicode_escape").decode("ascii"), str(value))


def redact_url(url: str) -> str:
    """``url`` as messages show it: no user info, secret query values ``<redacted>``."""
    shown, _ = split_url_query(url)
    parts = _parts(shown)
    if parts is None:
        return shown
    head, _userinfo, host, tail = parts
    return f"{head}{host}{tail}"


def has_url_secret(name: str) -> bool:
    """Does the URL ``name`` still hold a password or a signature in plain text?"""
    return secrets_of(name)[1:] != (None, None)


def secrets_of(name: str) -> tuple[str, str | None, str | None]:
    """(``name`` as the log records it, its password, its signed query): both splits."""
    without_password, password = split_url_password(name)
    recorded, query = split_url_query(without_password)
    return recorded, password, query


def request_url(recorded: str, password: str | None, query: str | None) -> str:
    """The URL to request: ``recorded`` with its password and its query put back."""
    return url_with_query(url_with_password(recorded, password), query)
