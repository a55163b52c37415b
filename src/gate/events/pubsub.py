"""Usage events to Google Cloud Pub/Sub (or its emulator), waiting for the server's ack of every message.

Content modes follow the CloudEvents Pub/Sub Protocol Binding (cloudevents/spec,
``pubsub-protocol-binding.md``) and the Go SDK's implementation (cloudevents/sdk-go ``protocol/pubsub``):

- structured (3.2): the whole event as message data, attribute ``Content-Type: application/cloudevents+json``;
- binary (3.1): ``data`` as message data, attribute ``Content-Type`` = ``datacontenttype`` (3.1.1), and every
  other attribute as ``ce-<attr>`` in its canonical string form (3.1.3), e.g. ``ce-id``, ``ce-time``.

The client library is synchronous and thread based: publishing runs in a worker thread and its futures are
awaited with ``asyncio.wrap_future``, so the event loop never waits on gRPC.

A message the client will not send (``MessageTooLargeError``: over Pub/Sub's 10 MB request limit; a value it
cannot encode) or that the server answers ``InvalidArgument`` is refused, not an outage: retrying it would fail
the same way. (An ``InvalidArgument`` may also be the whole request's, e.g. a malformed topic name; the
publisher only sets an event aside when it is refused alone while other events get through.)
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
from collections.abc import Sequence
from typing import Any

from google.api_core import exceptions as api_exceptions
from google.api_core.retry import Retry, if_exception_type
from google.auth.exceptions import GoogleAuthError

from gate.events.envelope import STRUCTURED_CONTENT_TYPE, to_binary
from gate.events.outbox import PendingEvent
from gate.events.sink import SendResult, SinkUnavailable, describe_error
from gate.settings import UsageSettings

__all__ = ["CONTENT_TYPE_ATTRIBUTE", "PUBSUB_ATTRIBUTE_PREFIX", "PubSubSink"]

PUBSUB_ATTRIBUTE_PREFIX = "ce-"
CONTENT_TYPE_ATTRIBUTE = "Content-Type"
_ERRORS = (api_exceptions.GoogleAPIError, GoogleAuthError, OSError)
_TRANSIENT = if_exception_type(
    api_exceptions.ServiceUnavailable,
    api_exceptions.DeadlineExceeded,
    api_exceptions.InternalServerError,
    api_exceptions.Aborted,
    api_exceptions.ResourceExhausted,
    api_exceptions.Unknown,
    api_exceptions.Cancelled,
)
# What says "this message", not "Pub/Sub now": raised by publish() before sending, or the server's 400.
_REFUSALS = (ValueError, TypeError, api_exceptions.InvalidArgument)


class PubSubSink:
    """A ``PublisherClient`` for one topic; ``connected`` means the last call to Pub/Sub succeeded."""

    name = "pubsub"

    def __init__(self, settings: UsageSettings) -> None:
        self._project = settings.pubsub.project_id
        self._topic_id = settings.destination
        self._emulator = settings.pubsub.emulator_host or os.environ.get("PUBSUB_EMULATOR_HOST") or None
        self._create_topic = settings.pubsub.create_topic
        self._timeout = settings.pubsub.publish_timeout
        self._binary = settings.content_mode != "structured"  # binary (ce-* attributes) unless told otherwise
        self._client: Any = None
        self._topic: str | None = None
        self._connected = False
        self._connecting = asyncio.Lock()
        # Transient errors are retried inside the client only this long; the outbox retries after that.
        self._retry = Retry(initial=0.1, maximum=1.0, timeout=self._timeout, predicate=_TRANSIENT)

    @property
    def connected(self) -> bool:
        return self._connected

    async def connect(self) -> None:
        async with self._connecting:
            if self._topic is not None and self._connected:
                return
            try:
                await asyncio.to_thread(self._open)
            except _ERRORS as exc:
                self._connected = False
                raise SinkUnavailable(f"Pub/Sub: {describe_error(exc)}") from None
            self._connected = True

    async def send(self, events: Sequence[PendingEvent]) -> SendResult:
        try:
            await self.connect()
        except SinkUnavailable as exc:
            return SendResult(error=str(exc))
        futures = await asyncio.to_thread(self._publish_all, events)
        waiting = {asyncio.wrap_future(f): event.seq for f, event in zip(futures, events, strict=True)}
        # The retry deadline bounds each future; the margin only guards against a client that never answers.
        done, late = await asyncio.wait(waiting, timeout=self._timeout * 2 + 5)
        for future in late:
            future.cancel()
        result = SendResult()
        for future, seq in waiting.items():
            error = future.exception() if future in done and not future.cancelled() else None
            if future in done and not future.cancelled() and error is None:
                result.delivered.append(seq)
            elif isinstance(error, _REFUSALS):
                result.refuse(seq, f"Pub/Sub: {describe_error(error)}")
            elif result.error is None:
                result.error = "Pub/Sub: " + (describe_error(error) if error else "no answer from Pub/Sub")
        self._connected = result.error is None or bool(result.delivered)
        return result

    async def close(self) -> None:
        client, self._client, self._topic = self._client, None, None
        self._connected = False
        if client is not None:
            await asyncio.to_thread(client.stop)

    def _open(self) -> None:
        if self._client is None:
            self._client = self._make_client()
        topic = self._client.topic_path(self._project, self._topic_id)
        if self._create_topic:
            with contextlib.suppress(api_exceptions.AlreadyExists):  # the usual case after the first start
                self._client.create_topic(name=topic, retry=None, timeout=self._timeout)
        self._topic = topic

    def _make_client(self) -> Any:
        from google.cloud import pubsub_v1

        if self._emulator:
            import grpc  # type: ignore[import-untyped]
            from google.pubsub_v1.services.publisher.transports import PublisherGrpcTransport

            transport = PublisherGrpcTransport(channel=grpc.insecure_channel(self._emulator))
            return pubsub_v1.PublisherClient(transport=transport)
        return pubsub_v1.PublisherClient()

    def _publish_all(self, events: Sequence[PendingEvent]) -> list[concurrent.futures.Future[str]]:
        client, topic = self._client, self._topic
        futures: list[concurrent.futures.Future[str]] = []
        for event in events:
            try:
                if self._binary:
                    binary = to_binary(event.body)  # a stored body that is not JSON raises ValueError
                    attributes = {f"{PUBSUB_ATTRIBUTE_PREFIX}{k}": v for k, v in binary.attributes.items()}
                    attributes[CONTENT_TYPE_ATTRIBUTE] = binary.content_type
                    data = binary.data
                else:
                    attributes = {CONTENT_TYPE_ATTRIBUTE: STRUCTURED_CONTENT_TYPE}
                    data = event.body
                future = client.publish(topic, data, retry=self._retry, timeout=self._timeout, **attributes)
            except (*_ERRORS, *_REFUSALS, RuntimeError) as exc:  # refused before sending: a failure too
                future = concurrent.futures.Future()
                future.set_exception(exc)
            futures.append(future)
        return futures
