"""A program in a pseudo-terminal, for tests that drive an interactive CLI (Claude Code's /login): output read
by a thread, ``expect`` waits for text on the ANSI-stripped screen stream, ``send`` types keys."""

from __future__ import annotations

import contextlib
import fcntl
import os
import pty
import re
import signal
import struct
import termios
import threading
import time
from collections.abc import Mapping, Sequence

_ANSI = re.compile(r"\x1b\[[0-9;?<>=]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[()][0-9A-Za-z]|\x1b[=>78]")


class PseudoTerminal:
    def __init__(self, argv: Sequence[str], env: Mapping[str, str], cwd: str, *, rows: int = 50, cols: int = 160):
        pid, fd = pty.fork()
        if pid == 0:  # the child: become the program
            os.chdir(cwd)
            os.execvpe(argv[0], list(argv), dict(env))
        self.pid, self._fd = pid, fd
        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        self._raw = bytearray()
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True, name="pty-reader")
        self._reader.start()
        self._mark = 0

    def _read(self) -> None:
        while True:
            try:
                data = os.read(self._fd, 65536)
            except OSError:
                break
            if not data:
                break
            with self._lock:
                self._raw += data
        self._closed.set()

    @property
    def text(self) -> str:
        """Everything shown so far, escape sequences removed, runs of blanks squeezed."""
        with self._lock:
            raw = bytes(self._raw)
        return re.sub(r"[ \t]+", " ", _ANSI.sub(" ", raw.decode("utf-8", "replace")))

    def expect(self, pattern: str, timeout: float = 60.0) -> re.Match[str]:
        """Wait for ``pattern`` (a regex) in the output that arrived after the previous match."""
        compiled = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            text = self.text
            match = compiled.search(text, self._mark)
            if match:
                self._mark = match.end()
                return match
            if self._closed.is_set() or time.monotonic() > deadline:
                raise AssertionError(f"never saw {pattern!r}; the screen ended with:\n{text[-3000:]}")
            time.sleep(0.1)

    def send(self, keys: str) -> None:
        os.write(self._fd, keys.encode())

    def close(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            done, _status = os.waitpid(self.pid, os.WNOHANG)
            if done:
                break
            time.sleep(0.1)
        else:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        os.close(self._fd)
