"""The stream relay's own figures: run.py's main phase with a ``stream_c1`` measurement added, then ratios to the
minimal proxy.

``run.py`` measures streams only at c=50 and gives ``gate-nopub`` throughput alone; the stream relay's cost per
chunk shows best in a lone stream's added latency. This wraps ``run.py`` without changing it: every contender
runs json_c1, stream_c1, stream_c50 and paced_c50 (with the TTFB probe), and the medians are printed as ratios to
``minimal`` (added latency: minus ``direct``)::

    .venv/bin/python benchmarks/stream_c1.py --only gate-nopub,minimal --rounds 3

Every other option is run.py's; results go to ``benchmarks/.work/stream-c1.json`` unless ``--json`` says otherwise.
``--before SRC`` adds a contender ``gate-before``: ``gate-nopub`` with ``PYTHONPATH=SRC`` (say the ``src`` of an
earlier commit, from ``git archive``), so that an A/B runs interleaved, in the same rounds, on the same machine.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import contenders as lineup
import run

KINDS = ("json_c1", "stream_c1", "stream_c50", "paced_c50")
FIGURES = (
    ("json_c1", "p50"),
    ("stream_c1", "p50"),
    ("stream_c1", "p99"),
    ("stream_c50", "rps"),
    ("stream_c50", "p50"),
    ("stream_c50", "p99"),
    ("paced_c50", "p99"),
)


def main(argv: list[str]) -> int:
    run.KIND_SETTINGS["stream_c1"] = ("stream", 1)
    build = lineup.build

    before = None
    if "--before" in argv:
        at = argv.index("--before")
        before = argv[at + 1]
        argv = argv[:at] + argv[at + 2 :]
        lineup.ALL = (*lineup.ALL, "gate-before")

    def build_all_kinds(name: str, setup: Any) -> Any:
        if name == "gate-before":
            c = lineup.gate(setup, "gate-before", publisher="none")
            if c.env is not None:
                c.env["PYTHONPATH"] = str(before)
        else:
            c = build(name, setup)
        c.kinds = KINDS
        return c

    lineup.build = build_all_kinds
    work = Path(__file__).resolve().parent / ".work"
    if "--json" not in argv:
        argv = [*argv, "--json", str(work / "stream-c1.json")]
    if "--output" not in argv:
        argv = [*argv, "--output", str(work / "STREAM-C1.md")]
    if "--phases" not in argv:
        argv = [*argv, "--phases", "main"]
    code = run.main(argv)
    path = Path(argv[argv.index("--json") + 1])
    print_ratios(json.loads(path.read_text()))
    return code


def medians(data: dict[str, Any]) -> dict[str, dict[tuple[str, str], float]]:
    out: dict[str, dict[tuple[str, str], float]] = {}
    for name, contender in data["contenders"].items():
        runs = contender.get("runs", {})
        row: dict[tuple[str, str], float] = {}
        for kind, key in FIGURES:
            values = [r["wrk"][key] for r in runs.get(kind, []) if "wrk" in r]
            if values:
                row[(kind, key)] = statistics.median(values)
        ttfb = [r["ttfb"]["ttfb_ms"] for r in runs.get("paced_c50", []) if r.get("ttfb", {}).get("ttfb_ms")]
        if ttfb:
            row[("ttfb", "p50")] = statistics.median(t["p50"] for t in ttfb)
            row[("ttfb", "p99")] = statistics.median(t["p99"] for t in ttfb)
        out[name] = row
    return out


def print_ratios(data: dict[str, Any]) -> None:
    rows = medians(data)
    direct = rows.get("direct", {})
    minimal = rows.get("minimal", {})
    keys = [*FIGURES, ("ttfb", "p50"), ("ttfb", "p99")]
    print(f"{'figure':18}" + "".join(f"{name:>14}" for name in rows) + f"{'x minimal':>12}")
    for name in rows:
        if name in ("direct", "minimal"):
            continue
        for kind, key in keys:
            figure = f"{kind} {key}"
            cells = "".join(f"{rows[n].get((kind, key), float('nan')):14.3f}" for n in rows)
            mine, base = rows[name].get((kind, key)), minimal.get((kind, key))
            ratio = f"{mine / base:12.2f}" if mine is not None and base else f"{'':12}"
            print(f"{figure:18}{cells}{ratio}")
        for kind in ("json_c1", "stream_c1"):
            floor = direct.get((kind, "p50"))
            mine, base = rows[name].get((kind, "p50")), minimal.get((kind, "p50"))
            if floor is None or mine is None or base is None:
                continue
            added, added_base = mine - floor, base - floor
            ratio = f"{added / added_base:.2f}x" if added_base > 0 else "n/a"
            print(f"{kind} added p50: {name} {added:.3f} ms, minimal {added_base:.3f} ms ({ratio})")


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
