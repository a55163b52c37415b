"""Gate's benchmark suite: every contender against one fake Anthropic upstream, then RESULTS.md.

Usage: ``.venv/bin/python benchmarks/run.py [--quick] [--only direct,gate] [--phases main,streams,scaling,soak]``.
Contenders run one worker each on CPU 0; wrk, the fake upstream and the probes share CPU 1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import resource
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import contenders as lineup
import gate_rig
import report
from broker import OwnBroker
from contenders import Contender, Setup, check_reaches_fake, check_refuses, fake_stats
from gate_rig import GateRig
from load import run_wrk, write_script, wrk_available
from procs import Proc, free_port, wait_idle, wait_port

BENCH_DIR = Path(__file__).resolve().parent
PHASES = ("main", "streams", "scaling", "soak")
SHOWN_ENV = {"CLAUDE_GATEWAY_ALLOW_LOOPBACK", "GATE_PROFILES", "LITELLM_LOCAL_MODEL_COST_MAP", "LITELLM_LOG", "NO_DOCS"}
# measurement -> (wrk script, connections). paced_c50 also runs the TTFB probe. The c=1 pair gives the latency
# each contender adds (its p50 minus direct's), for JSON and for unpaced streams.
KIND_SETTINGS = {
    "json_c1": ("json", 1),
    "stream_c1": ("stream", 1),
    "json_c50": ("json", 50),
    "stream_c50": ("stream", 50),
    "paced_c50": ("paced", 50),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--quick", action="store_true", help="smoke: 1 round, 2 s per measurement, main phase only, no installs"
    )
    p.add_argument("--only", help=f"comma-separated contenders (direct always runs); of {','.join(lineup.ALL)}")
    p.add_argument("--phases", help=f"comma-separated phases of {','.join(PHASES)} (default all; --quick: main)")
    p.add_argument("--duration", type=float, help="seconds per wrk measurement (default 7; --quick 2)")
    p.add_argument("--rounds", type=int, help="interleaved rounds (default 3; --quick 1)")
    p.add_argument("--skip-install", action="store_true", help="never create benchmarks/.venv-litellm")
    p.add_argument("--soak-minutes", type=float, default=2.0, help="soak length (default 2; the issue's is 10)")
    p.add_argument("--streams", type=int, default=2000, help="concurrent streams in the streams phase")
    p.add_argument("--hold-seconds", type=float, default=30.0, help="how long each of those streams lasts")
    p.add_argument(
        "--streams-targets",
        default="direct,gate",
        help="contenders for the streams phase, of direct,gate,minimal and, with --before, gate-before (direct: the "
        "client's and fake's own gaps)",
    )
    p.add_argument("--soak-target", default="gate", help="contender for the soak (gate or minimal)")
    p.add_argument("--scaling-rounds", type=int, default=1, help="rounds of the workers=1,2 comparison")
    p.add_argument("--probe-count", type=int, default=200, help="TTFB probes per stream measurement")
    p.add_argument("--output", type=Path, help="default RESULTS.md for a full run, else .work/RESULTS-partial.md")
    p.add_argument("--json", type=Path, help="default results/latest.json for a full run, else under .work/")
    p.add_argument("--work-dir", type=Path, default=BENCH_DIR / ".work")
    p.add_argument(
        "--before",
        metavar="SRC",
        help="add gate-before: Gate run on SRC, an earlier commit's src (git archive), for an interleaved A/B",
    )
    p.add_argument(
        "--broker",
        choices=("own", "shared"),
        default="own",
        help="where Gate publishes: own (a RabbitMQ node of the bench's, pinned to the rig's core; the default) or "
        "shared (the machine's broker on 5672, which floats over Gate's core too)",
    )
    p.add_argument(
        "--before-publisher",
        choices=("none", "rabbitmq", "peer"),
        default="none",
        help="gate-before's usage.publisher (none: compare the request path alone, as gate-nopub; rabbitmq: as gate; "
        "peer: as gate-peer, RabbitMQ's protocol to amqp_peer.py)",
    )
    p.add_argument(
        "--previous",
        type=Path,
        default=BENCH_DIR / "results" / "latest.json",
        help="results to compare this run's medians with (default: the last full run's results/latest.json)",
    )
    args = p.parse_args(argv)
    args.duration = args.duration or (2.0 if args.quick else 7.0)
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.phases = [x for x in (args.phases or ("main" if args.quick else ",".join(PHASES))).split(",") if x]
    unknown = set(args.phases) - set(PHASES)
    if unknown:
        p.error(f"unknown phases: {', '.join(sorted(unknown))}")
    names = [x for x in (args.only or ",".join(lineup.ALL)).split(",") if x]
    if args.before:
        names.append("gate-before")
    unknown = set(names) - set(lineup.ALL) - {"gate-before"}
    if unknown:
        p.error(f"unknown contenders: {', '.join(sorted(unknown))}")
    args.names = ["direct", *[n for n in names if n != "direct"]]
    # Only a run of every contender and phase replaces the committed results; a partial one goes under .work/.
    full = not args.quick and set(args.names) == set(lineup.ALL) and set(args.phases) == set(PHASES)
    tag = "" if full else ("-quick" if args.quick else "-partial")
    args.output = args.output or (BENCH_DIR / "RESULTS.md" if full else args.work_dir / f"RESULTS{tag}.md")
    args.json = args.json or (BENCH_DIR / "results" / "latest.json" if full else args.work_dir / f"latest{tag}.json")
    return args


def cpu_plan(cpus: list[int]) -> tuple[str | None, str | None, str]:
    """(contender CPUs, load-rig CPUs, description)."""
    if len(cpus) < 2:
        return None, None, "one CPU only: nothing pinned (contender and load rig share it)"
    return (
        str(cpus[0]),
        str(cpus[1]),
        f"each contender (all its processes) on CPU {cpus[0]}; wrk, the fake upstream, the TTFB probe and "
        f"this harness on CPU {cpus[1]}. On 2 cores this keeps the proxy's core to itself; the cost is that "
        "the fake and wrk share a core, so `direct` and nginx hit the load rig's ceiling (lower bounds)",
    )


class Sampler:
    """Samples the RSS of the running contenders every second, so each one's peak is known."""

    def __init__(self) -> None:
        self.procs: list[Proc] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while not self.stop.wait(1.0):
            for proc in list(self.procs):
                if proc.alive():
                    proc.rss_kb()

    def close(self) -> None:
        self.stop.set()
        self.thread.join()


