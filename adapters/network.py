"""What the engine knows about the machine's network: is it up, and what does it cost.

- Up: some physical interface (in ``/sys/class/net``, one with a ``device`` link, or
  not under ``/sys/devices/virtual``) is up with a carrier, which is how a cable pull or
  a link taken down shows. Virtual ones (docker0 and other bridges, veth, tun VPNs) stay
  up when the cable is pulled, so they do not count while the machine has a physical
  one. A machine with none (a container, a network namespace: their eth0 is a veth) has
  only virtual ones to go by, so they count there; loopback never does. A machine whose
  only network is loopback counts as up (every transfer there is local).
- Cost: from the configuration first (``manager.set_network_cost``), else from
  NetworkManager's metered property when ``nmcli`` exists (yes/guess-yes -> usage-based,
  no/guess-no/unknown -> unrestricted), else BITS_COST_STATE_UNRESTRICTED.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from backhaul.core.vocabulary import CostFlags

SYS_NET = Path("/sys/class/net")


def network_up(root: Path = SYS_NET) -> bool:
    try:
        names = [p.name for p in root.iterdir()]
    except OSError:
        return True
    others = [n for n in names if n != "lo"]
    if not others:
        return True
    physical = [n for n in others if _physical(root / n)]
    return any(_up(root / n) for n in physical or others)


def _physical(path: Path) -> bool:
    """A class entry links to its device's directory: a virtual interface's is under
    ``/sys/devices/virtual`` and has no ``device`` link (the hardware it sits on)."""
    try:
        return (path / "device").exists() or "virtual" not in path.resolve().parts
    except OSError:
        return False


def _up(path: Path) -> bool:
    try:
        state = (path / "operstate").read_text().strip()
        if state == "down":
            return False
        return (path / "carrier").read_text().strip() == "1"
    except OSError:
        return False


def system_cost() -> int:
    nmcli = shutil.which("nmcli")
    if nmcli is None:
        return int(CostFlags.UNRESTRICTED)
    try:
        out = subprocess.run(
            [nmcli, "-t", "-f", "GENERAL.METERED", "device", "show"],
            capture_output=True,
            text=True,
            timeout=2,
            check=False,
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return int(CostFlags.UNRESTRICTED)
    metered = any(v.split(":", 1)[-1].startswith(("yes", "guess-yes")) for v in out.splitlines())
    return int(CostFlags.USAGE_BASED if metered else CostFlags.UNRESTRICTED)
