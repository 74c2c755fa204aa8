"""The transport registry: entry points keyed by scheme, lazy imports, which distribution
supplied what, and the errors that say what to install. Plugins here are real distributions:
a ``*.dist-info`` directory on ``sys.path``, as pip would leave it."""

from __future__ import annotations

import asyncio
import secrets
import sys
import tomllib
from pathlib import Path

import pytest

from backhaul.adapters import registry
from backhaul.adapters.registry import (
    ACTIVE,
    AMBIGUOUS,
    BUILTINS,
    SHADOWED,
    LazyTransports,
    TransportEntry,
    TransportRegistry,
)
from backhaul.core import hresult
from backhaul.core.error import BitsError, TransferError
from backhaul.core.vocabulary import ErrorContext
from backhaul.transports.file import FileTransport

ROOT = Path(__file__).resolve().parents[2]

TRANSPORT_SOURCE = """
class {cls}:
    schemes = frozenset({schemes!r})
    capabilities = frozenset({{"ranges"}})
    made = 0
    def __init__(self):
        type(self).made += 1
    async def stat(self, url, options): raise NotImplementedError
    async def open(self, url, options, *, offset=0, length=None, validator=None):
        raise NotImplementedError
    async def close(self): self.closed = True
"""


def install(
    site: Path, dist: str, version: str, entries: dict[str, str], modules: dict[str, str]
) -> None:
    """A distribution as pip installs it: its modules and a dist-info with entry points."""
    info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    lines = "".join(f"{scheme} = {value}\n" for scheme, value in entries.items())
    (info / "entry_points.txt").write_text(f"[{registry.GROUP}]\n{lines}")
    for module, source in modules.items():
        (site / f"{module}.py").write_text(source)


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "site-packages"
    path.mkdir()
    monkeypatch.syspath_prepend(str(path))
    return path


def module_name() -> str:
    return f"bh_plugin_{secrets.token_hex(4)}"


def plugin(site: Path, dist: str, scheme: str, version: str = "1.0") -> str:
    """Install ``dist`` with one transport for ``scheme``; return its module name."""
    mod = module_name()
    source = TRANSPORT_SOURCE.format(cls="PluginTransport", schemes={scheme})
    install(site, dist, version, {scheme: f"{mod}:PluginTransport"}, {mod: source})
    return mod


# -- discovery -----------------------------------------------------------------------------------


def test_a_plugin_is_found_by_scheme_with_its_distribution_and_version(site: Path) -> None:
    mod = plugin(site, "backhaul-gopher", "gopher", "2.5")
    reg = TransportRegistry()
    entry = reg.entry("gopher")
    assert entry.row() == ("gopher", f"{mod}:PluginTransport", "backhaul-gopher", "2.5")
    assert ("gopher", f"{mod}:PluginTransport", "backhaul-gopher", "2.5", ACTIVE) in reg.rows()
    assert "gopher" in reg.schemes()


def test_listing_imports_nothing(site: Path) -> None:
    mod = plugin(site, "backhaul-gopher", "gopher")
    reg = TransportRegistry()
    reg.rows()
    transports = reg.lazy()
    assert "gopher" in list(transports)
    assert mod not in sys.modules
    transports["gopher"]
    assert mod in sys.modules


def test_scheme_lookup_is_case_insensitive(site: Path) -> None:
    plugin(site, "backhaul-gopher", "gopher")
    assert TransportRegistry().lazy()["GoPhEr"].schemes == frozenset({"gopher"})


@pytest.mark.parametrize("group", registry.GROUPS)
def test_the_builtins_are_listed_as_backhauls(group: str) -> None:
    rows = {row[0]: row for row in TransportRegistry(group=group).rows()}
    for scheme, value in BUILTINS[group].items():
        assert rows[scheme][1:3] == (value, "backhaul")
        assert rows[scheme][4] == ACTIVE


@pytest.mark.parametrize("group", registry.GROUPS)
def test_the_builtin_table_equals_the_pyproject_entry_points(group: str) -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    declared = project["project"].get("entry-points", {}).get(group, {})
    assert declared == dict(BUILTINS[group]), (
        f'pyproject.toml [project.entry-points."{group}"] must list exactly '
        f"registry.BUILTINS[{group!r}]"
    )


def test_the_file_builtin_builds_a_file_transport_and_uploader() -> None:
    assert isinstance(TransportRegistry().create("file"), FileTransport)
    assert isinstance(registry.uploaders()["file"], FileTransport)


