"""Real brokers for tests: RabbitMQ on 127.0.0.1:5672 (started if down, never stopped), Pub/Sub emulator.

A broker outage is a ``FaultProxy`` (``tests/faultproxy.py``) between Gate and RabbitMQ going down: the broker,
which a developer may share with other work, keeps running. Import the fixtures into a test module
(``from tests.brokers import rabbitmq, rabbit_proxy``) or use the plain helpers: ``ensure_rabbitmq``,
``proxied_url``, ``RabbitConsumer``, ``run_pubsub_emulator``, ``PubSubPuller``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage, AbstractQueue
from aio_pika.exceptions import CONNECTION_EXCEPTIONS

from tests.faultproxy import FaultProxy

RABBITMQ_HOST = "127.0.0.1"
RABBITMQ_PORT = 5672
RABBITMQ_URL = f"amqp://guest:guest@{RABBITMQ_HOST}:{RABBITMQ_PORT}/"
PUBSUB_EMULATOR = Path("/usr/lib/google-cloud-sdk/platform/pubsub-emulator/bin/cloud-pubsub-emulator")


# ------------------------------------------------------------------------------------------------- sockets


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=timeout):
        return True
    return False


def wait_for_port(host: str, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not port_open(host, port):
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing listens on {host}:{port} after {timeout:g}s")
        time.sleep(0.1)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# ------------------------------------------------------------------------------------------------ RabbitMQ


def _rabbitmqctl(*args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["rabbitmqctl", *args], capture_output=True, text=True, timeout=timeout, check=False)


def ensure_rabbitmq(timeout: float = 120.0) -> None:
    """RabbitMQ accepts AMQP on 5672: start its app (node up, app stopped) or the whole node if needed."""
    if port_open(RABBITMQ_HOST, RABBITMQ_PORT):
        return
    if _rabbitmqctl("start_app").returncode != 0:  # no node at all: start one
        subprocess.run(["rabbitmq-server", "-detached"], check=True, timeout=60)
    wait_for_port(RABBITMQ_HOST, RABBITMQ_PORT, timeout)


async def wait_for_amqp(url: str = RABBITMQ_URL, timeout: float = 120.0) -> None:
    """Until a real AMQP handshake succeeds (an open port alone can precede a ready broker)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            connection = await aio_pika.connect(url, timeout=3)
        except (TimeoutError, *CONNECTION_EXCEPTIONS):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.3)
        else:
            await connection.close()
            return


def proxied_url(proxy: FaultProxy) -> str:
    """The AMQP URL of RabbitMQ through ``proxy``: what Gate is given when a test takes the broker away."""
    return f"amqp://guest:guest@127.0.0.1:{proxy.port}/"


@pytest.fixture
def rabbit_proxy(rabbitmq: str) -> Iterator[FaultProxy]:
    """A fault proxy in front of RabbitMQ: ``with rabbit_proxy.outage():`` is a broker outage for Gate alone."""
    with FaultProxy(RABBITMQ_HOST, RABBITMQ_PORT) as proxy:
        yield proxy


def exchange_info(name: str) -> dict[str, Any] | None:
    """``{"name", "type", "durable"}`` of an exchange as the broker reports it, or None."""
    import json

    result = _rabbitmqctl("list_exchanges", "--formatter", "json", "name", "type", "durable")
    result.check_returncode()
    for row in json.loads(result.stdout):
        if row.get("name") == name:
            return dict(row)
    return None


class RabbitConsumer:
    """Binds a queue to a topic exchange (declared durable, as Gate declares it) and collects what arrives.

    By default the queue is fresh, exclusive and gone with the connection. With ``queue=`` it is a named
    durable queue that survives a broker restart: open, close, bounce the broker, open again and drain it.
    """

    def __init__(
        self,
        exchange: str,
        routing_key: str = "#",
        *,
        queue: str | None = None,
        url: str = RABBITMQ_URL,
        delete_queue: bool = True,
    ) -> None:
        self.exchange = exchange
        self.routing_key = routing_key
        self.queue_name = queue
        self.url = url
        self.delete_queue = delete_queue
        self.messages: list[AbstractIncomingMessage] = []
        self._connection: AbstractConnection | None = None
        self._channel: AbstractChannel | None = None
        self._queue: AbstractQueue | None = None
        self._arrived = asyncio.Event()

    async def __aenter__(self) -> RabbitConsumer:
        self._connection = await aio_pika.connect(self.url, timeout=10)
        self._channel = await self._connection.channel()
        exchange = await self._channel.declare_exchange(self.exchange, aio_pika.ExchangeType.TOPIC, durable=True)
        if self.queue_name is None:
            self._queue = await self._channel.declare_queue(exclusive=True, auto_delete=True)
        else:
            self._queue = await self._channel.declare_queue(self.queue_name, durable=True)
        await self._queue.bind(exchange, self.routing_key)
        await self._queue.consume(self._on_message, no_ack=True)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close(delete=self.delete_queue)

    async def close(self, *, delete: bool = False) -> None:
        connection, self._connection = self._connection, None
        if connection is None:
            return
        if delete and self._queue is not None and self.queue_name is not None and not connection.is_closed:
            await self._queue.delete(if_unused=False, if_empty=False)
        if not connection.is_closed:
            await connection.close()

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        self.messages.append(message)
        self._arrived.set()

    async def wait_for(self, count: int, timeout: float = 30.0, *, unique: bool = False) -> None:
        """Until ``count`` messages (or distinct message ids) arrived; TimeoutError says how many did."""
        deadline = time.monotonic() + timeout
        while (len(set(self.ids())) if unique else len(self.messages)) < count:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{len(self.messages)} messages ({len(set(self.ids()))} ids) of {count}")
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(left, 0.5)):
                    await self._arrived.wait()

    def ids(self) -> list[str]:
        return [m.message_id or "" for m in self.messages]


