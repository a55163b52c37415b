"""Turning raw measurements into medians, target verdicts and benchmarks/RESULTS.md."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from load import PACED_MS

KINDS = ("json_c1", "json_c50", "stream_c50", "paced_c50")


# ---------------------------------------------------------------------------------------------- machine


def _run(cmd: list[str]) -> str:
    if shutil.which(cmd[0]) is None and not os.path.exists(cmd[0]):
        return "not installed"
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
    return (done.stdout + done.stderr).strip()


def machine_info(litellm_version: str) -> dict[str, Any]:
    lscpu = _run(["lscpu"])
    model = re.search(r"^Model name:\s*(.+)$", lscpu, re.MULTILINE)
    packages = {}
    names = ("httptools", "uvloop", "aiohttp", "orjson", "pydantic", "PyJWT", "aiormq", "opentelemetry-sdk", "gate")
    for name in names:
        try:
            packages[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            packages[name] = "not installed"
    packages["litellm"] = litellm_version
    nginx = _run([shutil.which("nginx") or "/usr/sbin/nginx", "-v"])
    wrk = _run(["wrk", "--version"]).splitlines()
    return {
        "cpu_model": model.group(1).strip() if model else platform.processor(),
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "packages": packages,
        "nginx": nginx.removeprefix("nginx version: "),
        "wrk": wrk[0].split(" Copyright")[0] if wrk else "unknown",
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3, 1),
    }


def loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


# ---------------------------------------------------------------------------------------------- summary


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None


def summarize(contenders: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per contender: medians over rounds of every figure the report shows."""
    out: dict[str, dict[str, Any]] = {}
    for name, data in contenders.items():
        runs = data.get("runs", {})
        row: dict[str, Any] = {"status": data.get("status")}

        def med(kind: str, key: str, runs: dict[str, Any] = runs) -> float | None:
            return _median([r["wrk"][key] for r in runs.get(kind, []) if "wrk" in r])

        row["json_rps"] = med("json_c50", "rps")
        row["json_p50_ms"] = med("json_c50", "p50")
        row["json_p99_ms"] = med("json_c50", "p99")
        row["c1_p50_ms"] = med("json_c1", "p50")
        row["stream_rps"] = med("stream_c50", "rps")
        row["stream_p50_ms"] = med("stream_c50", "p50")
        row["stream_p99_ms"] = med("stream_c50", "p99")
        row["paced_p99_ms"] = med("paced_c50", "p99")
        ttfb = [r["ttfb"]["ttfb_ms"] for r in runs.get("paced_c50", []) if r.get("ttfb", {}).get("ttfb_ms")]
        row["ttfb_p50_ms"] = _median([t["p50"] for t in ttfb])
        row["ttfb_p99_ms"] = _median([t["p99"] for t in ttfb])
        row["ttfb_samples"] = sum(r["ttfb"]["count"] for r in runs.get("paced_c50", []) if r.get("ttfb"))
        row["errors"] = sum(r["wrk"]["errors"] + r["wrk"]["non_2xx"] for rs in runs.values() for r in rs if "wrk" in r)
        row["failures"] = sum(1 for rs in runs.values() for r in rs if "error" in r)
        row["peak_rss_mb"] = data.get("peak_rss_mb")
        out[name] = row
    direct = out.get("direct", {}).get("c1_p50_ms")
    for row in out.values():
        row["added_p50_c1_ms"] = (
            round(row["c1_p50_ms"] - direct, 3) if direct is not None and row["c1_p50_ms"] is not None else None
        )
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def _diff(a: float | None, b: float | None) -> float | None:
    return round(a - b, 3) if a is not None and b is not None else None


def targets(summary: dict[str, dict[str, Any]], phases: dict[str, Any]) -> list[dict[str, Any]]:
    """Every target from the issue, computed from this run; verdict ``pass``, ``FAIL`` or ``n/a``."""
    gate, aio, lite, direct = (summary.get(n, {}) for n in ("gate", "minimal", "litellm", "direct"))
    rows: list[tuple[str, float | None, str, float]] = [
        (
            "Gate added p50 at c=1 / minimal aiohttp added p50",
            _ratio(gate.get("added_p50_c1_ms"), aio.get("added_p50_c1_ms")),
            "<=",
            1.5,
        ),
        ("Gate added p50 at c=1 (ms)", gate.get("added_p50_c1_ms"), "<", 0.45),
        ("Gate JSON req/s / minimal aiohttp", _ratio(gate.get("json_rps"), aio.get("json_rps")), ">=", 0.8),
        ("Gate stream req/s / minimal aiohttp", _ratio(gate.get("stream_rps"), aio.get("stream_rps")), ">=", 0.8),
        ("Gate JSON req/s / LiteLLM", _ratio(gate.get("json_rps"), lite.get("json_rps")), ">=", 50),
        ("Gate stream req/s / LiteLLM", _ratio(gate.get("stream_rps"), lite.get("stream_rps")), ">=", 50),
        (
            "Gate TTFB p99 - direct TTFB p99 under load (ms)",
            _diff(gate.get("ttfb_p99_ms"), direct.get("ttfb_p99_ms")),
            "<",
            1.0,
        ),
        ("Gate peak RSS, main run (MB)", gate.get("peak_rss_mb"), "<=", 120),
    ]
    streams = phases.get("streams", {}).get("gate-streams", {})
    rows.append(("Gate peak RSS with 2,000 open streams (MB)", streams.get("peak_rss_mb"), "<=", 300))
    soak = phases.get("soak", {})
    slope = soak.get("slope_mb_per_min") if soak.get("target") == "gate-soak" else None
    rows.append(("Gate soak RSS slope, |MB/min| (flat)", abs(slope) if slope is not None else None, "<=", 0.5))
    out = []
    for name, value, op, limit in rows:
        if value is None:
            verdict = "n/a"
        else:
            ok = {"<=": value <= limit, "<": value < limit, ">=": value >= limit}[op]
            verdict = "pass" if ok else "FAIL"
        out.append({"target": name, "value": value, "op": op, "limit": limit, "verdict": verdict})
    return out


