"""Child processes of the benchmark: start pinned to a CPU, wait for a port, measure memory and fds, stop."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

LOG_LIMIT = 64 * 1024 * 1024  # access logs are truncated past this between measurements
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def pinned(cmd: Sequence[str], cpus: str | None) -> list[str]:
    """The command under ``taskset -c CPUS`` (no pinning when cpus is None)."""
    return ["taskset", "-c", cpus, *cmd] if cpus else list(cmd)


def wait_port(host: str, port: int, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"exited with code {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listening on {host}:{port} after {timeout:.0f}s")


class Proc:
    """One started command (and its process tree), its output appended to a log file."""

    def __init__(
        self,
        name: str,
        cmd: Sequence[str],
        *,
        cpus: str | None,
        log: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.cmd = pinned(cmd, cpus)
        self.log = log
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as out:  # O_APPEND, so truncating the file under the child is safe
            self.popen = subprocess.Popen(
                self.cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=dict(env) if env is not None else None,
                cwd=cwd,
                start_new_session=True,
            )
        self.peak_rss_kb = 0

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tree(self) -> list[int]:
        """This process and all its descendants (they share the session we started it in)."""
        pids = []
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                stat = Path(entry.path, "stat").read_bytes()
            except OSError:
                continue
            fields = stat[stat.rfind(b")") + 2 :].split()
            if int(fields[3]) == self.pid or int(entry.name) == self.pid:  # fields[3]: session id
                pids.append(int(entry.name))
        return pids

    def rss_kb(self) -> int:
        """Resident memory of the whole tree, summed (kB); remembers the peak seen."""
        total = sum(_status_kb(pid, "VmRSS") for pid in self.tree())
        self.peak_rss_kb = max(self.peak_rss_kb, total)
        return total

    def hwm_kb(self) -> int:
        """Sum over the tree of each process's own peak RSS (VmHWM)."""
        return sum(_status_kb(pid, "VmHWM") for pid in self.tree())

    def cpu_seconds(self) -> float:
        """User plus system CPU time used so far by the whole tree."""
        ticks = 0
        for pid in self.tree():
            try:
                stat = Path(f"/proc/{pid}/stat").read_bytes()
            except OSError:
                continue
            fields = stat[stat.rfind(b")") + 2 :].split()
            ticks += int(fields[11]) + int(fields[12])  # utime, stime
        return ticks / CLOCK_TICKS

    def fds(self) -> int:
        total = 0
        for pid in self.tree():
            try:
                total += len(os.listdir(f"/proc/{pid}/fd"))
            except OSError:
                continue
        return total

    def trim_log(self) -> None:
        try:
            if self.log.stat().st_size > LOG_LIMIT:
                os.truncate(self.log, 0)
        except OSError:
            return

    def log_tail(self, lines: int = 15) -> str:
        try:
            data = self.log.read_bytes()[-8192:]
        except OSError:
            return ""
        return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])

    def stop(self, timeout: float = 10.0) -> None:
        if not self.alive():
            return
        try:
            os.killpg(self.pid, signal.SIGTERM)  # the group we created for this child, by its id
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.pid, signal.SIGKILL)
            self.popen.wait(5)
        except ProcessLookupError:
            return


def wait_idle(procs: list[Proc], timeout: float, busy_share: float = 0.05, window: float = 0.5) -> float:
    """Wait until ``procs`` together use under ``busy_share`` of a CPU; return the seconds waited.

    A contender left with a backlog (LiteLLM keeps working on requests whose client went away) would
    otherwise steal the shared core from the next measurement.
    """
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        before = sum(p.cpu_seconds() for p in procs if p.alive())
        time.sleep(window)
        used = sum(p.cpu_seconds() for p in procs if p.alive()) - before
        if used < busy_share * window:
            break
    return time.monotonic() - start


def _status_kb(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return 0
    return 0
