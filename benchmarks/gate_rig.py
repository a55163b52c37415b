"""What Gate needs to run in the benchmark: an RSA key, a JWKS served on a local port, a token, a config file."""

from __future__ import annotations

import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
import yaml
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

KID = "bench-key-1"
BENCH_KEYS = [{"alias": "a", "value": "sk-ant-bench-a"}, {"alias": "b", "value": "sk-ant-bench-b"}]


class JwksServer:
    """Serves one public key as a JWKS at ``/.well-known/jwks.json`` from a daemon thread, and an OIDC discovery
    document naming it at ``/.well-known/openid-configuration`` (for ``claude gateway``, which reads one at start;
    its authorization and token endpoints are never called, since the benchmark signs no one in)."""

    def __init__(self, jwks: dict[str, Any]) -> None:
        documents = {"/.well-known/jwks.json": json.dumps(jwks).encode()}

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                payload = documents.get(self.path.split("?", 1)[0])
                if payload is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: Any) -> None:
                return

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        issuer = self.issuer
        discovery = {
            "issuer": issuer,
            "authorization_endpoint": f"{issuer}/authorize",
            "token_endpoint": f"{issuer}/token",
            "jwks_uri": self.uri,
            "response_types_supported": ["code"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "scopes_supported": ["openid", "profile", "email"],
        }
        documents["/.well-known/openid-configuration"] = json.dumps(discovery).encode()
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="jwks", daemon=True)
        self.thread.start()

    @property
    def issuer(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    @property
    def uri(self) -> str:
        return f"{self.issuer}/.well-known/jwks.json"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


BENCH_EXCHANGE = "llm-gateway-usage"
BENCH_QUEUE = "gate-bench-usage"
# The broker Gate publishes to. The shared one floats over every core, Gate's included; ``BENCH_AMQP_URL`` points
# Gate at another, and ``run.py --broker own`` (the default) sets this to a node of its own on the rig's core, as a
# deployment's broker is on other hosts.
BROKER_URL = os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")


def bind_usage_queue() -> None:
    """A bounded queue bound to the usage exchange, as a deployment's consumer would have.

    Without one, RabbitMQ returns every event as unroutable and Gate (rightly) keeps retrying them, which would
    measure a misconfiguration. The queue keeps the newest 100,000 events and needs no consumer.
    """
    import asyncio

    import aio_pika

    async def declare() -> None:
        connection = await aio_pika.connect(BROKER_URL)
        async with connection:
            channel = await connection.channel()
            exchange = await channel.declare_exchange(BENCH_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True)
            queue = await channel.declare_queue(
                BENCH_QUEUE, durable=True, arguments={"x-max-length": 100_000, "x-overflow": "drop-head"}
            )
            await queue.bind(exchange, routing_key="#")

    asyncio.run(declare())


class GateRig:
    """One signing key for the whole run; the token it mints is what every contender receives."""

    def __init__(self) -> None:
        self.private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        public = json.loads(RSAAlgorithm.to_jwk(self.private_key.public_key()))
        self.jwks = {"keys": [{**public, "kid": KID, "use": "sig", "alg": "RS256"}]}
        self.server = JwksServer(self.jwks)
        now = int(time.time())
        self.token = jwt.encode(
            {"sub": "bench-user", "iat": now, "nbf": now, "exp": now + 24 * 3600, "scope": "bench"},
            self.private_key,
            algorithm="RS256",
            headers={"kid": KID},
        )

    def write_config(
        self,
        path: Path,
        *,
        port: int,
        upstream: str,
        publisher: str,
        outbox: Path,
        workers: int = 1,
        broker_url: str | None = None,
    ) -> Path:
        """A Gate config with everything on (JWT, 2 keys, metering, outbox, tracing and metrics defaults).

        ``broker_url`` (default ``BROKER_URL``, where the bench's queue is bound first) points RabbitMQ elsewhere
        as it is, queue or not."""
        if publisher == "rabbitmq" and broker_url is None:
            bind_usage_queue()
        config = {
            "server": {"host": "127.0.0.1", "port": port, "workers": workers},
            "security": {"jwt": {"jwk-set-uri": self.server.uri}},
            "anthropic": {"api": {"base-url": upstream, "keys": BENCH_KEYS}},
            "usage": {
                "publisher": publisher,
                "rabbitmq": {"url": broker_url or BROKER_URL},
                "file": {"path": str(outbox.with_suffix(".jsonl"))},
                "outbox": {"path": str(outbox)},
            },
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return path

    def close(self) -> None:
        self.server.close()
