"""The open-file limit and descriptor table ``gate serve`` sets up at start (``gate.ops.fdtable``).

Each check runs in a process of its own, started with the limits under test, so the test process keeps its own.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anthropic
import pytest

from gate.ops import fdtable
from gate.settings import GateSettings
from tests.fake_anthropic import FakeAnthropic
from tests.harness import free_port, serve_config

GATE = Path(sys.executable).parent / "gate"
WAIT = 30.0  # a safety net for blocking calls, never an assertion
HARD = resource.getrlimit(resource.RLIMIT_NOFILE)[1]

# Run prepare() in a process with a second thread (as Gate has), and report what it did and what /proc says.
PROBE = """
import json, logging, os, threading, time
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
threading.Thread(target=time.sleep, args=(5,), daemon=True).start()
taken = [int(x) for x in os.environ.get("TAKE", "").split(",") if x]
for fd in taken:
    os.dup2(1, fd)
def open_fds():  # descriptor -> what it refers to (the directory's own descriptor is gone when read)
    found = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            found[fd] = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            pass
    return found
before = open_fds()
from gate.ops import fdtable
prepared = fdtable.prepare()
after = open_fds()
size = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("FDSize:"))
import resource
print(json.dumps({"soft_before": prepared.soft_before, "soft": prepared.soft, "hard": prepared.hard,
                  "presized": prepared.presized, "fdsize": size, "same_fds": before == after,
                  "limit_now": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
                  "taken_open": all(os.path.exists(f"/proc/self/fd/{fd}") for fd in taken)}))