@pytest.fixture(scope="session")
def rabbitmq() -> str:
    """The AMQP URL of a running RabbitMQ (started if it was down)."""
    ensure_rabbitmq()
    return RABBITMQ_URL


# ------------------------------------------------------------------------------------- Pub/Sub emulator


@contextlib.contextmanager
def run_pubsub_emulator() -> Iterator[str]:
    """A fresh emulator on a free port (``host:port``), killed at the end with everything it started."""
    if not PUBSUB_EMULATOR.exists():
        pytest.skip(f"the Pub/Sub emulator is not installed ({PUBSUB_EMULATOR} is absent)")
    port = free_port()
    with (
        tempfile.TemporaryDirectory(prefix="pubsub-emulator-") as data_dir,
        open(Path(data_dir) / "emulator.log", "wb") as output,
    ):
        process = subprocess.Popen(
            [str(PUBSUB_EMULATOR), "--host=127.0.0.1", f"--port={port}"],
            stdout=output,
            stderr=subprocess.STDOUT,
            cwd=data_dir,
            start_new_session=True,  # its own process group: the wrapper script and the JVM go together
        )
        try:
            wait_for_port("127.0.0.1", port, timeout=60)
            yield f"127.0.0.1:{port}"
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)


@pytest.fixture(scope="module")
def pubsub_emulator_host() -> Iterator[str]:
    """A running emulator for the module; PUBSUB_EMULATOR_HOST points at it meanwhile (restored after)."""
    with run_pubsub_emulator() as host:
        previous = os.environ.get("PUBSUB_EMULATOR_HOST")
        os.environ["PUBSUB_EMULATOR_HOST"] = host
        try:
            yield host
        finally:
            if previous is None:
                os.environ.pop("PUBSUB_EMULATOR_HOST", None)
            else:
                os.environ["PUBSUB_EMULATOR_HOST"] = previous


class PubSubPuller:
    """A pull subscription on a topic (created, topic included, if missing), via the emulator in the env."""

    def __init__(self, project: str, topic: str, subscription: str) -> None:
        from google.cloud import pubsub_v1

        self._publisher = pubsub_v1.PublisherClient()
        self._subscriber = pubsub_v1.SubscriberClient()
        self.topic = self._publisher.topic_path(project, topic)
        self.subscription = self._subscriber.subscription_path(project, subscription)

    def create(self) -> None:
        from google.api_core.exceptions import AlreadyExists

        with contextlib.suppress(AlreadyExists):
            self._publisher.create_topic(name=self.topic)
        with contextlib.suppress(AlreadyExists):
            self._subscriber.create_subscription(name=self.subscription, topic=self.topic)

    def pull(self, count: int, timeout: float = 30.0) -> list[Any]:
        """At least ``count`` received messages (acked), or TimeoutError."""
        received: list[Any] = []
        deadline = time.monotonic() + timeout
        while len(received) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(received)} of {count} Pub/Sub messages arrived")
            response = self._subscriber.pull(
                request={"subscription": self.subscription, "max_messages": 100}, timeout=5
            )
            if response.received_messages:
                received.extend(response.received_messages)
                self._subscriber.acknowledge(
                    request={
                        "subscription": self.subscription,
                        "ack_ids": [m.ack_id for m in response.received_messages],
                    }
                )
        return received

    def close(self) -> None:
        self._subscriber.close()
        self._publisher.stop()


# ------------------------------------------------------------------------------------------------- waiting


async def wait_until(condition: Any, timeout: float = 30.0, what: str = "the condition") -> None:
    """Poll ``condition()`` until true; a bounded wait, not a timing assertion."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up after {timeout:g}s waiting for {what}")
        await asyncio.sleep(0.01)


async def delete_exchange(name: str, url: str = RABBITMQ_URL) -> None:
    """Remove a test's exchange (and so its bindings)."""
    connection = await aio_pika.connect(url, timeout=10)
    try:
        channel = await connection.channel()
        await channel.exchange_delete(name)
    finally:
        await connection.close()
