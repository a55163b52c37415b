"""What growing the descriptor table costs a process with threads, and what ``gate.ops.fdtable`` saves.

Opens 5,000 sockets one by one and times each ``socket()`` call, in four processes: single-threaded or with a
second thread (Gate always has several), each with its table as the kernel grows it or pre-sized by
``gate.ops.fdtable.prepare()``. Linux doubles the table as descriptors are taken; with more than one thread it
waits for an RCU grace period at each doubling (``expand_fdtable`` -> ``synchronize_rcu``), inside the call
that crossed the boundary.

Run: ``.venv/bin/python benchmarks/micro/fd_table.py``. Prints, per process: the calls over 0.5 ms (descriptor,
ms) and the total time. Needs a soft open-file limit above 5,000 (``ulimit -n``).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time

COUNT = 5_000
SLOW_MS = 0.5


def measure(threaded: bool, presized: bool) -> dict[str, object]:
    if threaded:
        threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
    if presized:
        from gate.ops import fdtable

        fdtable.prepare()
    sockets: list[socket.socket] = []
    slow: list[tuple[int, float]] = []
    started = time.perf_counter()
    for _ in range(COUNT):
        before = time.perf_counter()
        sock = socket.socket()
        took = (time.perf_counter() - before) * 1000
        if took > SLOW_MS:
            slow.append((sock.fileno(), round(took, 2)))
        sockets.append(sock)
    total = (time.perf_counter() - started) * 1000
    for sock in sockets:
        sock.close()
    return {"threaded": threaded, "presized": presized, "slow_calls": slow, "total_ms": round(total, 1)}


def main() -> None:
    if len(sys.argv) == 3:  # one measurement, in a process of its own
        print(json.dumps(measure(sys.argv[1] == "threaded", sys.argv[2] == "presized")))
        return
    for threaded in ("single", "threaded"):
        for presized in ("grown", "presized"):
            out = subprocess.run([sys.executable, __file__, threaded, presized], capture_output=True, text=True)
            if out.returncode:
                sys.exit(out.stderr)
            result = json.loads(out.stdout)
            slow = ", ".join(f"fd {fd}: {ms} ms" for fd, ms in result["slow_calls"]) or "none"
            print(f"{threaded:8} {presized:8} total {result['total_ms']:6.1f} ms; calls over {SLOW_MS} ms: {slow}")


if __name__ == "__main__":
    main()
