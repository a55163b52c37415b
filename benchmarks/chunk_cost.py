"""CPU time a proxy spends per relayed stream chunk, read from ``/proc`` while wrk holds paced streams open.

Latency on a shared machine moves with everyone else's load; the CPU time the proxy's process burns per chunk
moves much less. This is the measurement ``ANALYSIS.md`` used for "about 50 us per chunk": 50 streams paced by the
fake (10 ms per event, so every event is a read of its own), the proxy's CPU seconds over the window divided by
the events relayed (streams completed x 25 events; per-request work is included). It also reports CPU per
request for unpaced streams at c=50 (one read per stream: the per-request part alone)::

    .venv/bin/python benchmarks/chunk_cost.py --only gate-nopub,minimal --rounds 3 [--before SRC]

``--before SRC`` adds ``gate-before`` (``gate-nopub`` with ``PYTHONPATH=SRC``), as in ``run.py --before``. Contenders
run pinned as in run.py; rounds are interleaved.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import contenders as lineup
import run
from load import run_wrk

EVENTS_PER_STREAM = 25  # fake_upstream.sse_events()
_READS = "syscalls:sys_enter_read,syscalls:sys_enter_recvfrom"


class Reads:
    """read(2)/recvfrom(2) calls of a process over a window, counted by ``perf stat`` (0 without perf): under
    load the kernel hands a proxy several events in one read, so CPU per read is steadier than CPU per event."""

    def __init__(self, pids: list[int], seconds: float) -> None:
        self._out = Path(tempfile.mkstemp(suffix=".perf")[1])
        self._proc = None
        if shutil.which("perf"):
            cmd = ["perf", "stat", "-x,", "-e", _READS, "-o", str(self._out), "-p", ",".join(map(str, pids))]
            cmd += ["--", "sleep", f"{seconds:g}"]
            self._proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def count(self) -> int:
        if self._proc is None:
            return 0
        self._proc.wait(timeout=60)
        total = 0
        for line in self._out.read_text().splitlines():
            fields = line.split(",")
            if len(fields) > 2 and fields[0].isdigit():
                total += int(fields[0])
        self._out.unlink(missing_ok=True)
        return total


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="gate-nopub,minimal")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=float, default=6.0)
    p.add_argument("--before", default=None)
    args = p.parse_args(argv)
    before = ["--before", args.before] if args.before else []
    bench_args = run.parse_args(["--phases", "main", "--skip-install", "--rounds", str(args.rounds), *before])
    bench = run.Bench(bench_args)
    names = [n for n in args.only.split(",") if n] + (["gate-before"] if args.before else [])
    results: dict[str, dict[str, list[float]]] = {
        n: {"paced_us_per_chunk": [], "paced_us_per_read": [], "stream_us_per_request": []} for n in names
    }
    try:
        with run._pinned_to(bench.rig_cpus):
            paced_url = bench.start_fake("fake-paced", pace_ms=10)
            fast_url = bench.start_fake("fake")
            running: list[tuple[Any, Any]] = []
            for name in names:
                pair = []
                for url in (paced_url, fast_url):
                    setup = bench.setup(url)
                    c = lineup.build(name, setup)
                    c.name = f"{name}@{'paced' if url == paced_url else 'fast'}"
                    if not bench.launch(c, url, stream_check=url == fast_url):
                        raise SystemExit(f"{c.name} did not start: {c.status}")
                    pair.append(c)
                running.append((name, pair))
            for rnd in range(args.rounds):
                order = running[rnd % len(running) :] + running[: rnd % len(running)]
                for name, (paced, fast) in order:
                    bench.settle()
                    before = paced.proc.cpu_seconds()
                    reads = Reads(paced.proc.tree(), args.duration)
                    wrk = run_wrk(paced.url, bench.scripts["paced"], 50, args.duration, bench.rig_cpus)
                    used = paced.proc.cpu_seconds() - before
                    read_count = reads.count()
                    chunks = wrk.requests * EVENTS_PER_STREAM
                    per_chunk = used / chunks * 1e6 if chunks else float("nan")
                    per_read = used / read_count * 1e6 if read_count else float("nan")
                    results[name]["paced_us_per_chunk"].append(per_chunk)
                    results[name]["paced_us_per_read"].append(per_read)
                    bench.settle()
                    before = fast.proc.cpu_seconds()
                    wrk2 = run_wrk(fast.url, bench.scripts["stream"], 50, args.duration, bench.rig_cpus)
                    used2 = fast.proc.cpu_seconds() - before
                    per_request = used2 / wrk2.requests * 1e6 if wrk2.requests else float("nan")
                    results[name]["stream_us_per_request"].append(per_request)
                    print(
                        f"round {rnd + 1} {name:12} paced: {wrk.requests} streams, {used:.2f} s CPU, "
                        f"{per_chunk:.1f} us/chunk, {read_count} reads, {per_read:.1f} us/read | "
                        f"unpaced c=50: {wrk2.rps:,.0f} req/s, {per_request:.1f} us/request",
                        flush=True,
                    )
    finally:
        bench.close()
    print(f"{'contender':14}{'us/chunk (paced)':>18}{'us/read (paced)':>17}{'us/request (stream c=50)':>26}")
    for name, figures in results.items():
        med = {k: statistics.median(v) if v else float("nan") for k, v in figures.items()}
        print(
            f"{name:14}{med['paced_us_per_chunk']:18.1f}{med['paced_us_per_read']:17.1f}"
            f"{med['stream_us_per_request']:26.1f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
