"""Load generation with wrk: the request bodies, the Lua scripts that send them, and wrk's JSON summary."""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from procs import pinned

MODEL = "claude-sonnet-4-5-20250929"
ANTHROPIC_VERSION = "2023-06-01"

_PROMPT = (
    "You are helping with a code review. Read the following function and explain, in two sentences, what it "
    "does and whether it has an obvious bug. def total(items): result = 0; for item in items: result += "
    "item.price * item.quantity; return result. Consider empty lists, negative quantities, floating point "
    "prices and very large inputs. Answer briefly, without code, and name the single most important risk. "
    "Context for the reviewer: the function is called from a checkout service that handles about ten "
    "thousand orders an hour, prices are stored as floats in the database, and quantities come straight "
    "from a web form that is validated only on the client side. The team wants to know whether this is "
    "safe to ship today or should wait for a fix. Please also say which unit test would have caught the "
    "problem first, and whether a decimal type would be a better fit for the price column in this case."
)


def request_body(stream: bool, pace_ms: int | None = None) -> bytes:
    """A Messages API request of about 1 KB; ``pace_ms`` asks the fake upstream to pace the stream's events (0: not
    at all, whatever its ``--pace-ms``)."""
    prompt = _PROMPT + (f" (bench-pace-ms={pace_ms})" if pace_ms is not None else "")
    body: dict[str, Any] = {
        "model": MODEL,
        "max_tokens": 1024,
        "messages": [{"role": "user", "content": prompt}],
    }
    if stream:
        body["stream"] = True
    return json.dumps(body, separators=(",", ":")).encode()


def request_headers(token: str) -> dict[str, str]:
    return {
        "Content-Type": "application/json",
        "Authorization": f"Bearer {token}",
        "anthropic-version": ANTHROPIC_VERSION,
    }


_DONE = r"""
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"latency_us":{"min":%d,"mean":%.1f,"stdev":%.1f,"max":%d,"p50":%d,"p75":%d,"p90":%d,"p99":%d,"p999":%d}}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.min, latency.mean, latency.stdev, latency.max,
    latency:percentile(50), latency:percentile(75), latency:percentile(90),
    latency:percentile(99), latency:percentile(99.9)))
end
"""


def _lua_headers(token: str) -> str:
    return "".join(f'wrk.headers["{k}"] = "{v}"\n' for k, v in request_headers(token).items())


PACED_MS = 10  # per event in the ``paced`` load: a 25-event stream lasts about 240 ms, like a short answer


def write_script(path: Path, token: str, kind: str) -> Path:
    """kind: ``json``, ``stream``, ``paced`` (streams paced by the fake at PACED_MS per event) or ``mixed``
    (alternating JSON and stream requests, for the soak)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lua = 'wrk.method = "POST"\n' + _lua_headers(token)
    if kind == "mixed":
        lua += (
            f"local bodies = {{ [==[{request_body(False).decode()}]==], [==[{request_body(True).decode()}]==] }}\n"
            "local n = 0\n"
            "request = function()\n"
            "  n = n + 1\n"
            '  return wrk.format("POST", "/v1/messages", nil, bodies[(n % 2) + 1])\n'
            "end\n"
        )
    else:
        body = request_body(kind != "json", PACED_MS if kind == "paced" else None)
        lua += f"wrk.body = [==[{body.decode()}]==]\n"
    path.write_text(lua + _DONE)
    return path


@dataclass(frozen=True)
class WrkRun:
    """One wrk measurement; latencies in milliseconds."""

    command: list[str]
    requests: int
    seconds: float
    rps: float
    errors: int
    non_2xx: int
    p50: float
    p90: float
    p99: float
    p999: float
    mean: float
    max: float

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "command"}


def wrk_available() -> bool:
    return shutil.which("wrk") is not None


def run_wrk(
    url: str, script: Path, connections: int, duration: float, cpus: str | None, timeout_s: float = 10.0
) -> WrkRun:
    cmd = pinned(
        [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{max(1, round(duration))}s",
            f"--timeout={timeout_s:g}s",
            "-s",
            str(script),
            url.rstrip("/") + "/v1/messages",
        ],
        cpus,
    )
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + timeout_s + 30, check=False)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("WRK_JSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no summary (exit {proc.returncode}): {proc.stderr.strip()[-300:]}")
    data = json.loads(line[len("WRK_JSON ") :])
    errors = data["errors"]
    seconds = data["duration_us"] / 1e6
    lat = data["latency_us"]
    return WrkRun(
        command=cmd,
        requests=data["requests"],
        seconds=seconds,
        rps=data["requests"] / seconds if seconds else 0.0,
        errors=errors["connect"] + errors["read"] + errors["write"] + errors["timeout"],
        non_2xx=errors["status"],
        p50=lat["p50"] / 1000,
        p90=lat["p90"] / 1000,
        p99=lat["p99"] / 1000,
        p999=lat["p999"] / 1000,
        mean=lat["mean"] / 1000,
        max=lat["max"] / 1000,
    )
