"""Gate's latency and CPU by what it publishes to: nothing, a file, a RabbitMQ node, or a peer that confirms at once.

The question it answers: of the p99 that usage publishing adds at c=1 in ``make bench``, how much is Gate's own
work and how much is the broker's? On a 2-core rig the broker has to share a core with something: ``make bench``
pins it to the rig's core (wrk and the fake upstream), since a deployment's broker runs on other hosts. Here the
same Gate publishes, in turn, to:

- ``none``: no usage events (the floor);
- ``file``: the JSON Lines sink (outbox, writer thread and delivery task as with RabbitMQ; no broker at all);
- ``rabbitmq``: a RabbitMQ node of this run's own (``broker.py``), pinned to the rig's core as in ``make bench``;
- ``confirming-peer``: ``amqp_peer.py``, an AMQP 0-9-1 endpoint that confirms every publish as it reads it,
  pinned to the rig's core: Gate's whole RabbitMQ path (its AMQP client, confirms, outbox), with almost no broker CPU.

Gate on CPU 0, wrk, the fake and the peers on CPU 1, as ``make bench`` pins them; rounds interleave the four.
Printed per publisher: median over rounds of wrk's p50, p90, p99, p99.9, Gate's CPU per request (user +
system, every thread), req/s and the events Gate still owed when the load stopped (near 0 when delivery works).
Run: ``.venv/bin/python benchmarks/micro/publisher_peer.py [--rounds 3] [--kind json] [--connections 1]``; with
``--connections 50`` (``make bench``'s throughput load) the CPU column is what publishing costs each request.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))

import gate_rig
from broker import OwnBroker
from load import run_wrk, write_script
from procs import free_port, wait_port
from run import outbox_depth

PUBLISHERS = ("none", "file", "rabbitmq", "confirming-peer")
PYTHON = str(ROOT / ".venv" / "bin" / "python")


# --------------------------------------------------------------------------------------------------- the runs


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def one_run(
    rig: gate_rig.GateRig, publisher: str, fake_url: str, broker_url: str, peer_url: str, work: Path, args: object
) -> dict[str, float]:
    port = free_port()
    config = rig.write_config(
        work / f"gate-{publisher}.yaml",
        port=port,
        upstream=fake_url,
        publisher="rabbitmq" if publisher == "confirming-peer" else publisher,
        outbox=work / f"outbox-{publisher}-{time.monotonic_ns()}.sqlite3",
        broker_url=peer_url if publisher == "confirming-peer" else broker_url,
    )
    env = {"PATH": os.environ["PATH"], "HOME": str(work), "GATE_PROFILES": "bench"}
    with (work / f"gate-{publisher}.log").open("w") as log:
        gate = subprocess.Popen(
            ["taskset", "-c", "0", str(ROOT / ".venv" / "bin" / "gate"), "serve", "--config", str(config)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_port("127.0.0.1", port, 30)
        url = f"http://127.0.0.1:{port}"
        script = write_script(work / f"{args.kind}.lua", rig.token, args.kind)  # type: ignore[attr-defined]
        connections = args.connections  # type: ignore[attr-defined]
        run_wrk(url, script, connections, 2, "1")  # warm
        before = cpu_seconds(gate.pid)
        result = run_wrk(url, script, connections, args.seconds, "1")  # type: ignore[attr-defined]
        cpu = cpu_seconds(gate.pid) - before
        owed = outbox_depth(url)
        return {
            "p50": result.p50,
            "p90": result.p90,
            "p99": result.p99,
            "p99.9": result.p999,
            "rps": result.requests / args.seconds,  # type: ignore[attr-defined]
            "cpu_us": cpu / max(result.requests, 1) * 1e6,
            # Events still in Gate's outbox when the load stops: a publisher that delivers keeps this near 0 (a
            # peer that never confirmed once showed here only as thousands owed).
            "owed": float("nan") if owed is None else owed,
        }
    finally:
        gate.terminate()
        gate.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=7.0)
    parser.add_argument("--kind", choices=("json", "stream"), default="json")
    parser.add_argument("--connections", type=int, default=1, help="wrk's connections (make bench: 1 and 50)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="gate-publisher-peer-"))
    rig = gate_rig.GateRig()
    broker = OwnBroker(work / "rabbitmq.log", "1")
    fake_port, peer_port = free_port(), free_port()
    fake = subprocess.Popen(
        ["taskset", "-c", "1", PYTHON, str(BENCH / "fake_upstream.py"), "--port", str(fake_port), "--pace-ms", "0"],
        stdout=subprocess.DEVNULL,
    )
    peer = subprocess.Popen(
        ["taskset", "-c", "1", PYTHON, str(BENCH / "amqp_peer.py"), "--port", str(peer_port)],
        stdout=subprocess.DEVNULL,
    )
    results: dict[str, list[dict[str, float]]] = {name: [] for name in PUBLISHERS}
    try:
        broker_url = broker.start()
        gate_rig.BROKER_URL = broker_url
        gate_rig.bind_usage_queue()
        wait_port("127.0.0.1", fake_port, 20)
        wait_port("127.0.0.1", peer_port, 20)
        fake_url, peer_url = f"http://127.0.0.1:{fake_port}", f"amqp://guest:guest@127.0.0.1:{peer_port}/"
        for round_ in range(args.rounds):
            for name in PUBLISHERS[round_ % len(PUBLISHERS) :] + PUBLISHERS[: round_ % len(PUBLISHERS)]:
                results[name].append(one_run(rig, name, fake_url, broker_url, peer_url, work, args))
                print(f"  round {round_ + 1} {name}: {results[name][-1]}", flush=True)
    finally:
        peer.terminate()
        fake.terminate()
        broker.stop()
        rig.close()
    print(
        f"Gate at c={args.connections}, {args.kind}, {args.rounds} x {args.seconds:g} s; medians over rounds "
        "(ms; CPU in us/request)"
    )
    print(f"{'publisher':<16} {'p50':>7} {'p90':>7} {'p99':>7} {'p99.9':>7} {'req/s':>7} {'cpu':>6} {'owed':>7}")
    for name, runs in results.items():
        keys = ("p50", "p90", "p99", "p99.9", "rps", "cpu_us", "owed")
        row = [statistics.median(run[key] for run in runs) for key in keys]
        print(f"{name:<16} " + " ".join(f"{v:7.3f}" for v in row[:4]) + f" {row[4]:7.0f} {row[5]:6.0f} {row[6]:7.0f}")


if __name__ == "__main__":
    main()
