"""The ``gate`` command: ``serve``, ``config`` (effective settings, secrets masked), ``token`` (dev tokens) and
``usage`` (a user's standing against every spend cap and rate limit, read from the limits store)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

import yaml

from gate import __version__
from gate.settings import ConfigError, GateSettings, load_settings, parse_duration

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

    config = commands.add_parser("config", help="print the effective configuration, secrets masked")
    with_config(config)

    token = commands.add_parser("token", help="print a development token (local profile without a JWKS only)")
    with_config(token)
    token.add_argument("--sub", required=True, help="the user (JWT sub claim)")
    token.add_argument("--ttl", default="1h", help="lifetime, e.g. 30m, 1h, 8h (default 1h)")

    usage = commands.add_parser("usage", help="show a user's standing against every spend cap and rate limit")
    with_config(usage)
    usage.add_argument("--user", required=True, help="the user (JWT sub claim)")
    usage.add_argument("--group", action="append", default=[], help="a group of the user; repeatable")
    return parser


def _load(args: argparse.Namespace, overrides: dict[str, Any] | None = None) -> GateSettings:
    return load_settings(config_files=args.config, profiles=args.profile, overrides=overrides)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "serve":
            return _serve(args)
        if args.command == "config":
            settings = _load(args)
            sys.stdout.write(yaml.safe_dump(settings.masked(), sort_keys=False))
            return 0
        if args.command == "token":
            return _token(args)
        if args.command == "usage":
            return _usage(args)
    except ConfigError as exc:
        sys.stderr.write(f"gate: {exc}\n")
        return 2
    return 2


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
    settings = _load(args, overrides)

    from gate.app import run
    from gate.ops.logs import configure_logging

    logging_settings = settings.observability.logging
    configure_logging(logging_settings.format, logging_settings.level)
    try:
        run(settings)
    except OSError as exc:  # the port is taken, the data directory is read-only...: say so, no traceback
        sys.stderr.write(f"gate: cannot start: {exc}\n")
        return 1
    return 0


def _token(args: argparse.Namespace) -> int:
    settings = _load(args)
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


def _usage(args: argparse.Namespace) -> int:
    settings = _load(args)
    if not settings.limits.enabled:
        sys.stderr.write("gate: limits are not enabled (limits.enabled) in this configuration\n")
        return 2
    import asyncio

    from gate.policy.limits import standing_report

    try:
        report = asyncio.run(standing_report(settings, args.user, args.group))
    except ConnectionError as exc:
        sys.stderr.write(f"gate: {exc}\n")
        return 1
    sys.stdout.write(report)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
