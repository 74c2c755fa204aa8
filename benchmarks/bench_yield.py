"""Does a background job yield to a competing download? (issue: background that stays in
the background). Two network namespaces joined by a veth pair shaped with tbf; a file
server in one; in the other a background `backhaul get --priority normal` and, after it
has settled, a competing foreground `curl` download from the same server. Reports the
competing flow's throughput as a share of its solo throughput, with yielding on and off,
and the background job's rate meanwhile.

    .venv/bin/python benchmarks/bench_yield.py [--rate 80mbit] [--seconds 8] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from peers.netns import linked_hosts  # noqa: E402

BIN = Path(sys.executable).parent


def curl_rate(hosts, url: str, seconds: float) -> float:  # type: ignore[no-untyped-def]
    result = hosts.run(
        hosts.client_ns,
        [
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "--max-time",
            str(seconds),
            "-w",
            "%{speed_download}",
            url,
        ],
        capture_output=True,
        check=False,
    )
    return float(result.stdout.strip() or 0)


def bytes_done(home: Path, job: str) -> int:
    out = subprocess.run(
        [str(BIN / "backhaul"), "--home", str(home), "info", job, "--json"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return int(json.loads(out)["bytes_transferred"])


def run_case(hosts, www: Path, work: Path, yielding: bool, seconds: float) -> dict[str, float]:  # type: ignore[no-untyped-def]
    home = work / f"home-{yielding}"
    dest = work / f"bg-{yielding}.bin"
    url_bg = f"http://{hosts.server_ip}:8080/bg.bin"
    url_fg = f"http://{hosts.server_ip}:8080/fg.bin"
    job = subprocess.run(
        [
            str(BIN / "backhaul"),
            "--home",
            str(home),
            "create",
            "background",
            "--priority",
            "normal",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    subprocess.run(
        [str(BIN / "backhaul"), "--home", str(home), "addfile", job, url_bg, str(dest)], check=True
    )
    subprocess.run([str(BIN / "backhaul"), "--home", str(home), "resume", job], check=True)
    serve = hosts.popen(
        hosts.client_ns,
        [
            str(BIN / "backhaul"),
            "--home",
            str(home),
            "serve",
            "--poll",
            "0.1",
            *([] if yielding else ["--no-yield"]),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(3.0)  # the background job settles at full speed
        before, t0 = bytes_done(home, job), time.monotonic()
        fg = curl_rate(hosts, url_fg, seconds)
        after, t1 = bytes_done(home, job), time.monotonic()
    finally:
        serve.terminate()
        serve.wait(timeout=30)
    return {"foreground_rate": fg, "background_rate": (after - before) / (t1 - t0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rate", default="80mbit")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, linked_hosts("bhy") as hosts:
        work = Path(tmp)
        www = work / "www"
        www.mkdir()
        for name in ("bg.bin", "fg.bin"):
            with open(www / name, "wb") as f:
                f.write(os.urandom(1024 * 1024) * 400)
        hosts.shape(args.rate)
        server = hosts.popen(
            hosts.server_ns,
            [
                sys.executable,
                "-m",
                "backhaul.adapters.fileserver",
                str(www),
                "--host",
                hosts.server_ip,
                "--port",
                "8080",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            time.sleep(1.0)
            solo = curl_rate(hosts, f"http://{hosts.server_ip}:8080/fg.bin", args.seconds)
            on = run_case(hosts, www, work, True, args.seconds)
            off = run_case(hosts, www, work, False, args.seconds)
        finally:
            server.terminate()
            server.wait(timeout=10)
    result = {
        "link": args.rate,
        "curl_solo_Bps": solo,
        "yield_on": {**on, "foreground_share_of_solo": on["foreground_rate"] / solo},
        "yield_off": {**off, "foreground_share_of_solo": off["foreground_rate"] / solo},
    }
    print(f"link {args.rate}: curl alone {solo / 1e6:.2f} MB/s")
    for name in ("yield_on", "yield_off"):
        r = result[name]
        print(
            f"{name:>9}: curl {r['foreground_rate'] / 1e6:.2f} MB/s "  # type: ignore[index]
            f"({r['foreground_share_of_solo']:.0%} of solo), "  # type: ignore[index]
            f"background job {r['background_rate'] / 1e6:.2f} MB/s"  # type: ignore[index]
        )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