class Bench:
    """One run of the suite: owns every process it starts and stops them all at the end."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.work: Path = args.work_dir.resolve()
        self.work.mkdir(parents=True, exist_ok=True)
        for old_log in (self.work / "logs").glob("*"):  # access logs of earlier runs can be large
            old_log.unlink()
        self.all_cpus = sorted(os.sched_getaffinity(0))  # before the harness pins itself to the rig's CPU
        self.proxy_cpus, self.rig_cpus, self.pinning = cpu_plan(self.all_cpus)
        self.rig = GateRig()
        self.env = dict(os.environ, BENCH_TOKEN=self.rig.token)
        self.scripts = {
            k: write_script(self.work / "lua" / f"{k}.lua", self.rig.token, k)
            for k in ("json", "stream", "paced", "mixed")
        }
        self.own_scripts: dict[str, dict[str, Path]] = {}  # per contender with a bearer of its own
        self.sampler = Sampler()
        self.started: list[Contender] = []
        self.fakes: list[Proc] = []
        self.commands: list[str] = []
        self.configs: dict[str, str] = {}
        self.notes: list[str] = []
        self.broker: OwnBroker | None = None

    # ------------------------------------------------------------------ processes

    def start_broker(self) -> None:
        """Gate's broker for this run: a node of the bench's own on the rig's core, else the shared one."""
        if self.args.broker == "own":
            broker = OwnBroker(self.work / "logs" / "rabbitmq.log", self.rig_cpus)
            try:
                gate_rig.BROKER_URL = broker.start()
            except RuntimeError as exc:
                self.notes.append(f"Gate published to the shared RabbitMQ on 5672: {exc}")
                print(f"  {exc}; using the shared broker", flush=True)
                return
            self.broker = broker
            self.notes.append(
                f"Gate published to a RabbitMQ node of the bench's own, pinned to CPU {self.rig_cpus} with wrk and "
                "the fake upstream (benchmarks/broker.py), not to the shared broker, which floats over Gate's core"
            )
        else:
            self.notes.append(f"Gate published to {gate_rig.BROKER_URL.split('@')[-1]} (--broker shared)")

    def start_fake(self, name: str, pace_ms: float = 0.0, json_delay_ms: float = 0.0) -> str:
        port = free_port()
        cmd = [
            sys.executable,
            str(BENCH_DIR / "fake_upstream.py"),
            "--port",
            str(port),
            "--pace-ms",
            f"{pace_ms:g}",
            "--json-delay-ms",
            f"{json_delay_ms:g}",
        ]
        proc = Proc(name, cmd, cpus=self.rig_cpus, log=self.work / "logs" / f"{name}.log")
        self.fakes.append(proc)
        self.sampler.procs.append(proc)  # its peak RSS is direct's; and settle() waits for it too
        wait_port("127.0.0.1", port, 15, proc.popen)
        self._command(f"{name}:", proc.cmd)
        return f"http://127.0.0.1:{port}"

    def setup(self, fake_url: str) -> Setup:
        return Setup(
            work=self.work,
            fake_url=fake_url,
            rig=self.rig,
            proxy_cpus=self.proxy_cpus,
            rig_cpus=self.rig_cpus,
            quick=self.args.quick,
            skip_install=self.args.skip_install,
            before_src=getattr(self.args, "before", None),
            before_publisher=getattr(self.args, "before_publisher", "none"),
        )

    def launch(self, c: Contender, fake_url: str, stream_check: bool = True) -> bool:
        """Start ``c`` and prove it relays to the fake; on failure its status says why."""
        if c.status != "pending":
            if c.ok:
                self.commands.append(f"{c.name}: (no process: wrk and the probe target the fake upstream)")
            print(f"  {c.name}: {c.status}", flush=True)
            return c.ok
        t0 = time.monotonic()
        try:
            c.start(self.work)
            self.started.append(c)
            check_reaches_fake(c, fake_url, self.token(c), c.ready_timeout, stream=stream_check)
            if c.refused_token is not None:
                check_refuses(c, c.refused_token)
        except RuntimeError as exc:
            tail = c.proc.log_tail(8) if c.proc is not None else ""
            c.status = f"failed: {exc}" + (f"; log tail: {tail[-600:]}" if tail else "")
            c.stop()
            print(f"  {c.name}: {c.status}", flush=True)
            return False
        c.status = "ok"
        assert c.proc is not None and c.command is not None
        self.sampler.procs.append(c.proc)
        self._command(f"{c.name}:", c.proc.cmd, c.env)
        if c.config is not None:
            self._config(c.config)
        print(f"  {c.name}: up in {time.monotonic() - t0:.1f}s at {c.url}", flush=True)
        return True

    def _command(self, label: str, cmd: list[str], env: dict[str, str] | None = None) -> None:
        """Remember a command for RESULTS.md, paths relative to the repository and ports made generic."""
        prefix = ""
        if env is not None:
            shown = {k: v for k, v in env.items() if k in SHOWN_ENV}
            prefix = " ".join(f"{k}={v}" for k, v in shown.items()) + " "
        line = f"{label} {prefix}{shlex.join(cmd)}".replace(str(self.work), "benchmarks/.work")
        line = line.replace(str(lineup.ROOT) + "/", "").replace(str(Path.home()) + "/", "~/")
        line = re.sub(r"127\.0\.0\.1:\d+", "127.0.0.1:PORT", line)
        line = re.sub(r"--port \d+", "--port PORT", line)
        if line not in self.commands:
            self.commands.append(line)

    def _config(self, path: Path) -> None:
        """Remember a generated config for RESULTS.md, ports made generic and key values masked."""
        text = re.sub(r"127\.0\.0\.1:\d+", "127.0.0.1:PORT", path.read_text())
        text = re.sub(r"\bport: \d+", "port: PORT", text)
        text = re.sub(r"sk-ant-[A-Za-z0-9_-]+", "sk-ant-...", text).replace(str(self.work), "benchmarks/.work")
        text = re.sub(r"\bjwt_secret: \S+", "jwt_secret: ...", text)
        text = re.sub(r"gate_bench_cgw_\d+", "gate_bench_cgw_PID", text)
        if text not in self.configs.values():
            self.configs[str(path).replace(str(self.work), "benchmarks/.work")] = text

    def close(self) -> None:
        for c in reversed(self.started):
            c.stop()
        for fake in self.fakes:
            fake.stop()
        self.sampler.close()
        self.rig.close()
        if self.broker is not None:
            self.broker.stop()

    # ------------------------------------------------------------------ measuring

    def token(self, c: Contender) -> str:
        return c.token or self.rig.token

    def script(self, c: Contender | None, kind: str) -> Path:
        """The wrk script of ``kind`` carrying ``c``'s bearer."""
        if c is None or c.token is None:
            return self.scripts[kind]
        own = self.own_scripts.setdefault(c.name, {})
        if kind not in own:
            own[kind] = write_script(self.work / "lua" / c.name / f"{kind}.lua", c.token, kind)
        return own[kind]

    def wrk(self, url: str, kind: str, connections: int, duration: float, c: Contender | None = None) -> dict[str, Any]:
        run = run_wrk(url, self.script(c, kind), connections, duration, self.rig_cpus)
        self._command("wrk:", run.command)
        return run.as_dict()

    def settle(self) -> None:
        waited = wait_idle(list(self.sampler.procs), timeout=60)
        if waited > 5:
            print(f"  (waited {waited:.0f}s for the contenders' core to go idle)", flush=True)

    def measure(self, c: Contender, kind: str) -> dict[str, Any]:
        script, connections = KIND_SETTINGS[kind]
        duration = self.args.duration
        self.settle()
        probe = None
        if kind == "paced_c50":
            probe = self.start_probe(c, window=max(0.5, duration - 1.5), delay=1.0)
        try:
            result: dict[str, Any] = {"wrk": self.wrk(c.url, script, connections, duration, c)}
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            result = {"error": str(exc)}
        if probe is not None:
            result["ttfb"] = self.probe_result(probe, timeout=duration + 60)
        owed = outbox_depth(c.url) if c.name.startswith("gate") else None
        if owed is not None:
            result["events_owed"] = owed
        if c.proc is not None:
            c.proc.trim_log()
        return result

    def start_probe(self, c: Contender, window: float, delay: float, pace_ms: int | None = None) -> Proc:
        """The TTFB probe against ``c``, started now: its requests begin after ``delay`` s, spread over ``window``."""
        cmd = [
            sys.executable,
            str(BENCH_DIR / "ttfb_probe.py"),
            "--url",
            c.url,
            "--count",
            str(self.args.probe_count),
            "--window",
            f"{window:g}",
            "--delay",
            f"{delay:g}",
        ]
        if pace_ms is not None:
            cmd += ["--pace-ms", str(pace_ms)]
        env = dict(self.env, BENCH_TOKEN=self.token(c))
        probe = Proc("ttfb-probe", cmd, cpus=self.rig_cpus, log=self.work / "logs" / "ttfb-probe.out", env=env)
        self._command("ttfb probe:", probe.cmd)
        return probe

    @staticmethod
    def probe_result(probe: Proc, timeout: float) -> dict[str, Any]:
        try:
            probe.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            probe.stop()
        lines = probe.log.read_text().strip().splitlines() if probe.log.exists() else []
        probe.log.unlink(missing_ok=True)
        try:
            result: dict[str, Any] = json.loads(lines[-1])
        except (IndexError, json.JSONDecodeError):
            return {"count": 0, "error": "the probe printed no result"}
        return result

    def warm(self, c: Contender) -> None:
        for kind in ("json", "stream"):
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                run_wrk(c.url, self.script(c, kind), 50, 1, self.rig_cpus)

    # ------------------------------------------------------------------ phases

    def main_phase(self, fake_url: str) -> dict[str, Any]:
        setup = self.setup(fake_url)
        print("starting contenders", flush=True)
        built = [lineup.build(name, setup) for name in self.args.names]
        running = [c for c in built if self.launch(c, fake_url)]
        for c in running:
            self.warm(c)
        runs: dict[str, dict[str, list[dict[str, Any]]]] = {c.name: {k: [] for k in c.kinds} for c in running}
        for rnd in range(self.args.rounds):
            order = running[rnd % len(running) :] + running[: rnd % len(running)]
            print(f"round {rnd + 1}/{self.args.rounds}: {' '.join(c.name for c in order)}", flush=True)
            for c in order:
                for kind in c.kinds:
                    result = self.measure(c, kind)
                    runs[c.name][kind].append(result)
                    print(f"  {c.name:10} {kind:10} {_brief(result)}", flush=True)
        stats = fake_stats(fake_url)
        out: dict[str, Any] = {}
        for c in built:
            data: dict[str, Any] = {"description": c.description, "status": c.status, "notes": c.notes}
            if c.ok:
                data["runs"] = runs[c.name]
                proc = c.proc if c.proc is not None else self.fakes[0]
                proc.rss_kb()
                data["peak_rss_mb"] = round(proc.peak_rss_kb / 1024, 1)
                data["hwm_mb"] = round(proc.hwm_kb() / 1024, 1)
                if c.name == "direct":
                    c.notes.append("peak RSS is the fake upstream's")
            out[c.name] = data
        if any(c.name.startswith("gate") and c.ok for c in built):
            keys = stats.get("keys", {})
            rotated = keys.get("...-a", 0) > 0 and keys.get("...-b", 0) > 0
            self.notes.append(
                f"Upstream keys seen by the fake in the main run, by last characters: {keys} (Gate's are -a and "
                "-b, LiteLLM's lm, claude-gateway's gw)" + ("" if rotated else ": Gate did NOT rotate its two keys")
            )
        self.stop_all()
        return {"contenders": out, "fake_stats": stats}

    def stop_all(self) -> None:
        for c in self.started:
            c.stop()
            if c.proc in self.sampler.procs:
                self.sampler.procs.remove(c.proc)
        self.started.clear()

    def target(self, name: str, setup: Setup, upstream: str) -> Contender:
        if name == "direct":
            c = lineup.direct(setup)
            c.name = f"direct-{self._phase}"
            return c
        if name == "gate":
            return lineup.gate(setup, f"gate-{self._phase}", upstream=upstream)
        if name == "minimal":
            return lineup.minimal(setup, f"minimal-{self._phase}", upstream=upstream)
        if name == "gate-before" and setup.before_src:  # an A/B of this phase: an earlier commit's Gate (--before)
            c = lineup.gate(setup, f"gate-before-{self._phase}", upstream=upstream)
            assert c.env is not None
            c.env["PYTHONPATH"] = setup.before_src
            return c
        raise ValueError(f"phase target must be direct, gate, minimal or (with --before) gate-before, not {name!r}")

    _phase = ""

    def streams_phase(self) -> dict[str, Any]:
        self._phase = "streams"
        hold = self.args.hold_seconds
        pace_ms = hold * 1000 / 24  # 25 events, 24 gaps
        fake_url = self.start_fake("fake-paced", pace_ms=pace_ms)
        setup = self.setup(fake_url)
        out: dict[str, Any] = {}
        for name in self.args.streams_targets.split(","):
            c = self.target(name, setup, fake_url)
            if not self.launch(c, fake_url, stream_check=False):
                out[c.name] = {"skipped" if c.status.startswith("skipped") else "error": c.status}
                continue
            proc = c.proc or self.fakes[-1]  # direct: the fake's own memory and fds
            time.sleep(1)
            rss_before, fds_before = proc.rss_kb(), proc.fds()
            print(f"  {c.name}: {self.args.streams} streams for {hold:.0f}s", flush=True)
            ramp = 3.0
            cmd = [
                sys.executable,
                str(BENCH_DIR / "stream_hold.py"),
                "--url",
                c.url,
                "--streams",
                str(self.args.streams),
                "--ramp",
                f"{ramp:g}",
                "--timeout",
                f"{hold * 3 + 30:g}",
            ]
            client = Proc(
                "stream-hold", cmd, cpus=self.rig_cpus, log=self.work / "logs" / "stream-hold.out", env=self.env
            )
            self._command("streams client:", client.cmd)
            # New requests while all the streams are open: unpaced probes from 2 s after the ramp until 3 s
            # before the first streams end.
            probe = self.start_probe(c, window=max(1.0, hold - ramp - 5), delay=ramp + 2, pace_ms=0)
            peak_rss, peak_fds = rss_before, fds_before
            while client.alive():
                time.sleep(1)
                peak_rss, peak_fds = max(peak_rss, proc.rss_kb()), max(peak_fds, proc.fds())
            lines = client.log.read_text().strip().splitlines()
            client.log.unlink(missing_ok=True)
            probed = self.probe_result(probe, timeout=30)
            try:
                result = json.loads(lines[-1])
            except (IndexError, json.JSONDecodeError):
                out[c.name] = {"error": "the streams client printed no result: " + " ".join(lines[-3:])}
                self.stop_all()
                continue
            out[c.name] = {
                "client": result,
                "probe": probed,
                "pace_ms": pace_ms,
                "hold_s": hold,
                "rss_before_mb": round(rss_before / 1024, 1),
                "peak_rss_mb": round(peak_rss / 1024, 1),
                "fds_before": fds_before,
                "peak_fds": peak_fds,
            }
            print(f"  {c.name}: {_brief_streams(out[c.name])}", flush=True)
            self.stop_all()
        return out

    def scaling_phase(self, fake_url: str) -> dict[str, Any]:
        setup = self.setup(fake_url)
        cpus_all = ",".join(str(c) for c in self.all_cpus)
        built = [lineup.gate(setup, "gate-w1", workers=1), lineup.gate(setup, "gate-w2", workers=2, cpus=cpus_all)]
        if built[0].status != "pending":
            return {"skipped": built[0].status}
        pinning = {
            "gate-w1": f"1 worker on CPU {self.proxy_cpus}",
            "gate-w2": f"2 workers on CPUs {cpus_all}, sharing CPU {self.rig_cpus} with wrk and the fake",
        }
        running = [c for c in built if self.launch(c, fake_url)]
        for c in running:
            self.warm(c)
        runs: dict[str, dict[str, Any]] = {}
        for c in built:
            if not c.ok:
                runs[c.name] = {"error": c.status}
        raw: dict[str, dict[str, list[float]]] = {c.name: {"json": [], "stream": []} for c in running}
        for _ in range(self.args.scaling_rounds):
            for c in running:
                for kind in ("json", "stream"):
                    try:
                        self.settle()
                        raw[c.name][kind].append(self.wrk(c.url, kind, 50, self.args.duration)["rps"])
                    except (RuntimeError, subprocess.TimeoutExpired) as exc:
                        runs[c.name] = {"error": str(exc)}
        for c in running:
            if c.name in runs:
                continue
            assert c.proc is not None
            runs[c.name] = {
                "pinning": pinning[c.name],
                "json_rps": report._median(raw[c.name]["json"]),
                "stream_rps": report._median(raw[c.name]["stream"]),
                "peak_rss_mb": round(c.proc.peak_rss_kb / 1024, 1),
            }
            print(f"  {c.name}: {runs[c.name]}", flush=True)
        self.stop_all()
        return {
            "runs": runs,
            "note": "2 cores only: with 2 workers Gate shares a core with wrk and the fake "
            "upstream, so this shows that workers start and share the port, not how "
            "Gate scales on a bigger machine",
        }

    def soak_phase(self) -> dict[str, Any]:
        self._phase = "soak"
        pace_ms, json_delay_ms, connections = 4.0, 20.0, 32
        fake_url = self.start_fake("fake-soak", pace_ms=pace_ms, json_delay_ms=json_delay_ms)
        c = self.target(self.args.soak_target, self.setup(fake_url), fake_url)
        if not self.launch(c, fake_url):
            return {"skipped" if c.status.startswith("skipped") else "error": c.status}
        assert c.proc is not None
        seconds = max(10.0, self.args.soak_minutes * 60)
        print(f"  {c.name}: soak for {seconds:.0f}s", flush=True)
        cmd = [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{round(seconds)}s",
            "--timeout=10s",
            "-s",
            str(self.scripts["mixed"]),
            c.url + "/v1/messages",
        ]
        wrk = Proc("soak-wrk", cmd, cpus=self.rig_cpus, log=self.work / "logs" / "soak-wrk.out")
        self._command("soak:", wrk.cmd)
        t0 = time.monotonic()
        samples: list[tuple[float, float]] = [(0.0, round(c.proc.rss_kb() / 1024, 2))]
        next_sample = 10.0
        while wrk.alive():
            time.sleep(0.2)
            elapsed = time.monotonic() - t0
            if elapsed >= next_sample:
                samples.append((round(elapsed, 1), round(c.proc.rss_kb() / 1024, 2)))
                next_sample += 10.0
                c.proc.trim_log()
        samples.append((round(time.monotonic() - t0, 1), round(c.proc.rss_kb() / 1024, 2)))
        text = wrk.log.read_text()
        wrk.log.unlink(missing_ok=True)
        self.stop_all()
        line = next((x for x in text.splitlines() if x.startswith("WRK_JSON ")), None)
        if line is None:
            return {"error": "the soak's wrk printed no summary: " + text[-300:]}
        data = json.loads(line[len("WRK_JSON ") :])
        secs = data["duration_us"] / 1e6
        errors = data["errors"]
        # RSS settles for about a minute after start (allocator arenas, pools and caches filling): not a trend.
        fit_from = max(seconds * 0.25, min(60.0, seconds / 2))
        fit = [(t, r) for t, r in samples if t >= fit_from] or samples
        result = {
            "target": c.name,
            "minutes": round(seconds / 60, 2),
            "connections": connections,
            "pace_ms": pace_ms,
            "json_delay_ms": json_delay_ms,
            "rss_mb": samples,
            "fit_from_s": fit_from,
            "slope_mb_per_min": round(_slope(fit) * 60, 3),
            "wrk": {
                "rps": data["requests"] / secs,
                "requests": data["requests"],
                "non_2xx": errors["status"],
                "errors": errors["connect"] + errors["read"] + errors["write"] + errors["timeout"],
            },
        }
        print(
            f"  {c.name}: slope {result['slope_mb_per_min']:+.2f} MB/min, {result['wrk']['rps']:.0f} req/s", flush=True
        )
        return result