def test_uploaders_have_their_own_group(site: Path) -> None:
    mod = module_name()
    source = TRANSPORT_SOURCE.format(cls="Up", schemes={"gopher"})
    info = site / "backhaul_gopher_up-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: backhaul-gopher-up\nVersion: 1.0\n"
    )
    (info / "entry_points.txt").write_text(f"[{registry.UPLOAD_GROUP}]\ngopher = {mod}:Up\n")
    (site / f"{mod}.py").write_text(source)
    assert "gopher" not in TransportRegistry().schemes()
    uploads = TransportRegistry(group=registry.UPLOAD_GROUP)
    assert uploads.entry("gopher").distribution == "backhaul-gopher-up"
    assert ("upload", "gopher", f"{mod}:Up", "backhaul-gopher-up", "1.0", ACTIVE) in (
        registry.installed_rows()
    )
    with pytest.raises(TransferError) as info_:
        registry.transport_for(TransportRegistry([], group=registry.UPLOAD_GROUP).lazy(), "x://h/y")
    assert "no uploader for 'x' URLs" in info_.value.message


# -- one instance per object path ----------------------------------------------------------------


def test_schemes_of_one_object_path_share_one_instance(site: Path) -> None:
    mod = module_name()
    source = TRANSPORT_SOURCE.format(cls="Both", schemes={"gopher", "gophers"})
    entries = {"gopher": f"{mod}:Both", "gophers": f"{mod}:Both"}
    install(site, "backhaul-gopher", "1.0", entries, {mod: source})
    reg = TransportRegistry()
    transports = reg.lazy()
    assert transports["gopher"] is transports["gophers"]
    assert sys.modules[mod].Both.made == 1
    assert reg.transports(["gopher", "gophers"])["gopher"] is not transports["gopher"]
    assert transports.loaded() == [transports["gopher"]]


def test_close_all_closes_only_what_was_built(site: Path) -> None:
    plugin(site, "backhaul-gopher", "gopher")
    other = plugin(site, "backhaul-wais", "wais")
    transports = TransportRegistry().lazy()
    used = transports["gopher"]
    asyncio.run(registry.close_all(transports))
    assert used.closed  # type: ignore[attr-defined]
    assert other not in sys.modules


def test_close_all_closes_a_shared_instance_of_a_plain_mapping_once() -> None:
    closed: list[object] = []

    class Counting(FileTransport):
        async def close(self) -> None:
            closed.append(self)

    shared = Counting()
    asyncio.run(registry.close_all({"a": shared, "b": shared}))
    assert closed == [shared]


