"""The ``gate`` command: ``serve``, ``config`` (effective settings, secrets masked, the source of each value),
``token`` (dev tokens) and ``usage-sink`` (usage events from the broker into PostgreSQL / BigQuery, with the usage
report)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator, Mapping, Sequence
from decimal import Decimal
from typing import Any

import yaml

from gate import __version__
from gate.settings import ConfigError, ConfigSources, GateSettings, KeyPath, load_with_sources, parse_duration

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gate", description="Enterprise gateway for Anthropic's Messages API.")
    parser.add_argument("--version", action="version", version=f"gate {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(sub: argparse.ArgumentParser) -> None:
        sub.add_argument(
            "--config", action="append", default=[], metavar="FILE", help="YAML file; repeatable, later wins"
        )
        sub.add_argument(
            "--profile",
            action="append",
            default=[],
            metavar="NAME",
            help="active profile; repeatable (default: $GATE_PROFILES or local)",
        )

    serve = commands.add_parser("serve", help="run the gateway")
    with_config(serve)
    serve.add_argument("--host", help="listen address (server.host)")
    serve.add_argument("--port", type=int, help="listen port (server.port)")
    serve.add_argument("--workers", type=int, help="processes sharing the port (server.workers)")
    serve.add_argument("--log-format", choices=("json", "console"), help="log format (observability.logging.format)")

    config = commands.add_parser(
        "config", help="print the effective configuration, secrets masked, each value's source as a comment"
    )
    with_config(config)

    token = commands.add_parser("token", help="print a development token (local profile without a JWKS only)")
    with_config(token)
    token.add_argument("--sub", required=True, help="the user (JWT sub claim)")
    token.add_argument("--ttl", default="1h", help="lifetime, e.g. 30m, 1h, 8h (default 1h)")

    sink = commands.add_parser(
        "usage-sink", help="consume usage events into PostgreSQL (and BigQuery); serve health, metrics and the report"
    )
    with_config(sink)
    sink.add_argument("--port", type=int, help="HTTP port for health, metrics and the report (usage-sink.server.port)")
    sink.add_argument("--migrate-only", action="store_true", help="apply the schema migrations, then exit")
    return parser


def _load(args: argparse.Namespace, overrides: dict[str, Any] | None = None) -> tuple[GateSettings, ConfigSources]:
    settings, sources = load_with_sources(config_files=args.config, profiles=args.profile, overrides=overrides)
    _warn(sources)
    return settings, sources


def _warn(sources: ConfigSources | None) -> None:
    for warning in sources.warnings if sources is not None else ():
        sys.stderr.write(f"gate: warning: {warning}\n")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "serve":
            return _serve(args)
        if args.command == "config":
            settings, sources = _load(args)
            sys.stdout.write(render_config(settings.masked(), sources))
            return 0
        if args.command == "token":
            return _token(args)
        if args.command == "usage-sink":
            return _usage_sink(args)
    except ConfigError as exc:
        if exc.sources is not None:
            _warn(exc.sources)
            if args.command == "config":  # show what was merged: this is when the operator needs it most
                from gate.ops.redact import mask_config

                sys.stdout.write(render_config(mask_config(exc.sources.data), exc.sources))
        sys.stderr.write(f"gate: {exc}\n")
        return 2
    return 2


def render_config(data: Mapping[str, Any], sources: ConfigSources) -> str:
    """YAML of ``data`` (already masked), every value followed by ``# <file or variable>`` it came from.

    Written out here because PyYAML cannot emit comments; the result still loads with ``yaml.safe_load``.
    """
    return "".join(f"{line}\n" for line in _yaml_lines(data, (), "", sources))


def _yaml_lines(data: Mapping[str, Any], path: KeyPath, indent: str, sources: ConfigSources) -> Iterator[str]:
    for key, value in data.items():
        here = (*path, key)
        name = _scalar(key)
        if isinstance(value, Mapping) and value:
            yield f"{indent}{name}:"
            yield from _yaml_lines(value, here, indent + "  ", sources)
        elif isinstance(value, list) and value and all(isinstance(item, Mapping) and item for item in value):
            yield f"{indent}{name}:  # {sources.source_of(here)}"
            for index, item in enumerate(value):
                lines = list(_yaml_lines(item, (*here, index), indent + "    ", sources))
                yield f"{indent}  - {lines[0].lstrip()}"
                yield from lines[1:]
        else:
            yield f"{indent}{name}: {_scalar(value)}  # {sources.source_of(here)}"


def _scalar(value: Any) -> str:
    """One value in YAML flow style, on one line."""
    if isinstance(value, list):  # strings in a flow list are always quoted: `,`, `]` and `[` end them otherwise
        items = (_double_quoted(item) if isinstance(item, str) else _scalar(item) for item in value)
        return f"[{', '.join(items)}]"
    if isinstance(value, str) and not value.isprintable():
        return _double_quoted(value)  # PyYAML would fold a line break onto the next line
    if isinstance(value, Decimal):
        return str(value)  # prices: exact, as written (PyYAML has no representer for Decimal)
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 30, allow_unicode=True).strip()
    return text.removesuffix("\n...").removesuffix("...").strip()


def _double_quoted(text: str) -> str:
    """A YAML double-quoted scalar with every unprintable character escaped (YAML 1.1's \\x, \\u, \\U)."""
    out = ['"']
    for char in text:
        code = ord(char)
        if char in '\\"':
            out.append("\\" + char)
        elif char.isprintable():
            out.append(char)
        else:
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
    out.append('"')
    return "".join(out)


def _serve(args: argparse.Namespace) -> int:
    server: dict[str, Any] = {}
    if args.host:
        server["host"] = args.host
    if args.port is not None:
        server["port"] = args.port
    if args.workers is not None:
        server["workers"] = args.workers
    overrides: dict[str, Any] = {"server": server} if server else {}
    if args.log_format:
        overrides["observability"] = {"logging": {"format": args.log_format}}
    settings, _sources = _load(args, overrides)

    from gate.app import StartupError, run
    from gate.ops.logs import configure_logging

    logging_settings = settings.observability.logging
    configure_logging(logging_settings.format, logging_settings.level)
    try:
        return run(settings)
    except OSError as exc:  # the port is taken, the data directory is read-only...: say so, no traceback
        sys.stderr.write(f"gate: cannot start: {exc}\n")
        return 1
    except StartupError as exc:  # a worker could not start: one line for all of them
        sys.stderr.write(f"gate: cannot start: {exc}\n")
        return exc.exit_code


def _usage_sink(args: argparse.Namespace) -> int:
    overrides: dict[str, Any] = {}
    if args.port is not None:
        overrides = {"usage-sink": {"server": {"port": args.port}}}
    settings, _sources = _load(args, overrides)

    from gate.ops.logs import configure_logging
    from gate.usagesink.service import run

    logging_settings = settings.observability.logging
    configure_logging(logging_settings.format, logging_settings.level)
    try:
        run(settings, migrate_only=args.migrate_only)
    except OSError as exc:
        sys.stderr.write(f"gate: usage-sink cannot start: {exc}\n")
        return 1
    return 0


def _token(args: argparse.Namespace) -> int:
    settings, _sources = _load(args)
    if not settings.dev_auth:
        sys.stderr.write(
            "gate: `gate token` mints development tokens only with the `local` profile and no "
            "security.jwt.jwk-set-uri; get a token from your identity provider instead.\n"
        )
        return 2
    from gate.identity.auth import mint_dev_token

    try:
        ttl = parse_duration(args.ttl)
    except ValueError as exc:
        sys.stderr.write(f"gate: --ttl: {exc}\n")
        return 2
    try:
        token = mint_dev_token(settings, args.sub, ttl)
    except ValueError as exc:  # an empty --sub or a zero --ttl: a usage error, not a traceback
        sys.stderr.write(f"gate: {exc}\n")
        return 2
    sys.stdout.write(token + "\n")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
