"""Where a proxy's time to first byte goes under ``make bench``'s paced load, read off the wire.

``make bench`` times the TTFB of probe streams sent while wrk holds 50 paced streams open (``paced_c50``); it
sees only the total. This runs the same load against each contender with ``tcpdump`` on the loopback interface
and splits each probe at the four packets that bound it:

- ``in``: the probe's request reaching the proxy -> the proxy's request to the fake upstream (its own work:
  parsing, authentication, policy, the upstream request, and any queue of other work in front of it);
- ``fake``: -> the fake's first response bytes (the upstream; on the rig's core);
- ``out``: -> the proxy's first response bytes to the probe (the response head and first event relayed).

``direct`` has no proxy: its ``wire`` total is the floor. For the slowest probes of each proxy it counts the
requests that reached the proxy from 2 ms before the probe until its first byte (the burst it queued behind:
wrk's paced streams all last ~250 ms, so their ends and the requests that follow come together), and, over the
whole run, the time between consecutive upstream requests sent within 2 ms of each other (what a request costs
the proxy before its upstream call, when requests queue). Kernel timestamps, taken as packets cross ``lo``;
the probe's own figure (``probe``) adds its wake-up on the rig's core.

Needs ``tcpdump`` (``apt-get install tcpdump``) and root (or CAP_NET_RAW). Pinned as ``make bench`` pins:
contenders on CPU 0; wrk, the fake, the probe and tcpdump on CPU 1. Rounds interleave the contenders.
Run: ``.venv/bin/python benchmarks/micro/ttfb_breakdown.py [--only direct,nginx,minimal,gate] [--rounds 2]``.
"""

from __future__ import annotations

import argparse
import bisect
import json
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(BENCH))

import contenders as lineup
from gate_rig import GateRig
from load import run_wrk, write_script
from procs import Proc, free_port, pinned, wait_port
from sse_client import percentiles

PYTHON = sys.executable
PROXY_CPUS, RIG_CPUS = "0", "1"
PACE_MARKER = b"bench-pace-ms"  # in wrk's paced requests only: the probe's requests are the ones without it
CHOICES = ("direct", "nginx", "minimal", "gate", "gate-nopub")  # gate: publishing to a file


# ------------------------------------------------------------------------------------------------ the capture


@dataclass
class Segment:
    """One TCP segment with a payload: kernel time (s), ports, the first bytes of its payload."""

    ts: float
    sport: int
    dport: int
    head: bytes


def read_pcap(path: Path) -> Iterator[Segment]:
    """TCP segments with payload from a pcap file of Ethernet (``tcpdump -i lo``) or Linux cooked frames.

    Hand-read, as the format is two fixed headers: this keeps the instrument free of a packet library."""
    data = path.read_bytes()
    if len(data) < 24:
        return
    magic = data[:4]
    if magic in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1"):
        endian = "<"
    elif magic in (b"\xa1\xb2\xc3\xd4", b"\xa1\xb2\x3c\x4d"):
        endian = ">"
    else:
        raise ValueError(f"{path}: not a pcap file")
    nano = magic in (b"\x4d\x3c\xb2\xa1", b"\xa1\xb2\x3c\x4d")
    linktype = struct.unpack(endian + "I", data[20:24])[0]
    link = {1: 14, 113: 16}.get(linktype)  # DLT_EN10MB, DLT_LINUX_SLL
    if link is None:
        raise ValueError(f"{path}: link type {linktype} (expected Ethernet or Linux cooked)")
    record = struct.Struct(endian + "IIII")
    offset = 24
    while offset + 16 <= len(data):
        sec, frac, caplen, _ = record.unpack_from(data, offset)
        frame = data[offset + 16 : offset + 16 + caplen]
        offset += 16 + caplen
        ip = frame[link:]
        if len(ip) < 20 or ip[0] >> 4 != 4 or ip[9] != 6:  # IPv4, TCP
            continue
        tcp = ip[(ip[0] & 0x0F) * 4 :]
        if len(tcp) < 20:
            continue
        payload = tcp[(tcp[12] >> 4) * 4 :]
        if payload:
            sport, dport = struct.unpack_from("!HH", tcp)
            yield Segment(sec + frac / (1e9 if nano else 1e6), sport, dport, payload[:8192])


@dataclass
class Probe:
    sent: float  # the probe's request reached the proxy (or the fake, for direct)
    client_port: int
    upstream_sent: float | None = None
    upstream_port: int | None = None
    upstream_first: float | None = None
    first: float | None = None  # the first response bytes to the probe


