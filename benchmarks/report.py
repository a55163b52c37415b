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

KINDS = ("json_c1", "stream_c1", "json_c50", "stream_c50", "paced_c50")


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


# (wrk field, summary suffix) of each figure kept per measurement.
STATS = (("rps", "rps"), ("p50", "p50_ms"), ("p99", "p99_ms"), ("p999", "p999_ms"))
# The summary's first names for some of those medians, kept so that earlier results files compare with new ones.
LEGACY = {
    "json_rps": "json_c50_rps",
    "json_p50_ms": "json_c50_p50_ms",
    "json_p99_ms": "json_c50_p99_ms",
    "c1_p50_ms": "json_c1_p50_ms",
    "stream_rps": "stream_c50_rps",
    "stream_p50_ms": "stream_c50_p50_ms",
    "stream_p99_ms": "stream_c50_p99_ms",
    "paced_p99_ms": "paced_c50_p99_ms",
}


def summarize(contenders: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per contender: medians over rounds of every figure the report shows.

    ``<kind>_<stat>`` for each measurement (``json_c1_p99_ms``, ``stream_c50_p999_ms``...), the TTFB probe's
    ``ttfb_p50_ms`` / ``ttfb_p99_ms`` / ``ttfb_p999_ms``, and the latency added at c=1 over direct's
    (``added_p50_c1_ms`` for JSON, ``added_p50_c1_stream_ms`` for streams). Each percentile is the median over
    rounds of that round's percentile.
    """
    out: dict[str, dict[str, Any]] = {}
    for name, data in contenders.items():
        runs = data.get("runs", {})
        row: dict[str, Any] = {"status": data.get("status")}
        for kind in KINDS:
            for field, suffix in STATS:
                values = [r["wrk"][field] for r in runs.get(kind, []) if field in r.get("wrk", {})]
                row[f"{kind}_{suffix}"] = _median(values)
        for old, new in LEGACY.items():
            row[old] = row[new]
        ttfb = [r["ttfb"]["ttfb_ms"] for r in runs.get("paced_c50", []) if r.get("ttfb", {}).get("ttfb_ms")]
        row["ttfb_p50_ms"] = _median([t["p50"] for t in ttfb])
        row["ttfb_p99_ms"] = _median([t["p99"] for t in ttfb])
        row["ttfb_p999_ms"] = _median([t["p99.9"] for t in ttfb if "p99.9" in t])
        row["ttfb_samples"] = sum(r["ttfb"]["count"] for r in runs.get("paced_c50", []) if r.get("ttfb"))
        row["errors"] = sum(r["wrk"]["errors"] + r["wrk"]["non_2xx"] for rs in runs.values() for r in rs if "wrk" in r)
        row["failures"] = sum(1 for rs in runs.values() for r in rs if "error" in r)
        row["peak_rss_mb"] = data.get("peak_rss_mb")
        out[name] = row
    direct = out.get("direct", {})
    for row in out.values():
        row["added_p50_c1_ms"] = _diff(row["json_c1_p50_ms"], direct.get("json_c1_p50_ms"))
        row["added_p50_c1_stream_ms"] = _diff(row["stream_c1_p50_ms"], direct.get("stream_c1_p50_ms"))
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def _diff(a: float | None, b: float | None) -> float | None:
    return round(a - b, 3) if a is not None and b is not None else None


def _verdict(value: float | None, op: str, limit: float) -> str:
    if value is None:
        return "n/a"
    ok = {"<=": value <= limit, "<": value < limit, ">=": value >= limit}[op]
    return "pass" if ok else "FAIL"


def _target(group: str, name: str, value: float | None, op: str, limit: float, detail: str = "") -> dict[str, Any]:
    return {
        "group": group,
        "target": name,
        "value": value,
        "op": op,
        "limit": limit,
        "verdict": _verdict(value, op, limit),
        "detail": detail,
    }


TAIL = "issue 16: tail latency"
# The tail targets again for ``gate-peer`` (Gate publishing to amqp_peer.py): shown beside the targets, not one.
BESIDE = "issue 16, the broker's CPU aside"
EARLIER = "throughput and memory"
NOISE = 0.10  # a median ratio this much worse than the previous run's counts as worse; less is run-to-run noise


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f} ms"


def _against_minimal(
    what: str, gate: float | None, minimal: float | None, limit: float, group: str = TAIL, who: str = "Gate"
) -> dict[str, Any]:
    """Gate's figure within ``limit`` times the minimal proxy's (``who``: the contender it is, as named)."""
    name = f"{who}'s {what} within {limit:g}x the minimal proxy's"
    if gate is None or minimal is None:
        missing = " and ".join(n for n, v in ((who, gate), ("the minimal proxy", minimal)) if v is None)
        return _target(group, name, None, "<=", limit, f"not measured for {missing} in this run")
    if minimal <= 0:
        return _target(group, name, None, "<=", limit, f"{who} {_ms(gate)}, the minimal proxy {_ms(minimal)}: no ratio")
    value = round(gate / minimal, 3)
    return _target(
        group, name, value, "<=", limit, f"{who} {_ms(gate)}, the minimal proxy {_ms(minimal)}: {value:.2f}x"
    )


def _within_direct(
    what: str,
    gate: float | None,
    direct: float | None,
    limit: float,
    extra: str = "",
    group: str = TAIL,
    who: str = "Gate",
) -> dict[str, Any]:
    """Gate's figure less than ``limit`` ms over direct's."""
    name = f"{who}'s {what} within {limit:g} ms of direct's"
    if gate is None or direct is None:
        missing = " and ".join(n for n, v in ((who, gate), ("direct", direct)) if v is None)
        return _target(group, name, None, "<", limit, f"not measured for {missing} in this run{extra}")
    value = round(gate - direct, 3)
    return _target(group, name, value, "<", limit, f"{who} {_ms(gate)}, direct {_ms(direct)}: {value:+.3f} ms{extra}")


# Medians compared with the previous run, each as Gate / minimal proxy (ratios in one run, so that two runs on a
# machine whose load differs still compare): (label, summary key, higher is better).
MEDIANS = (
    ("JSON req/s c=50", "json_rps", True),
    ("stream req/s c=50", "stream_rps", True),
    ("JSON p50 c=50", "json_p50_ms", False),
    ("stream p50 c=50", "stream_p50_ms", False),
    ("JSON p50 c=1", "c1_p50_ms", False),
    ("stream p50 c=1", "stream_c1_p50_ms", False),
    ("TTFB p50 paced", "ttfb_p50_ms", False),
)


def _medians_vs_previous(summary: dict[str, dict[str, Any]], previous: dict[str, Any] | None) -> dict[str, Any]:
    name = "Gate's medians no worse than the previous run's (each as a ratio to the minimal proxy's, worse beyond "
    name += f"{NOISE:.0%}; value: how many are worse)"
    if previous is None:
        return _target(TAIL, name, None, "<=", 0, "no previous results to compare with")
    before = previous.get("summary", {})
    source = f"previous run: {previous.get('finished', '?')}, `{previous.get('command', '?')}` ({previous['_path']})"
    lines, worse = [], []
    for label, key, higher_better in MEDIANS:
        now = _ratio(summary.get("gate", {}).get(key), summary.get("minimal", {}).get(key))
        then = _ratio(before.get("gate", {}).get(key), before.get("minimal", {}).get(key))
        if now is None or then is None:
            continue
        bad = now < then * (1 - NOISE) if higher_better else now > then * (1 + NOISE)
        lines.append(f"{label} {now:.2f}x (then {then:.2f}x){' WORSE' if bad else ''}")
        if bad:
            worse.append(label)
    if not lines:
        return _target(
            TAIL, name, None, "<=", 0, f"no median measured for Gate and the minimal proxy in both runs; {source}"
        )
    detail = f"{source}: " + "; ".join(lines)
    return _target(TAIL, name, len(worse), "<=", 0, detail)


def targets(
    summary: dict[str, dict[str, Any]], phases: dict[str, Any], previous: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    """Every target, computed from this run (and, for the medians, the previous run's results file).

    Verdict ``pass``, ``FAIL`` or ``n/a`` (not measured in this run); ``detail`` gives the figures behind it.
    """
    gate, aio, lite, direct = (summary.get(n, {}) for n in ("gate", "minimal", "litellm", "direct"))
    peer = summary.get("gate-peer", {})
    rows = [
        _against_minimal(
            "added p50 at c=1, streams", gate.get("added_p50_c1_stream_ms"), aio.get("added_p50_c1_stream_ms"), 1.5
        ),
        _against_minimal("added p50 at c=1, JSON", gate.get("added_p50_c1_ms"), aio.get("added_p50_c1_ms"), 1.5),
        _against_minimal("p99 at c=1, JSON", gate.get("json_c1_p99_ms"), aio.get("json_c1_p99_ms"), 1.5),
        _against_minimal("p99 at c=1, streams", gate.get("stream_c1_p99_ms"), aio.get("stream_c1_p99_ms"), 1.5),
        _against_minimal("p99 at c=50, JSON", gate.get("json_c50_p99_ms"), aio.get("json_c50_p99_ms"), 1.5),
        _against_minimal("p99 at c=50, streams", gate.get("stream_c50_p99_ms"), aio.get("stream_c50_p99_ms"), 1.5),
        _within_direct(
            "TTFB p99 under paced load",
            gate.get("ttfb_p99_ms"),
            direct.get("ttfb_p99_ms"),
            1.0,
            f" ({gate.get('ttfb_samples', 0)} and {direct.get('ttfb_samples', 0)} probes)" if gate and direct else "",
        ),
    ]
    if peer:
        rows += [
            _against_minimal(f"p99 at c=1, {kind}", peer.get(key), aio.get(key), 1.5, BESIDE, "gate-peer")
            for kind, key in (("JSON", "json_c1_p99_ms"), ("streams", "stream_c1_p99_ms"))
        ]
        rows.append(
            _within_direct(
                "TTFB p99 under paced load",
                peer.get("ttfb_p99_ms"),
                direct.get("ttfb_p99_ms"),
                1.0,
                "",
                BESIDE,
                "gate-peer",
            )
        )
    streams = phases.get("streams")
    if streams is None:
        rows.append(
            _target(
                TAIL,
                "Gate's TTFB p99 with 2,000 open streams (as they open, and for new requests) within 5 ms of direct's",
                None,
                "<",
                5.0,
                "the streams phase did not run",
            )
        )
    else:

        def ttfb_p99(name: str, source: str) -> float | None:
            value = streams.get(name, {}).get(source, {}).get("ttfb_ms", {}).get("p99")
            return float(value) if value is not None else None

        count = streams.get("gate-streams", {}).get("client", {}).get("streams") or 2000
        samples = streams.get("gate-streams", {}).get("probe", {}).get("count", 0)
        rows += [
            _within_direct(
                f"TTFB p99 as {count:,} streams are opened",
                ttfb_p99("gate-streams", "client"),
                ttfb_p99("direct-streams", "client"),
                5.0,
                f"; each stream's first event, {count:,} streams opened over 3 s",
            ),
            _within_direct(
                f"TTFB p99 of new requests while {count:,} streams are open",
                ttfb_p99("gate-streams", "probe"),
                ttfb_p99("direct-streams", "probe"),
                5.0,
                f"; {samples} sequential unpaced probes",
            ),
        ]
    rows.append(_medians_vs_previous(summary, previous))
    rows += [
        _target(EARLIER, "Gate added p50 at c=1 (ms)", gate.get("added_p50_c1_ms"), "<", 0.45),
        _target(
            EARLIER, "Gate JSON req/s / minimal aiohttp", _ratio(gate.get("json_rps"), aio.get("json_rps")), ">=", 0.8
        ),
        _target(
            EARLIER,
            "Gate stream req/s / minimal aiohttp",
            _ratio(gate.get("stream_rps"), aio.get("stream_rps")),
            ">=",
            0.8,
        ),
        _target(EARLIER, "Gate JSON req/s / LiteLLM", _ratio(gate.get("json_rps"), lite.get("json_rps")), ">=", 50),
        _target(
            EARLIER, "Gate stream req/s / LiteLLM", _ratio(gate.get("stream_rps"), lite.get("stream_rps")), ">=", 50
        ),
        _target(EARLIER, "Gate peak RSS, main run (MB)", gate.get("peak_rss_mb"), "<=", 120),
    ]
    held = (streams or {}).get("gate-streams", {})
    rows.append(_target(EARLIER, "Gate peak RSS with 2,000 open streams (MB)", held.get("peak_rss_mb"), "<=", 300))
    soak = phases.get("soak", {})
    slope = soak.get("slope_mb_per_min") if soak.get("target") == "gate-soak" else None
    rows.append(
        _target(EARLIER, "Gate soak RSS slope, |MB/min| (flat)", abs(slope) if slope is not None else None, "<=", 0.5)
    )
    return rows


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
        "- Load: wrk, 1 thread, ~1 KB JSON body, `Authorization: Bearer <RS256 JWT>` (for claude-gateway its own "
        "HS256 session token), `anthropic-version: 2023-06-01`; c=1 for added latency, c=50 for throughput and "
        "tail latency.",
        "- Measurements: `json_c1` and `stream_c1` (JSON and unpaced streams at c=1: added latency = the "
        "contender's p50 minus direct's), `json_c50` and `stream_c50` (throughput and tail latency at c=50; "
        f"unpaced streams), `paced_c50` (c=50 streams that the fake paces at {PACED_MS} ms per event, so a stream "
        "lasts ~240 ms as a short real answer does). wrk's latency is the whole response, the last byte of a "
        "stream included; p99 and p99.9 come from wrk's own histogram (its Lua `done()` hook). A p99.9 rests on "
        "the slowest 0.1% of the requests: a few dozen at c=1 in a round, a handful in `paced_c50`.",
        "- TTFB under load: during `paced_c50`, `benchmarks/ttfb_probe.py` sends up to "
        f"{cfg['probe_count']} sequential (unpaced) stream requests spread over the run and times the arrival "
        "of the first body bytes (`event: message_start`). Paced load keeps the fake and the proxy busy without "
        "saturating them, so TTFB shows what the proxy adds rather than the length of a saturated queue. "
        "The probe is Python, so its own cost (~0.2-0.3 ms) is in every figure; compare by difference. With "
        "200 probes a round, TTFB p99 is the second-slowest probe and p99.9 the slowest.",
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
        "| added p50 c=1 JSON | added p50 c=1 stream | TTFB p50 | TTFB p99 | paced stream p99 | peak RSS MB | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in results["summary"].items():
        if row["status"] != "ok":
            continue
        errors = row["errors"] + row["failures"]
        lines.append(
            f"| {name} | {_f(row['json_rps'])} | {_f(row['json_p50_ms'])} | {_f(row['json_p99_ms'])} "
            f"| {_f(row['stream_rps'])} | {_f(row['stream_p50_ms'])} | {_f(row['stream_p99_ms'])} "
            f"| {_f(row['added_p50_c1_ms'], 3)} | {_f(row.get('added_p50_c1_stream_ms'), 3)} "
            f"| {_f(row['ttfb_p50_ms'], 3)} | {_f(row['ttfb_p99_ms'], 3)} "
            f"| {_f(row['paced_p99_ms'])} | {_f(row['peak_rss_mb'], 0)} | {errors or ''} |"
        )
    lines += _tail_table(results["summary"])
    lines += ["", "Contenders:", ""]
    for name, data in results["contenders"].items():
        lines.append(
            f"- **{name}** ({data['status']}): {data['description']}"
            + ("; " + "; ".join(data["notes"]) if data.get("notes") else "")
        )
    lines += _target_sections(results["targets"])
    lines += _against_claude_gateway(results["summary"], results["contenders"])
    lines += _phase_sections(results["phases"])
    lines += [
        "",
        "## Every measurement",
        "",
        "req/s and p50 / p99 / p99.9 ms per round, in the order run (raw data: `benchmarks/results/latest.json`).",
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
                    cell = f"{w['rps']:,.0f} / {w['p50']:.2f} / {w['p99']:.2f} / {_f(w.get('p999'))}"
                    if r.get("ttfb", {}).get("ttfb_ms"):
                        t, ms = r["ttfb"], r["ttfb"]["ttfb_ms"]
                        cell += f" (TTFB {ms['p50']:.2f} / {ms['p99']:.2f} / {_f(ms.get('p99.9'))}, n={t['count']})"
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


TAIL_COLUMNS = (
    ("JSON c=1", "json_c1"),
    ("stream c=1", "stream_c1"),
    ("JSON c=50", "json_c50"),
    ("stream c=50", "stream_c50"),
    ("paced c=50", "paced_c50"),
    ("TTFB, paced load", "ttfb"),
)


def _tail_table(summary: dict[str, dict[str, Any]]) -> list[str]:
    """p50 / p99 / p99.9 of every measurement, one row per contender."""
    lines = [
        "",
        "Latency distribution, p50 / p99 / p99.9 in ms (medians over rounds of each round's percentile):",
        "",
        "| contender | " + " | ".join(label for label, _ in TAIL_COLUMNS) + " |",
        "|---|" + "---:|" * len(TAIL_COLUMNS),
    ]
    for name, row in summary.items():
        if row["status"] != "ok":
            continue
        cells = []
        for _, key in TAIL_COLUMNS:
            values = [row.get(f"{key}_{p}_ms") for p in ("p50", "p99", "p999")]
            cells.append("-" if all(v is None for v in values) else " / ".join(_f(v) for v in values))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def _target_sections(rows: list[dict[str, Any]]) -> list[str]:
    tail = [t for t in rows if t.get("group") == TAIL]
    beside = [t for t in rows if t.get("group") == BESIDE]
    other = [t for t in rows if t.get("group") not in (TAIL, BESIDE)]
    words = {"pass": "holds", "FAIL": "FAILS", "n/a": "n/a"}
    lines = ["", "## Targets (from this run)", ""]
    if tail:
        lines += ["Issue 16 (tail latency), each limit as stated there, from this run's own figures:", ""]
        for t in tail:
            lines.append(
                f"- **{words[t['verdict']]}**: {t['target']}" + (f": {t['detail']}" if t.get("detail") else "")
            )
        if beside:
            lines += [
                "",
                "Beside them, not targets: the same limits for `gate-peer`, Gate publishing to `amqp_peer.py` instead "
                "of the RabbitMQ node (its whole publishing path, without the broker's CPU on the rig's core):",
                "",
            ]
            for t in beside:
                lines.append(
                    f"- {words[t['verdict']]}: {t['target']}" + (f": {t['detail']}" if t.get("detail") else "")
                )
        lines += ["", "Earlier targets:", ""]
    lines += ["| target | value | limit | verdict |", "|---|---:|---|---|"]
    for t in other:
        lines.append(f"| {t['target']} | {_f(t['value'], 3)} | {t['op']} {t['limit']} | {t['verdict']} |")
    return lines


# (label, summary key, higher is better) of the figures compared between Gate and Anthropic's gateway.
VERSUS = (
    ("added p50 at c=1, JSON", "added_p50_c1_ms", False),
    ("added p50 at c=1, streams", "added_p50_c1_stream_ms", False),
    ("p99 at c=1, JSON", "json_c1_p99_ms", False),
    ("p99 at c=1, streams", "stream_c1_p99_ms", False),
    ("p99.9 at c=1, JSON", "json_c1_p999_ms", False),
    ("JSON req/s at c=50", "json_rps", True),
    ("stream req/s at c=50", "stream_rps", True),
    ("p99 at c=50, JSON", "json_c50_p99_ms", False),
    ("p99 at c=50, streams", "stream_c50_p99_ms", False),
    ("p99.9 at c=50, JSON", "json_c50_p999_ms", False),
    ("TTFB p99 under paced load", "ttfb_p99_ms", False),
    ("peak RSS (MB)", "peak_rss_mb", False),
)


def _against_claude_gateway(summary: dict[str, dict[str, Any]], contenders: dict[str, Any]) -> list[str]:
    """Gate's figures beside Anthropic's gateway's, as ratios in this run."""
    if "claude-gateway" not in contenders:
        return []
    lines = ["", "## Gate against Anthropic's gateway", ""]
    theirs, ours = summary.get("claude-gateway", {}), summary.get("gate", {})
    if theirs.get("status") != "ok" or ours.get("status") != "ok":
        why = [f"{n}: {contenders[n]['status']}" for n in ("claude-gateway", "gate") if n in contenders]
        return [*lines, "Not compared in this run (" + "; ".join(why) + ")."]
    lines += [
        "Same fake upstream, same pinning, same load; Gate / claude-gateway (below 1 is Gate's lead for a latency "
        "or memory figure, above 1 for a throughput figure):",
        "",
        "| figure | Gate | claude-gateway | Gate / claude-gateway |",
        "|---|---:|---:|---:|",
    ]
    for label, key, _ in VERSUS:
        a, b = ours.get(key), theirs.get(key)
        digits = 0 if "req/s" in label or "MB" in label else 3
        lines.append(f"| {label} | {_f(a, digits)} | {_f(b, digits)} | {_f(_ratio(a, b), 2)} |")
    return lines


def _open_probe(s: dict[str, Any]) -> str:
    """The TTFB of new requests sent while the streams were open, if the phase probed it."""
    probe = s.get("probe")
    if not probe:
        return ""
    ms = probe.get("ttfb_ms", {})
    if not ms:
        return f", new requests while open: no result ({probe.get('error') or probe.get('error_samples')})"
    return (
        f", new requests while open p50/p99/p99.9 {ms['p50']:.1f}/{ms['p99']:.1f}/{ms.get('p99.9', ms['max']):.1f} ms "
        f"(n={probe['count']}, errors {probe.get('errors', 0)})"
    )


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
                f" ms); TTFB p50/p99 {c['ttfb_ms'].get('p50', 0):.1f}/{c['ttfb_ms'].get('p99', 0):.1f} ms as they "
                f"open{_open_probe(s)}; "
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
