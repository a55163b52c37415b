"""Print the runtime part of requirements.lock as ``name==version`` lines, for ``pip install --no-deps``.

The lock (``uv pip compile --extra dev``) holds the runtime and the development dependencies together; its
``# via`` comments give, for every pin, the packages that need it. The runtime closure is every pin reachable
from pyproject.toml's ``[project].dependencies`` through those edges, so the image installs exactly the locked
versions and nothing of the dev extra (pytest, anthropic, mypy, ...). Standard library only: it runs in the
image's build stage before anything is installed.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?==(\S+)")
_VIA = re.compile(r"^\s+#\s+(?:via\s+)?([A-Za-z0-9][A-Za-z0-9._-]*)")
_REQUIREMENT_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_lock(text: str) -> dict[str, tuple[str, set[str]]]:
    """name -> (pinned line, names of the packages that need it)."""
    pins: dict[str, tuple[str, set[str]]] = {}
    current: str | None = None
    for line in text.splitlines():
        pin = _PIN.match(line)
        if pin:
            current = normalise(pin.group(1))
            pins[current] = (line.strip(), set())  # with its environment marker, if the lock gives one
            continue
        via = _VIA.match(line)
        if via and current is not None and not line.strip().startswith("# This file"):
            parent = via.group(1)
            if parent != "gate":  # "gate (pyproject.toml)": a root, decided by pyproject below
                pins[current][1].add(normalise(parent))
    return pins


def runtime_pins(pyproject: str, lock: str) -> list[str]:
    project = tomllib.loads(pyproject)["project"]
    roots = {normalise(m.group(1)) for dep in project["dependencies"] if (m := _REQUIREMENT_NAME.match(dep))}
    pins = parse_lock(lock)
    missing = sorted(roots - pins.keys())
    if missing:
        raise SystemExit(f"requirements.lock does not pin {', '.join(missing)}: run `make lock`")
    needed = set(roots)
    changed = True
    while changed:
        changed = False
        for name, (_line, parents) in pins.items():
            if name not in needed and parents & needed:
                needed.add(name)
                changed = True
    return sorted(pins[name][0] for name in needed)


def main(argv: list[str]) -> int:
    pyproject, lock = (Path(p).read_text(encoding="utf-8") for p in argv[1:3])
    sys.stdout.write("".join(f"{line}\n" for line in runtime_pins(pyproject, lock)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