@dataclass
class Breakdown:
    probes: list[Probe] = field(default_factory=list)
    requests_in: list[float] = field(default_factory=list)  # every request reaching the proxy
    upstream_requests: list[float] = field(default_factory=list)


def breakdown(segments: Iterator[Segment], port: int, fake_port: int) -> Breakdown:
    """Follows each probe request (a POST without the pace marker) through the capture."""
    out = Breakdown()
    direct = port == fake_port
    waiting_client: dict[int, Probe] = {}  # client port -> its probe, until the first response bytes
    waiting_upstream: dict[int, Probe] = {}  # proxy's upstream port -> the probe it carries
    unmatched: list[Probe] = []  # probes whose upstream request has not been seen yet
    for s in segments:
        is_post = s.head.startswith(b"POST ")
        if s.dport == port and is_post:
            out.requests_in.append(s.ts)
            if PACE_MARKER not in s.head:
                probe = Probe(s.ts, s.sport)
                out.probes.append(probe)
                waiting_client[s.sport] = probe
                if not direct:
                    unmatched.append(probe)
        elif not direct and s.dport == fake_port and is_post:
            out.upstream_requests.append(s.ts)
            if PACE_MARKER not in s.head and unmatched:
                probe = unmatched.pop(0)
                probe.upstream_sent, probe.upstream_port = s.ts, s.sport
                waiting_upstream[s.sport] = probe
        elif not direct and s.sport == fake_port and s.dport in waiting_upstream:
            waiting_upstream.pop(s.dport).upstream_first = s.ts
        elif s.sport == port and s.dport in waiting_client:
            waiting_client.pop(s.dport).first = s.ts
    return out


def summarize(name: str, b: Breakdown, probe_ttfb: dict[str, float]) -> dict[str, Any]:
    """Percentiles of each part (ms) and the slowest probes, each with the requests it queued among."""
    wire: list[float] = []
    parts: list[tuple[float, float, float, float, Probe]] = []  # wire, in, fake, out
    for p in b.probes:
        if p.first is None:
            continue
        wire.append((p.first - p.sent) * 1000)
        if p.upstream_sent is not None and p.upstream_first is not None:
            inbound = (p.upstream_sent - p.sent) * 1000
            fake = (p.upstream_first - p.upstream_sent) * 1000
            parts.append((wire[-1], inbound, fake, (p.first - p.upstream_first) * 1000, p))
    result: dict[str, Any] = {"contender": name, "probes": len(wire), "probe": probe_ttfb, "wire": percentiles(wire)}
    if not parts:
        return result
    result["in"] = percentiles([row[1] for row in parts])
    result["fake"] = percentiles([row[2] for row in parts])
    result["out"] = percentiles([row[3] for row in parts])
    ups = b.upstream_requests
    result["queued_request_gap_us"] = percentiles(
        [gap for a, later in pairwise(ups) if (gap := (later - a) * 1e6) < 2000], (10, 50, 90)
    )
    arrivals = b.requests_in
    result["slowest"] = [
        {
            "wire": round(total, 3),
            "in": round(inbound, 3),
            "fake": round(fake, 3),
            "out": round(out, 3),
            "requests_around": bisect.bisect_right(arrivals, p.first or p.sent)
            - bisect.bisect_left(arrivals, p.sent - 0.002),
        }
        for total, inbound, fake, out, p in sorted(parts, key=lambda row: -row[0])[:5]
    ]
    return result


# ------------------------------------------------------------------------------------------------ the runs


def one_round(
    c: lineup.Contender, port: int, fake_port: int, token: str, work: Path, args: argparse.Namespace
) -> dict[str, Any]:
    capture = work / f"{c.name}.pcap"
    script = write_script(work / "lua" / "paced.lua", token, "paced")
    run_wrk(c.url, script, 50, 2, RIG_CPUS)  # warm
    time.sleep(1)
    filter_ = f"tcp port {port}" + ("" if port == fake_port else f" or tcp port {fake_port}")
    dump = subprocess.Popen(
        pinned(["tcpdump", "-i", "lo", "-n", "-s", "8192", "-B", "65536", "-w", str(capture), filter_], RIG_CPUS),
        stderr=subprocess.PIPE,
    )
    time.sleep(1.0)
    if dump.poll() is not None:
        raise RuntimeError(f"tcpdump did not start: {dump.stderr.read().decode()[-300:] if dump.stderr else ''}")
    probe = subprocess.Popen(
        pinned(
            [
                PYTHON,
                str(BENCH / "ttfb_probe.py"),
                "--url",
                c.url,
                "--count",
                str(args.probes),
                "--window",
                f"{args.seconds - 1.5:g}",
                "--delay",
                "1",
            ],
            RIG_CPUS,
        ),
        stdout=subprocess.PIPE,
        env={"PATH": "/usr/bin:/bin", "BENCH_TOKEN": c.token or token},
        cwd=BENCH,
    )
    load = run_wrk(c.url, script, 50, args.seconds, RIG_CPUS)
    out, _ = probe.communicate(timeout=60)
    time.sleep(0.3)
    dump.terminate()
    dump.wait(timeout=10)
    ttfb = json.loads(out)["ttfb_ms"]
    result = summarize(c.name, breakdown(read_pcap(capture), port, fake_port), ttfb)
    result["load_errors"] = load.errors + load.non_2xx  # wrk's paced requests that failed: the load was not served
    capture.unlink()
    return result