# ---------------------------------------------------------------------------------------------- markdown


def _f(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.{digits}f}"
    return str(value)


def render(results: dict[str, Any]) -> str:
    m = results["machine"]
    cfg = results["config"]
    lines = [
        "# Gate benchmark results",
        "",
        f"Written by `benchmarks/run.py` on {results['finished']} (took {results['elapsed_s']:.0f} s). "
        "Medians over interleaved rounds (round robin over contenders, each round in a rotated order).",
        "",
        "## Machine",
        "",
        f"- CPU: {m['cpu_model']}, {m['cpus']} cores; {m['memory_gb']} GB RAM; kernel {m['kernel']}",
        f"- Python {m['python']}; " + ", ".join(f"{k} {v}" for k, v in m["packages"].items()),
        f"- {m['nginx']}; {m['wrk']}",
        f"- load average at start {results['load_start']}, at end {results['load_end']} "
        "(anything much above 0 means other work shared the cores: treat figures as noisy)",
        "",
        "## How it was run",
        "",
        f"- Command: `{results['command']}`",
        f"- Rounds {cfg['rounds']}, {cfg['duration']} s per wrk measurement, phases {', '.join(cfg['phases'])}.",
        f"- Pinning: {results['pinning']}",
        "- Fake upstream (`benchmarks/fake_upstream.py`, uvloop + raw asyncio.Protocol): ~570-byte JSON, or a "
        "chunked SSE stream of 25 events (3.2 KB), unpaced (one write) unless the request asks for pacing.",
        "- Load: wrk, 1 thread, ~1 KB JSON body, `Authorization: Bearer <RS256 JWT>`, "
        "`anthropic-version: 2023-06-01`; c=1 for added latency, c=50 for throughput and tail latency.",
        "- Measurements: `json_c1` (JSON at c=1: added latency = its p50 minus direct's), `json_c50` and "
        "`stream_c50` (throughput and tail latency at c=50; unpaced streams), `paced_c50` (c=50 streams that the "
        f"fake paces at {PACED_MS} ms per event, so a stream lasts ~240 ms as a short real answer does).",
        "- TTFB under load: during `paced_c50`, `benchmarks/ttfb_probe.py` sends up to "
        f"{cfg['probe_count']} sequential (unpaced) stream requests spread over the run and times the arrival "
        "of the first body bytes (`event: message_start`). Paced load keeps the fake and the proxy busy without "
        "saturating them, so TTFB shows what the proxy adds rather than the length of a saturated queue. "
        "The probe is Python, so its own cost (~0.2-0.3 ms) is in every figure; compare by difference.",
        "",
        "Commands (URL and port differ per contender):",
        "",
        "```",
        *results["commands"],
        "```",
        "",
    ]
    for path, text in results.get("configs", {}).items():
        lines += [f"`{path}` (generated; ports and key values made generic here):", "", "```", text.rstrip(), "```", ""]
    lines += [
        "## Results (c=50 unless noted; latency in ms)",
        "",
        "| contender | JSON req/s | JSON p50 | JSON p99 | stream req/s | stream p50 | stream p99 "
        "| added p50 c=1 | TTFB p50 | TTFB p99 | paced stream p99 | peak RSS MB | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in results["summary"].items():
        if row["status"] != "ok":
            continue
        errors = row["errors"] + row["failures"]
        lines.append(
            f"| {name} | {_f(row['json_rps'])} | {_f(row['json_p50_ms'])} | {_f(row['json_p99_ms'])} "
            f"| {_f(row['stream_rps'])} | {_f(row['stream_p50_ms'])} | {_f(row['stream_p99_ms'])} "
            f"| {_f(row['added_p50_c1_ms'], 3)} | {_f(row['ttfb_p50_ms'], 3)} | {_f(row['ttfb_p99_ms'], 3)} "
            f"| {_f(row['paced_p99_ms'])} | {_f(row['peak_rss_mb'], 0)} | {errors or ''} |"
        )
    lines += ["", "Contenders:", ""]
    for name, data in results["contenders"].items():
        lines.append(
            f"- **{name}** ({data['status']}): {data['description']}"
            + ("; " + "; ".join(data["notes"]) if data.get("notes") else "")
        )
    lines += ["", "## Targets (from this run)", "", "| target | value | limit | verdict |", "|---|---:|---|---|"]
    for t in results["targets"]:
        lines.append(f"| {t['target']} | {_f(t['value'], 3)} | {t['op']} {t['limit']} | {t['verdict']} |")
    lines += _phase_sections(results["phases"])
    lines += [
        "",
        "## Every measurement",
        "",
        "req/s and p50/p99 ms per round, in the order run (raw data: `benchmarks/results/latest.json`).",
        "",
    ]
    for name, data in results["contenders"].items():
        for kind in KINDS:
            runs = data.get("runs", {}).get(kind, [])
            if not runs:
                continue
            cells = []
            for r in runs:
                if "wrk" in r:
                    w = r["wrk"]
                    cell = f"{w['rps']:,.0f} / {w['p50']:.2f} / {w['p99']:.2f}"
                    if r.get("ttfb", {}).get("ttfb_ms"):
                        t = r["ttfb"]
                        cell += f" (TTFB {t['ttfb_ms']['p50']:.2f} / {t['ttfb_ms']['p99']:.2f}, n={t['count']})"
                    cells.append(cell)
                else:
                    cells.append(f"error: {r.get('error', '?')}")
            lines.append(f"- {name} {kind}: " + "; ".join(cells))
    if results.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in results["notes"]]
    analysis = Path(__file__).with_name("ANALYSIS.md")
    if analysis.exists():  # the hand-kept reading of the figures: what stands in the way of a failing target
        lines += ["", analysis.read_text(encoding="utf-8").rstrip()]
    return "\n".join(lines) + "\n"