"""


def limited(soft: int, hard: int) -> Callable[[], None]:
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    return apply


def probe(soft: int, hard: int, take: tuple[int, ...] = ()) -> tuple[dict[str, Any], str]:
    env = {**os.environ, "TAKE": ",".join(map(str, take))}
    done = subprocess.run(
        [sys.executable, "-c", PROBE],
        preexec_fn=limited(soft, hard),
        env=env,
        capture_output=True,
        text=True,
        timeout=WAIT,
        check=True,
    )
    return json.loads(done.stdout.splitlines()[-1]), done.stderr


def test_the_soft_limit_rises_to_the_hard_one_and_the_table_is_sized_for_it() -> None:
    if HARD < 2_048:
        pytest.skip(f"this machine's hard limit ({HARD}) leaves nothing to raise to")
    result, log = probe(1_024, HARD)
    assert result["soft_before"] == 1_024
    assert result["soft"] == result["limit_now"] == min(HARD, _nr_open())
    assert result["presized"] == min(result["soft"], fdtable.PRESIZE_CAP)
    # The kernel rounds the table up to a power of two; it must hold every descriptor up to the size asked for.
    assert result["fdsize"] >= result["presized"]
    assert result["same_fds"]  # the copy made to grow the table is closed again, nothing else touched
    assert f"soft limit raised from 1024 to {result['soft']}" in log


def test_a_low_hard_limit_is_kept_and_said_at_start() -> None:
    result, log = probe(512, 512)
    assert result["soft"] == result["hard"] == 512
    assert result["presized"] == 512 and result["fdsize"] >= 512
    assert "raised" not in log
    assert "the limit is 512, so this process can hold about 256 streams" in log


def test_an_open_descriptor_at_the_top_is_never_replaced() -> None:
    """F_DUPFD takes the first free number at or above the size: with the last one taken there is none, so the
    table is left as it is and the descriptor stays open (dup2 would have closed it)."""
    result, _ = probe(256, 256, take=(255,))
    assert result["taken_open"]
    assert result["presized"] == 0
    assert result["same_fds"]  # descriptor 255 still refers to what it did (dup2 would have made it /dev/null)


@pytest.fixture
def serve(tmp_path: Path, fake: FakeAnthropic) -> Iterator[Callable[..., tuple[subprocess.Popen[bytes], int, str]]]:
    started: list[subprocess.Popen[bytes]] = []

    def start(soft: int, hard: int, workers: int = 1) -> tuple[subprocess.Popen[bytes], int, str]:
        port = free_port()
        config_path, token, env = serve_config(tmp_path, fake.url, server={"port": port, "workers": workers})
        with (tmp_path / "gate.log").open("wb") as log:
            process = subprocess.Popen(
                [str(GATE), "serve", "--config", str(config_path)],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=limited(soft, hard),
            )
        started.append(process)
        client = anthropic.Anthropic(base_url=f"http://127.0.0.1:{port}", api_key=token, max_retries=0)
        deadline = time.monotonic() + WAIT
        while True:
            try:
                client.messages.create(
                    model="claude-opus-4-6", max_tokens=8, messages=[{"role": "user", "content": "Hi"}]
                )
                break
            except anthropic.APIConnectionError:
                assert process.poll() is None, (tmp_path / "gate.log").read_text()
                assert time.monotonic() < deadline, "Gate never answered"
                time.sleep(0.05)
        # Every worker is up once Gate logs its "ready" line (one worker may serve before another has started).
        while " ready: " not in (tmp_path / "gate.log").read_text():
            assert process.poll() is None and time.monotonic() < deadline, (tmp_path / "gate.log").read_text()
            time.sleep(0.05)
        return process, port, (tmp_path / "gate.log").read_text()

    yield start
    for process in started:
        process.kill()
        process.wait(WAIT)


def serving_pids(process: subprocess.Popen[bytes], workers: int) -> list[int]:
    if workers == 1:
        return [process.pid]
    children = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
    # Spawned workers, not multiprocessing's resource tracker (which accepts nothing).
    return [int(pid) for pid in children if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]


def soft_limit(pid: int) -> int:
    line = next(line for line in Path(f"/proc/{pid}/limits").read_text().splitlines() if "open files" in line)
    return int(line.split()[3])


def table_size(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    return next(int(line.split()[1]) for line in status if line.startswith("FDSize:"))


@pytest.mark.parametrize("workers", [1, 2])
def test_gate_serve_raises_its_limit_and_presizes_every_serving_process(
    serve: Callable[..., tuple[subprocess.Popen[bytes], int, str]], workers: int
) -> None:
    """The process that accepts connections (each worker, with workers) has its table grown before its loop runs:
    the SDK's call is served, and /proc shows the raised soft limit and the table's size."""
    if HARD < 2_048:
        pytest.skip(f"this machine's hard limit ({HARD}) leaves nothing to raise to")
    process, _, log = serve(1_024, HARD, workers)
    pids = serving_pids(process, workers)
    assert len(pids) == workers
    want = min(HARD, _nr_open())
    for pid in pids:
        assert soft_limit(pid) == want
        assert table_size(pid) >= min(want, fdtable.PRESIZE_CAP)
    assert "soft limit raised from 1024" in log


def test_gate_serve_under_a_low_hard_limit_serves_and_says_how_few_streams_it_can_hold(
    serve: Callable[..., tuple[subprocess.Popen[bytes], int, str]],
) -> None:
    process, _, log = serve(256, 256)
    assert soft_limit(process.pid) == 256
    assert "about 128 streams" in log


def test_the_entry_point_prepares_the_table_before_the_loop_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Before the loop, so the one slow growth happens at start; from the entry point, not serve() (tests run
    serve() inside their own process)."""
    import gate.app

    calls: list[str] = []

    def run_loop(main: object) -> None:
        main.close()  # type: ignore[attr-defined]
        calls.append("loop")

    monkeypatch.setattr(gate.app, "_run_loop", run_loop)
    monkeypatch.setattr(fdtable, "prepare", lambda: calls.append("prepare"))
    assert gate.app.run(GateSettings.model_validate({})) == 0
    assert calls == ["prepare", "loop"]


def _nr_open() -> int:
    return int(Path("/proc/sys/fs/nr_open").read_text())
