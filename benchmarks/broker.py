"""A RabbitMQ node of the bench's own, pinned to the rig's core (the one wrk and the fake upstream use).

Why: the shared broker on 5672 floats over every core, Gate's included. Measured with
``micro/delivery_cpu.py loop`` (c=50, 8 s, same session): publishing to it, Gate still owed 38,123 events when the
load stopped (the broker, starved of CPU, confirmed slowly, and its own work landed on Gate's core); publishing
to a node pinned away from Gate, 396. A deployment's broker runs on other hosts, so the bench gives Gate a
broker off Gate's core. The shared node is never touched: this one has its own node name, data directory and
ports, and is stopped at the end of the run.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path

from procs import Proc, free_port, wait_port


class OwnBroker:
    """``start()`` returns the AMQP URL of a fresh node (or raises RuntimeError); ``stop()`` ends it."""

    def __init__(self, log: Path, cpus: str | None) -> None:
        self.log, self.cpus = log, cpus
        self.proc: Proc | None = None
        self.home: Path | None = None
        self.node: str | None = None

    def start(self, timeout: float = 90.0) -> str:
        server = shutil.which("rabbitmq-server")
        if server is None:
            raise RuntimeError("rabbitmq-server is not installed")
        # Under /tmp and open to all: rabbitmq-server run as root switches to the rabbitmq user.
        self.home = Path(tempfile.mkdtemp(prefix="gate-bench-rabbitmq-"))
        port, dist = free_port(), free_port()
        for sub in ("mnesia", "log"):
            (self.home / sub).mkdir()
        (self.home / "enabled_plugins").write_text("[].\n")  # no management listener to collide with the shared one
        (self.home / "rabbitmq.conf").write_text(f"listeners.tcp.default = 127.0.0.1:{port}\nloopback_users = none\n")
        for path in (self.home, *self.home.iterdir()):
            path.chmod(0o777)
        self.node = f"gatebench{port}@localhost"
        env = dict(
            os.environ,
            RABBITMQ_NODENAME=self.node,
            RABBITMQ_NODE_PORT=str(port),
            RABBITMQ_DIST_PORT=str(dist),
            RABBITMQ_CONFIG_FILE=str(self.home / "rabbitmq.conf"),
            RABBITMQ_MNESIA_BASE=str(self.home / "mnesia"),
            RABBITMQ_LOG_BASE=str(self.home / "log"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(self.home / "enabled_plugins"),
        )
        self.proc = Proc("rabbitmq", [server], cpus=self.cpus, log=self.log, env=env)
        try:
            wait_port("127.0.0.1", port, timeout, self.proc.popen)
        except RuntimeError as exc:
            self.stop()
            raise RuntimeError(f"the bench's own RabbitMQ node did not start: {exc} (see {self.log})") from None
        return f"amqp://guest:guest@127.0.0.1:{port}/"

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop(timeout=30)
            self.proc = None
        # rabbitmq-server switches to the rabbitmq user in a session of its own, out of the group Proc stops:
        # find the node's processes by the node name in their environment (ours alone) and end them.
        if self.node is not None:
            for sig, wait in ((signal.SIGTERM, 30.0), (signal.SIGKILL, 5.0)):
                pids = _node_pids(self.node)
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, sig)
                deadline = time.monotonic() + wait
                while pids and time.monotonic() < deadline:
                    time.sleep(0.2)
                    pids = _node_pids(self.node)
                if not pids:
                    break
            self.node = None
        if self.home is not None:
            shutil.rmtree(self.home, ignore_errors=True)
            self.home = None


def _node_pids(node: str) -> list[int]:
    """Processes whose environment names ``node`` (RABBITMQ_NODENAME): the node's VM and its helpers."""
    marker = f"RABBITMQ_NODENAME={node}\0".encode()
    pids = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                environ = Path(entry.path, "environ").read_bytes()
            except OSError:
                continue
            if marker in environ + b"\0":
                pids.append(int(entry.name))
    return pids