def _slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope (per second) of (seconds, MB) samples."""
    if len(points) < 2:
        return 0.0
    n = len(points)
    mx = sum(t for t, _ in points) / n
    my = sum(r for _, r in points) / n
    var = sum((t - mx) ** 2 for t, _ in points)
    return sum((t - mx) * (r - my) for t, r in points) / var if var else 0.0


def outbox_depth(url: str) -> int | None:
    """Usage events Gate still owes the broker (health's ``outboxDepth``) when a measurement ends: how far
    delivery fell behind the requests just measured. 0 with `usage.publisher: none`; None without an answer."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"{url}/actuator/health", timeout=5) as answer:
            health = json.load(answer)
    except urllib.error.HTTPError as exc:  # DOWN is a 503 with the same body
        health = json.load(exc)
    except (OSError, ValueError):
        return None
    depth = health.get("components", {}).get("pubsub", {}).get("details", {}).get("outboxDepth")
    return depth if isinstance(depth, int) else None


def _brief(result: dict[str, Any]) -> str:
    if "error" in result:
        return f"error: {result['error']}"
    w = result["wrk"]
    text = f"{w['rps']:9,.0f} req/s  p50 {w['p50']:7.3f}  p99 {w['p99']:7.3f}  p99.9 {w['p999']:7.3f} ms"
    if w["errors"] or w["non_2xx"]:
        text += f"  errors {w['errors']} non-2xx {w['non_2xx']}"
    t = result.get("ttfb", {})
    if t.get("ttfb_ms"):
        ms = t["ttfb_ms"]
        text += f"  TTFB p50 {ms['p50']:.3f} p99 {ms['p99']:.3f} p99.9 {ms['p99.9']:.3f} (n={t['count']})"
    if "events_owed" in result:
        text += f"  events owed at the end {result['events_owed']:,}"
    return text


def _brief_streams(s: dict[str, Any]) -> str:
    c, p = s["client"], s.get("probe", {}).get("ttfb_ms", {})
    return (
        f"{c['completed']}/{c['streams']} complete, max gap {c['max_gap_ms']:.0f} ms, "
        f"TTFB p99 {c['ttfb_ms'].get('p99', 0):.1f} ms as they open, {p.get('p99', 0):.1f} ms for new requests "
        f"while open (n={s.get('probe', {}).get('count', 0)}), peak RSS {s['peak_rss_mb']:.0f} MB, "
        f"peak fds {s['peak_fds']}"
    )


@contextlib.contextmanager
def _pinned_to(cpus: str | None) -> Iterator[None]:
    if cpus is not None:
        os.sched_setaffinity(0, {int(x) for x in cpus.split(",")})
    yield


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not wrk_available():
        print("wrk is not installed: apt-get install -y wrk", file=sys.stderr)
        return 2
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))
    previous = load_previous(args.previous)  # before a full run overwrites it
    t0 = time.monotonic()
    load_start = report.loadavg()
    bench = Bench(args)
    phases: dict[str, Any] = {}
    main_result: dict[str, Any] = {"contenders": {}, "fake_stats": {}}
    estimate = _estimate(args)
    print(f"phases {','.join(args.phases)}; about {estimate / 60:.1f} min", flush=True)
    try:
        with _pinned_to(bench.rig_cpus):
            bench.start_broker()
            fake_url = bench.start_fake("fake")
            if "main" in args.phases:
                main_result = bench.main_phase(fake_url)
            if "streams" in args.phases:
                print("phase: streams", flush=True)
                phases["streams"] = bench.streams_phase()
            if "scaling" in args.phases:
                print("phase: scaling", flush=True)
                phases["scaling"] = bench.scaling_phase(fake_url)
            if "soak" in args.phases:
                print("phase: soak", flush=True)
                phases["soak"] = bench.soak_phase()
    finally:
        bench.close()
    summary = report.summarize(main_result["contenders"])
    results = {
        "finished": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "elapsed_s": round(time.monotonic() - t0, 1),
        "command": shlex.join(["python", "benchmarks/run.py", *(argv if argv is not None else sys.argv[1:])]),
        "config": {
            "rounds": args.rounds,
            "duration": args.duration,
            "phases": args.phases,
            "probe_count": args.probe_count,
            "contenders": args.names,
        },
        "machine": report.machine_info(lineup.litellm_version()),
        "load_start": load_start,
        "load_end": report.loadavg(),
        "pinning": bench.pinning,
        "commands": bench.commands,
        "configs": bench.configs,
        "contenders": main_result["contenders"],
        "fake_stats": main_result["fake_stats"],
        "summary": summary,
        "phases": phases,
        "notes": bench.notes,
    }
    results["previous"] = (
        {k: previous.get(k) for k in ("_path", "finished", "command")} if previous is not None else None
    )
    results["targets"] = report.targets(summary, phases, previous)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(report.render(results))
    print(f"wrote {args.output} and {args.json} in {results['elapsed_s']:.0f}s", flush=True)
    for t in results["targets"]:
        detail = f"; {t['detail']}" if t.get("detail") else ""
        print(f"  {t['verdict']:4}  {t['target']}: {t['value']} ({t['op']} {t['limit']}){detail}")
    return 0


def load_previous(path: Path) -> dict[str, Any] | None:
    """The results file of an earlier run, with ``_path`` (relative to the repository when inside it), or None."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(data, dict) or "summary" not in data:
        return None
    resolved = path.resolve()
    data["_path"] = str(resolved.relative_to(lineup.ROOT)) if resolved.is_relative_to(lineup.ROOT) else str(path)
    return data


def _estimate(args: argparse.Namespace) -> float:
    total = 0.0
    if "main" in args.phases:
        total += 30 + len(args.names) * (5 + args.rounds * len(KIND_SETTINGS) * (args.duration + 1.5))
    if "streams" in args.phases:
        total += len(args.streams_targets.split(",")) * (args.hold_seconds + 20)
    if "scaling" in args.phases:
        total += 20 + 2 * args.scaling_rounds * 2 * (args.duration + 1)
    if "soak" in args.phases:
        total += args.soak_minutes * 60 + 15
    return total


if __name__ == "__main__":
    raise SystemExit(main())
