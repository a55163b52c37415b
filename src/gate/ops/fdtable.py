"""The process's open-file limit and file-descriptor table, made ready for thousands of connections at start.

Two things stand between a Python gateway and its 2,000th stream, each a stream holding two descriptors (the
client's connection and the upstream's):

- **The soft limit.** Many hosts start services with a soft ``RLIMIT_NOFILE`` of 1,024 (systemd's default) under
  a hard limit of 524,288 or more: Gate would refuse connections at about 500 streams. ``prepare`` raises the soft
  limit to the hard one, as the Go runtime does for every Go server; the hard limit stays the operator's.
- **The table's growth.** Linux grows a process's descriptor table by doubling it as descriptors are taken,
  and in a process with more than one thread (Gate has its outbox writer and the outbox's executor, libuv's
  resolver pool, and an exporter's thread when telemetry is exported) each doubling waits for an RCU grace period
  (``expand_fdtable`` calls ``synchronize_rcu``) inside the ``accept`` or ``socket`` call that crossed the
  boundary, with the event loop stopped. Measured with ``benchmarks/micro/fd_table.py`` (5,000 sockets opened
  one by one in a process with a second thread): ``socket()`` took 12, 15, 19, 5 and 11 ms at descriptors 256,
  512, 1,024, 2,048 and 4,096, against none over 0.5 ms in the same process single-threaded or with its table
  pre-sized. While 2,000 streams
  opened over 3 s (``benchmarks/run.py --phases streams``), each of those stalls delayed every stream starting
  then: they were the clusters of 10-17 ms in the time to first byte.

``prepare`` grows the table once, at start, to hold the (raised) soft limit, capped at ``PRESIZE_CAP``
descriptors: it duplicates a descriptor to the first free number at or above the size (``F_DUPFD``, which
never replaces an open descriptor) and closes the copy. The kernel never shrinks a table, so later ``accept``
calls find the room already there. The cost is kernel memory, not the process's RSS: 8 bytes and 2 bits per
entry, 512 KB at the cap. Tables larger than the cap still grow by doubling, from there.

No library does this (it is two ``resource`` calls and one ``fcntl``); ``gate serve`` calls ``prepare`` once
per process (each worker too), before its loop starts, and never from ``serve()``, which tests run inside their
own process.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from dataclasses import dataclass
from typing import Final

if sys.platform != "win32":  # Gate runs on POSIX; elsewhere prepare() leaves the process as it is
    import fcntl
    import resource

__all__ = ["LOW_LIMIT", "PRESIZE_CAP", "Prepared", "prepare"]

log = logging.getLogger(__name__)

# 65,536 descriptors: 32,000 streams a process, more than one Python loop can relay; 512 KB of kernel memory.
PRESIZE_CAP: Final = 65_536
# Under this many descriptors Gate says at start how few streams it can hold.
LOW_LIMIT: Final = 4_096


@dataclass(frozen=True, slots=True)
class Prepared:
    """What ``prepare`` found and did: the soft limit before and after, and the table size it asked for."""

    soft_before: int
    soft: int
    hard: int
    presized: int  # the number of descriptors the table holds at least; 0 if it could not be grown


def prepare(cap: int = PRESIZE_CAP) -> Prepared:
    """Raise the soft open-file limit to the hard one and pre-size the descriptor table (see the module)."""
    if sys.platform == "win32":  # pragma: no cover - no such limit or table to prepare
        return Prepared(soft_before=0, soft=0, hard=0, presized=0)
    soft_before, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    soft = _raise_soft(soft_before, hard)
    presized = _presize(min(soft, cap))
    prepared = Prepared(soft_before=soft_before, soft=soft, hard=hard, presized=presized)
    if soft != soft_before:
        log.info("open files: soft limit raised from %d to %d (the hard limit)", soft_before, soft)
    if soft < LOW_LIMIT:
        log.warning(
            "open files: the limit is %d, so this process can hold about %d streams at once (each holds two "
            "descriptors); raise the hard limit (ulimit -Hn, LimitNOFILE=, the container's nofile) for more",
            soft,
            soft // 2,
        )
    return prepared


def _raise_soft(soft: int, hard: int) -> int:
    target = hard
    if target == resource.RLIM_INFINITY:  # the kernel caps NOFILE at fs.nr_open, whatever the hard limit says
        try:
            with open("/proc/sys/fs/nr_open") as f:
                target = int(f.read())
        except (OSError, ValueError):
            return soft
    if soft != resource.RLIM_INFINITY and soft >= target:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (OSError, ValueError):  # a sandbox that forbids it: keep the limit we were given
        return soft
    return target


def _presize(size: int) -> int:
    """Make the table hold at least ``size`` descriptors; the size reached, or 0 when it could not be grown."""
    if size <= 0:
        return 0
    try:
        probe = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return 0
    try:
        high = fcntl.fcntl(probe, fcntl.F_DUPFD_CLOEXEC, size - 1)
    except OSError:  # every number from size - 1 up to the limit in use, or no memory for the table
        return 0
    finally:
        os.close(probe)
    with contextlib.suppress(OSError):
        os.close(high)
    return high + 1