def _phase_sections(phases: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    streams = phases.get("streams")
    if streams:
        lines += ["", "## Many open streams", ""]
        for name, s in streams.items():
            if "skipped" in s or "error" in s:
                lines.append(f"- {name}: {s.get('skipped') or s.get('error')}")
                continue
            c = s["client"]
            lines.append(
                f"- {name}: {c['streams']} streams paced {s['pace_ms']:.0f} ms/event held {s['hold_s']:.0f} s; "
                f"completed {c['completed']}, failed {c['failed']} {c['failure_samples'] or ''}; max gap between "
                f"events {c['max_gap_ms']:.0f} ms (pace {s['pace_ms']:.0f} ms; gap p99 {c['gap_ms'].get('p99', 0):.0f}"
                f" ms); TTFB p50/p99 {c['ttfb_ms'].get('p50', 0):.1f}/{c['ttfb_ms'].get('p99', 0):.1f} ms; "
                f"RSS {s['rss_before_mb']:.0f} MB before, peak {s['peak_rss_mb']:.0f} MB; open fds peak "
                f"{s['peak_fds']} (before {s['fds_before']})"
            )
    scaling = phases.get("scaling")
    if scaling:
        lines += ["", "## Gate workers (scaling)", ""]
        if "skipped" in scaling:
            lines.append(f"- {scaling['skipped']}")
        for name, s in scaling.get("runs", {}).items():
            if "error" in s:
                lines.append(f"- {name}: {s['error']}")
                continue
            lines.append(
                f"- {name} ({s['pinning']}): JSON {_f(s.get('json_rps'))} req/s, "
                f"stream {_f(s.get('stream_rps'))} req/s, peak RSS {_f(s.get('peak_rss_mb'), 0)} MB"
            )
        if scaling.get("note"):
            lines.append(f"- {scaling['note']}")
    soak = phases.get("soak")
    if soak:
        lines += ["", "## Soak", ""]
        if "skipped" in soak or "error" in soak:
            lines.append(f"- {soak.get('skipped') or soak.get('error')}")
        else:
            w = soak["wrk"]
            lines.append(
                f"- {soak['target']}: {soak['minutes']} min of mixed JSON/stream load at c={soak['connections']} "
                f"(upstream paced: streams {soak['pace_ms']} ms/event, JSON after {soak['json_delay_ms']} ms): "
                f"{w['rps']:,.0f} req/s, {w['errors'] + w['non_2xx']} errors; RSS first {soak['rss_mb'][0][1]:.1f} MB, "
                f"last {soak['rss_mb'][-1][1]:.1f} MB, max {max(r for _, r in soak['rss_mb']):.1f} MB; slope "
                f"{soak['slope_mb_per_min']:+.2f} MB/min (fitted after the first {soak['fit_from_s']:.0f} s)"
            )
    return lines