def test_close_all_closes_the_others_when_one_close_fails(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A plugin whose close raises stopped the closing (the others' connections stayed
    open) and the exception came out of the engine's run."""
    closed: list[str] = []

    class Failing(FileTransport):
        async def close(self) -> None:
            raise RuntimeError("the plugin's close failed")

    class Counting(FileTransport):
        async def close(self) -> None:
            closed.append("closed")

    asyncio.run(registry.close_all({"a": Failing(), "b": Counting()}))
    assert closed == ["closed"]
    assert "the other transports are closed" in caplog.text


# -- conflicts ------------------------------------------------------------------------------------


def test_a_plugin_replaces_a_builtin_scheme(site: Path) -> None:
    mod = plugin(site, "backhaul-fancy-file", "file")
    reg = TransportRegistry()
    assert reg.entry("file").distribution == "backhaul-fancy-file"
    assert type(reg.create("file")).__module__ == mod
    statuses = {row[2]: row[4] for row in reg.rows() if row[0] == "file"}
    assert statuses == {"backhaul": SHADOWED, "backhaul-fancy-file": ACTIVE}


def test_two_plugins_for_one_scheme_are_refused_naming_both(site: Path) -> None:
    plugin(site, "backhaul-gopher-a", "gopher")
    plugin(site, "backhaul-gopher-b", "gopher")
    reg = TransportRegistry()
    assert {row[4] for row in reg.rows() if row[0] == "gopher"} == {AMBIGUOUS}
    with pytest.raises(TransferError) as info:
        reg.lazy()["gopher"]
    assert "backhaul-gopher-a" in info.value.message
    assert "backhaul-gopher-b" in info.value.message
    assert (info.value.hresult, info.value.transient) == (hresult.E_INVALIDARG, False)
    with pytest.raises(BitsError) as refused:  # at AddFile already, not only at transfer
        reg.check("gopher://host/x")
    assert refused.value.hresult == hresult.E_INVALIDARG
    assert "backhaul-gopher-a" in refused.value.message
    assert "backhaul-gopher-b" in refused.value.message
    assert "gopher://host/x" in refused.value.message


# -- errors ---------------------------------------------------------------------------------------


def fatal_invalidarg(exc: TransferError) -> None:
    assert (exc.hresult, exc.context, exc.transient) == (
        hresult.E_INVALIDARG,
        ErrorContext.GENERAL_TRANSPORT,
        False,
    )


def test_check_refuses_a_scheme_nobody_serves_naming_it() -> None:
    with pytest.raises(BitsError) as info:
        TransportRegistry([]).check("gopher://host/x")
    assert info.value.hresult == hresult.E_INVALIDARG
    assert "'gopher'" in info.value.message
    assert "gopher://host/x" in info.value.message


def test_a_missing_builtin_names_the_extra_to_install() -> None:
    with pytest.raises(BitsError) as info:
        TransportRegistry([]).check("\\\\server\\share\\file.bin")
    assert "pip install 'backhaul[smb]'" in info.value.message
    with pytest.raises(TransferError) as error:
        registry.transport_for(TransportRegistry([]).lazy(), "https://example.org/x")
    fatal_invalidarg(error.value)
    assert "pip install 'backhaul[http]'" in error.value.message


def test_transport_for_a_plain_mapping_without_the_scheme_is_fatal() -> None:
    with pytest.raises(TransferError) as info:
        registry.transport_for({"file": FileTransport()}, "ftp://host/x")
    fatal_invalidarg(info.value)
    assert "'ftp'" in info.value.message


def test_a_builtin_whose_library_is_missing_names_the_extra() -> None:
    entry = TransportEntry("https", "no_such_library_for_backhaul:Transport", "backhaul", "0.1")
    with pytest.raises(TransferError) as info:
        TransportRegistry([entry]).create("https")
    fatal_invalidarg(info.value)
    assert "No module named 'no_such_library_for_backhaul'" in info.value.message
    assert "pip install 'backhaul[http]'" in info.value.message


def test_a_plugin_that_fails_to_import_says_which_distribution_to_reinstall(site: Path) -> None:
    mod = module_name()
    install(site, "backhaul-broken", "0.3", {"gopher": f"{mod}:T"}, {mod: "import no_such_lib\n"})
    with pytest.raises(TransferError) as info:
        TransportRegistry().create("gopher")
    fatal_invalidarg(info.value)
    assert "backhaul-broken" in info.value.message
    assert "reinstall backhaul-broken" in info.value.message


def test_a_plugin_that_does_not_serve_its_scheme_is_refused(site: Path) -> None:
    mod = module_name()
    source = TRANSPORT_SOURCE.format(cls="Wrong", schemes={"wais"})
    install(site, "backhaul-wrong", "1.0", {"gopher": f"{mod}:Wrong"}, {mod: source})
    with pytest.raises(TransferError) as info:
        TransportRegistry().create("gopher")
    fatal_invalidarg(info.value)
    assert "serves ['wais']" in info.value.message


def test_a_plugin_whose_factory_raises_is_refused(site: Path) -> None:
    mod = module_name()
    source = "def make():\n    raise RuntimeError('no config')\n"
    install(site, "backhaul-raising", "1.0", {"gopher": f"{mod}:make"}, {mod: source})
    with pytest.raises(TransferError) as info:
        TransportRegistry().create("gopher")
    assert "no config" in info.value.message


def test_lazy_lookup_of_an_unserved_scheme_is_a_key_error() -> None:
    transports = LazyTransports(TransportRegistry([]))
    assert transports.get("gopher") is None
    assert len(transports) == 0


@pytest.mark.parametrize(
    ("remote_name", "scheme"),
    [
        ("HTTPS://example.org/x", "https"),
        ("file:///tmp/x", "file"),
        ("\\\\server\\share\\x", "smb"),
        ("/tmp/x", ""),
        ("ftp://h/x://y", "ftp"),
    ],
)
def test_scheme_of(remote_name: str, scheme: str) -> None:
    assert registry.scheme_of(remote_name) == scheme


def test_format_table_aligns_the_columns() -> None:
    text = registry.format_table(
        [
            (
                "download",
                "file",
                "backhaul.transports.file:FileTransport",
                "backhaul",
                "0.1.0",
                ACTIVE,
            )
        ]
    )
    header, row = text.splitlines()
    assert header.split() == list(registry.HEADER)
    assert row.split()[1:] == [
        "file",
        "backhaul.transports.file:FileTransport",
        "backhaul",
        "0.1.0",
        ACTIVE,
    ]
    assert header.index("DISTRIBUTION") == row.index("backhaul ")
