"""What spend caps and rate limits cost on the proxied path, with each store: Gate with limits off, then on with
SQLite, PostgreSQL and Redis, JSON requests through wrk against the fast fake upstream; rounds interleaved.

Every limited call makes two store operations (the reservation before the call, the reconciliation after it,
the second off the response path), touching 8 counters (user and organisation for the day, week and month,
requests and tokens per minute for the user). Run: ``.venv/bin/python benchmarks/limits_cost.py --duration 5``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import uuid
from pathlib import Path
from typing import Any

import yaml

from gate_rig import GateRig
from load import run_wrk, write_script, wrk_available
from procs import Proc, free_port, wait_port

ROOT = Path(__file__).resolve().parents[1]
GATE = ROOT / ".venv" / "bin" / "gate"
PG_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
REDIS_URL = "redis://127.0.0.1:6379/0"
MODES = ("off", "sqlite", "postgresql", "redis")


def limits_section(mode: str, work: Path, unique: str) -> dict[str, Any]:
    if mode == "off":
        return {"enabled": False}
    store: dict[str, Any] = {"type": mode}
    if mode == "sqlite":
        store["sqlite"] = {"path": str(work / f"limits-{unique}.sqlite3")}
    elif mode == "postgresql":
        store["postgresql"] = {"url": PG_URL, "schema": unique}
    else:
        store["redis"] = {"url": REDIS_URL, "key-prefix": f"{unique}:"}
    return {
        "enabled": True,
        "store": store,
        # Caps and rates far above what a run spends: every call is checked and counted, none refused.
        "spend-caps": [
            {"scope-type": "organization", "period": "monthly", "amount-usd": "1000000"},
            {"scope-type": "user", "scope-id": "*", "period": "daily", "amount-usd": "100000"},
        ],
        "rate": {"user": {"requests-per-minute": 100_000_000, "tokens-per-minute": 1_000_000_000_000}},
    }


def start_gate(rig: GateRig, mode: str, work: Path, fake_url: str, unique: str) -> tuple[Proc, str]:
    port = free_port()
    home = work / mode
    config_path = rig.write_config(
        home / "gate.yaml", port=port, upstream=fake_url, publisher="none", outbox=home / "outbox.sqlite3"
    )
    config = yaml.safe_load(config_path.read_text())
    config["limits"] = limits_section(mode, work, unique)
    config["observability"] = {"logging": {"access-log": False}}
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    proc = Proc(
        f"gate-{mode}",
        [str(GATE), "serve", "--config", str(config_path)],
        cpus=None,
        log=home / "gate.log",
        env={"PATH": "/usr/bin:/bin", "HOME": str(home), "GATE_PROFILES": "bench"},
        cwd=home,
    )
    wait_port("127.0.0.1", port, 60, proc.popen)
    return proc, f"http://127.0.0.1:{port}"


async def cleanup(unique: str) -> None:
    import asyncpg
    import redis.asyncio as aioredis

    conn = await asyncpg.connect(PG_URL)
    await conn.execute(f'DROP SCHEMA IF EXISTS "{unique}" CASCADE')
    await conn.close()
    client = aioredis.Redis.from_url(REDIS_URL)
    keys = [k async for k in client.scan_iter(match=f"{unique}:*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are reported")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections for the throughput run")
    parser.add_argument("--work-dir", default=str(ROOT / "benchmarks" / ".work" / "limits"))
    args = parser.parse_args(argv)
    if not wrk_available():
        sys.stderr.write("wrk is not installed (apt-get install wrk)\n")
        return 2
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    unique = f"gate_bench_{uuid.uuid4().hex[:10]}"
    rig = GateRig()
    fake_port = free_port()
    fake = Proc(
        "fake",
        [sys.executable, str(ROOT / "benchmarks" / "fake_upstream.py"), "--port", str(fake_port)],
        cpus=None,
        log=work / "fake.log",
    )
    results: dict[str, dict[str, list[float]]] = {m: {"rps": [], "p50_c1": [], "p99": []} for m in MODES}
    try:
        wait_port("127.0.0.1", fake_port, 30, fake.popen)
        script = write_script(work / "json.lua", rig.token, "json")
        for round_no in range(args.rounds):
            for mode in MODES:
                gate, url = start_gate(rig, mode, work, f"http://127.0.0.1:{fake_port}", unique)
                try:
                    run_wrk(url, script, 4, 1.0, None)  # warm up: pools, prepared statements, caches
                    c1 = run_wrk(url, script, 1, args.duration, None)
                    load = run_wrk(url, script, args.connections, args.duration, None)
                    if load.non_2xx or load.errors or c1.non_2xx or c1.errors:
                        raise RuntimeError(f"{mode}: {load.non_2xx + c1.non_2xx} non-2xx, {load.errors} errors")
                finally:
                    gate.stop()
                results[mode]["rps"].append(load.rps)
                results[mode]["p50_c1"].append(c1.p50)
                results[mode]["p99"].append(load.p99)
                print(
                    f"round {round_no + 1} {mode:<10} {load.rps:8.0f} req/s at c={args.connections} "
                    f"(p99 {load.p99:.2f} ms), p50 {c1.p50:.3f} ms at c=1",
                    flush=True,
                )
    finally:
        fake.stop()
        rig.close()
        asyncio.run(cleanup(unique))
    base_rps = statistics.median(results["off"]["rps"])
    base_p50 = statistics.median(results["off"]["p50_c1"])
    print(f"\nmedians of {args.rounds} rounds, {args.duration:g} s each, JSON requests:")
    c = args.connections
    print(f"| limits | req/s c={c} | ratio to off | p50 c=1 (ms) | added p50 (ms) | p99 c={c} (ms) |")
    print("|---|---|---|---|---|---|")
    for mode in MODES:
        rps = statistics.median(results[mode]["rps"])
        p50 = statistics.median(results[mode]["p50_c1"])
        p99 = statistics.median(results[mode]["p99"])
        print(f"| {mode} | {rps:.0f} | {rps / base_rps:.2f} | {p50:.3f} | {p50 - base_p50:+.3f} | {p99:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
