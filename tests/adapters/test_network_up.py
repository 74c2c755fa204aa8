"""Whether the network is up (adapters/network.py) on a fake /sys laid out as sysfs lays it
out: ``class/net/<if>`` links to the interface's device directory, under
``devices/virtual/net`` for a virtual one, under its bus (with a ``device`` link to the
hardware) for a physical one (bits-core.md §5: a pulled cable is a disconnect, not an error)."""

from __future__ import annotations

from pathlib import Path

import pytest

from backhaul.adapters.network import network_up

UP = ("up", "1")
DOWN = ("down", "0")
UNKNOWN = ("unknown", "1")  # what tun and loopback show


def fake_sys(
    root: Path, physical: dict[str, tuple[str, str]], virtual: dict[str, tuple[str, str]]
) -> Path:
    """/sys under ``root`` with these interfaces (name: (operstate, carrier)); lo is
    always there and up. Returns its class/net directory."""
    net = root / "class" / "net"
    net.mkdir(parents=True)
    pci = root / "devices" / "pci0000:00" / "0000:00:03.0"
    pci.mkdir(parents=True)
    for name, state, hardware in [
        ("lo", UNKNOWN, False),
        *((n, s, True) for n, s in physical.items()),
        *((n, s, False) for n, s in virtual.items()),
    ]:
        where = (pci / "net" / name) if hardware else (root / "devices" / "virtual" / "net" / name)
        where.mkdir(parents=True)
        if hardware:
            (where / "device").symlink_to(pci)
        (where / "operstate").write_text(state[0] + "\n")
        (where / "carrier").write_text(state[1] + "\n")
        (net / name).symlink_to(where)
    return net


@pytest.mark.parametrize(
    "virtual",
    [
        {"docker0": UP, "veth1a2b3c": UP},  # a running container
        {"tun0": UNKNOWN},  # a VPN
        {"br0": UP, "virbr0": UP},
    ],
)
def test_a_pulled_cable_is_down_whatever_virtual_interfaces_are_up(
    tmp_path: Path, virtual: dict[str, tuple[str, str]]
) -> None:
    assert not network_up(fake_sys(tmp_path, {"eth0": DOWN}, virtual))


def test_a_physical_link_with_a_carrier_is_up(tmp_path: Path) -> None:
    assert network_up(fake_sys(tmp_path, {"eth0": DOWN, "wlan0": UP}, {"docker0": DOWN}))


def test_without_a_physical_interface_the_virtual_ones_tell(tmp_path: Path) -> None:
    """A container or a network namespace has only virtual interfaces (its eth0 is a veth):
    their links are all there is to go by, as for the veth the netns tests pull."""
    assert network_up(fake_sys(tmp_path / "a", {}, {"eth0": UP}))
    assert not network_up(fake_sys(tmp_path / "b", {}, {"eth0": DOWN}))


def test_loopback_alone_counts_as_up_and_never_counts_beside_others(tmp_path: Path) -> None:
    assert network_up(fake_sys(tmp_path / "a", {}, {}))  # every transfer is local
    assert not network_up(fake_sys(tmp_path / "b", {"eth0": DOWN}, {}))