def show(results: list[dict[str, Any]]) -> None:
    def cell(r: dict[str, Any], key: str) -> str:
        p = r.get(key) or {}
        return f"{p.get('p50', float('nan')):.3f} / {p.get('p99', float('nan')):.3f}"

    print("\nper contender and round, p50 / p99 in ms (probe: as ttfb_probe.py reports it; wire: on lo)")
    print(f"{'contender':12} {'n':>4} {'probe':>15} {'wire':>15} {'in':>15} {'fake':>15} {'out':>15}  queued gap us")
    for r in results:
        gap = r.get("queued_request_gap_us") or {}
        gaps = f"{gap.get('p10', 0):.0f} / {gap.get('p50', 0):.0f} / {gap.get('p90', 0):.0f}" if gap else "-"
        failed = f"  ({r['load_errors']} of wrk's requests failed)" if r.get("load_errors") else ""
        print(
            f"{r['contender']:12} {r['probes']:>4} {cell(r, 'probe'):>15} {cell(r, 'wire'):>15} {cell(r, 'in'):>15} "
            f"{cell(r, 'fake'):>15} {cell(r, 'out'):>15}  {gaps}{failed}"
        )
    print(
        "\nslowest probes (ms; requests_around: requests that reached the proxy from 2 ms before it to its first byte)"
    )
    for r in results:
        for s in r.get("slowest", []):
            print(f"  {r['contender']:12} {json.dumps(s)}")


def build(name: str, setup: lineup.Setup) -> lineup.Contender:
    """As ``make bench`` builds them, but ``gate`` publishes to a file (outbox, writer and delivery as for
    RabbitMQ, without a broker on the rig's core: its TTFB under paced load was the same in the sixth pass)."""
    if name == "gate":
        return lineup.gate(setup, "gate", publisher="file")
    return lineup.build(name, setup)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="direct,nginx,minimal,gate", help=f"comma-separated, of {','.join(CHOICES)}")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=7.0, help="wrk's paced load per round")
    parser.add_argument("--probes", type=int, default=200)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    names = [n for n in args.only.split(",") if n]
    for n in names:
        if n not in CHOICES:
            parser.error(f"unknown contender {n!r}")
    for tool in ("tcpdump", "wrk"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is not installed (apt-get install {tool})")
    work = Path(tempfile.mkdtemp(prefix="gate-ttfb-breakdown-"))
    rig = GateRig()
    fake_port = free_port()
    fake = Proc(
        "fake",
        [PYTHON, str(BENCH / "fake_upstream.py"), "--port", str(fake_port)],
        cpus=RIG_CPUS,
        log=work / "logs" / "fake.log",
    )
    started: list[lineup.Contender] = []
    try:
        wait_port("127.0.0.1", fake_port, 15, fake.popen)
        setup = lineup.Setup(
            work=work,
            fake_url=f"http://127.0.0.1:{fake_port}",
            rig=rig,
            proxy_cpus=PROXY_CPUS,
            quick=True,
            skip_install=True,
            rig_cpus=RIG_CPUS,
        )
        built = [build(n, setup) for n in names]
        for c in built:
            if c.status.startswith("skipped"):
                print(f"{c.name}: {c.status}")
                continue
            c.start(work)
            started.append(c)
        results = []
        for _ in range(args.rounds):
            for c in started:
                port = fake_port if c.name == "direct" else c.port
                results.append(one_round(c, port, fake_port, rig.token, work, args))
                print(f"  {c.name}: done ({results[-1]['probes']} probes)", flush=True)
        show(results)
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))
    finally:
        for c in started:
            c.stop()
        fake.stop()
        rig.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
