"""``helm template`` without a helm binary: renders deploy/helm/gate through Helm's own library (helm-python-sdk).

    .venv/bin/python deploy/helm/render.py [-f VALUES.yaml] [--set K=V] [--set-file applicationConfig=F] > gate.yaml

Lints first (strict) and stops on an error, like ``helm lint && helm template``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import helm_python as helm
import yaml

CHART = Path(__file__).resolve().parent / "gate"


def merge(target: dict[str, Any], incoming: dict[str, Any]) -> None:
    for key, value in incoming.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            merge(target[key], value)
        else:
            target[key] = value


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("-f", "--values", action="append", default=[], help="values file; repeatable, later wins")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="as helm's --set")
    parser.add_argument("--set-file", action="append", default=[], metavar="KEY=FILE", help="a value read from a file")
    parser.add_argument("--name", default="gate", help="release name")
    parser.add_argument("--namespace", default="gate")
    args = parser.parse_args()
    values: dict[str, Any] = {}
    for path in args.values:
        merge(values, yaml.safe_load(Path(path).read_text()) or {})
    try:
        for item in args.set:
            merge(values, helm.parse_set_string(item))
        for item in args.set_file:
            merge(values, helm.parse_set_file(item))
        return render(values, args.name, args.namespace)
    except helm.HelmError as exc:
        sys.stderr.write(f"render: {exc}\n")
        return 1


def render(values: dict[str, Any], name: str, namespace: str) -> int:
    report = helm.lint(str(CHART), values, strict=True)
    for message in report["messages"]:
        if message["severity"] >= 2:
            sys.stderr.write(f"lint: {message['path']}: {message['error']}\n")
    if report["errors"] or any(m["severity"] >= 3 for m in report["messages"]):
        return 1
    with helm.Chart.load(str(CHART)) as chart:
        rendered = chart.render(values=values, name=name, namespace=namespace, is_install=True)
    for name in sorted(rendered):
        if name.endswith(".yaml") and rendered[name].strip():
            sys.stdout.write(f"---\n# Source: {name}\n{rendered[name].strip()}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
