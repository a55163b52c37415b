"""Where usage delivery's CPU goes in a whole Gate: seconds of CPU per process (Gate and its delivery process)
and wrk's latency, for ``usage.delivery: loop`` and ``process`` and for ``publisher: none``.

Gate is pinned to CPU 0 and wrk and the fake upstream to CPU 1, as ``make bench`` pins them; ``--child-cpu 1``
moves the delivery process to CPU 1 after start (a core "to spare", here shared with the load generator).
One configuration per run; interleave runs yourself and compare within the session, this machine is noisy.
``PYTHONPATH=<an earlier commit's src>`` runs that code instead (an A/B); ``GATE_SERVE_ARGS="--workers 1"`` adds
arguments to ``gate serve`` (``make bench`` starts Gate with ``--workers 1``). The outbox depth printed at the end
is how many usage events delivery still owed when the load stopped.

Run (RabbitMQ on 127.0.0.1:5672): ``.venv/bin/python benchmarks/micro/delivery_cpu.py process --connections 50``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))

from gate_rig import GateRig
from load import run_wrk, write_script
from procs import free_port, wait_port
from run import outbox_depth


def cpu_seconds(pid: int) -> tuple[float, float]:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def children(pid: int) -> list[int]:
    found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False).stdout.split()
    return [int(p) for p in found]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=("loop", "process", "none"))
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--child-cpu", help="move the delivery process to these CPUs (taskset list)")
    args = parser.parse_args()

    work = Path(f"/tmp/gate-delivery-cpu-{args.mode}")
    work.mkdir(parents=True, exist_ok=True)
    for stale in work.glob("outbox*"):
        stale.unlink()
    rig = GateRig()
    fake_port, gate_port = free_port(), free_port()
    python = str(ROOT / ".venv" / "bin" / "python")
    fake = subprocess.Popen(
        ["taskset", "-c", "1", python, str(BENCH / "fake_upstream.py"), "--port", str(fake_port), "--pace-ms", "0"],
        stdout=subprocess.DEVNULL,
    )
    publisher = "none" if args.mode == "none" else "rabbitmq"
    config = rig.write_config(
        work / "gate.yaml",
        port=gate_port,
        upstream=f"http://127.0.0.1:{fake_port}",
        publisher=publisher,
        outbox=work / "outbox.sqlite3",
    )
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(work),
        "GATE_PROFILES": "bench",
        "USAGE_DELIVERY": "loop" if args.mode == "none" else args.mode,
    }
    if os.environ.get("PYTHONPATH"):  # an A/B against an earlier commit's src (git archive)
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    with (work / "gate.log").open("w") as log:
        gate = subprocess.Popen(
            [
                "taskset",
                "-c",
                "0",
                str(ROOT / ".venv" / "bin" / "gate"),
                "serve",
                "--config",
                str(config),
                *os.environ.get("GATE_SERVE_ARGS", "").split(),
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_port("127.0.0.1", fake_port, 20)
        wait_port("127.0.0.1", gate_port, 30)
        time.sleep(1)
        pids = [gate.pid, *children(gate.pid)]
        if args.child_cpu and len(pids) > 1:
            subprocess.run(
                ["taskset", "-a", "-p", "-c", args.child_cpu, str(pids[1])], stdout=subprocess.DEVNULL, check=True
            )
        script = write_script(work / "json.lua", rig.token, "json")
        run_wrk(f"http://127.0.0.1:{gate_port}", script, args.connections, 2, "1")  # warm
        before = {pid: cpu_seconds(pid) for pid in pids}
        result = run_wrk(f"http://127.0.0.1:{gate_port}", script, args.connections, args.seconds, "1")
        after = {pid: cpu_seconds(pid) for pid in pids}
        behind = outbox_depth(f"http://127.0.0.1:{gate_port}")
        print(
            f"{args.mode} (child on {args.child_cpu or 'CPU 0'}) c={args.connections}: {result.rps:,.0f} req/s, "
            f"p50 {result.p50:.3f} p99 {result.p99:.3f} p99.9 {result.p999:.3f} ms; outbox depth at the end {behind}"
        )
        for pid in pids:
            user, system = (a - b for a, b in zip(after[pid], before[pid], strict=True))
            role = "gate" if pid == gate.pid else "delivery process"
            per = (user + system) / max(result.requests, 1) * 1e6
            print(f"  {role}: {user:.2f} s user, {system:.2f} s system, {per:.0f} us per request")
    finally:
        gate.terminate()
        gate.wait(30)
        fake.terminate()
        fake.wait()
        rig.close()


if __name__ == "__main__":
    main()
