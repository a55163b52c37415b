"""A local fake of Anthropic's API for end-to-end tests: replays the documented wire examples byte for byte.

Each request is answered by the next scripted ``Reply`` (or a default: a streamed or JSON fixture, chosen by
the request's ``stream`` flag). A reply can cut its body into arbitrary pieces, pause, stall, drop the
connection, or answer an error; every request received, and every client that went away, is recorded.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import socket
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web
from multidict import CIMultiDict

FIXTURES = Path(__file__).parent / "fixtures"


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


@dataclass
class Reply:
    status: int = 200
    body: bytes | None = None
    fixture: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    cuts: list[int] | None = None  # sizes of the pieces the body is written in (the rest in one piece)
    delay: float = 0.0  # pause between pieces
    headers_delay: float = 0.0  # pause before the status line (a slow or hung upstream)
    drop_after: int | None = None  # abort the connection after this many body bytes
    stall_after: int | None = None  # send this many body bytes, then nothing, forever
    gzip: bool = False
    stream: bool | None = None  # force SSE framing (chunked) or a JSON answer with content-length


def error_reply(status: int, error_type: str, message: str, headers: dict[str, str] | None = None) -> Reply:
    body = json.dumps(
        {"type": "error", "error": {"type": error_type, "message": message}, "request_id": "req_error_1"}
    ).encode()
    return Reply(status=status, body=body, headers=headers or {}, stream=False)


@dataclass
class Received:
    method: str
    path_qs: str
    headers: CIMultiDict[str]
    body: bytes


class FakeAnthropic:
    """``async with FakeAnthropic() as fake: fake.url ...``"""

    def __init__(self) -> None:
        self.script: deque[Reply] = deque()
        # Answers requests when the script is empty (instead of the fixtures), e.g. a distinct message per request.
        self.responder: Callable[[Received], Reply] | None = None
        self.received: list[Received] = []
        self.cancelled = 0  # requests whose client went away before we finished answering
        self.completed = 0
        self.url = ""
        self._runner: web.AppRunner | None = None
        self._counter = 0

    def enqueue(self, *replies: Reply) -> None:
        self.script.extend(replies)

    def reset(self) -> None:
        self.script.clear()
        self.responder = None
        self.received.clear()
        self.cancelled = 0
        self.completed = 0

    async def __aenter__(self) -> FakeAnthropic:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        site = web.SockSite(self._runner, sock)
        await site.start()
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        received = Received(request.method, request.rel_url.raw_path_qs, CIMultiDict(request.headers), body)
        self.received.append(received)
        self._counter += 1
        if self.script:
            reply = self.script.popleft()
        elif self.responder is not None:
            reply = self.responder(received)
        else:
            reply = self._default(request, body)
        try:
            return await self._answer(request, reply)
        except (asyncio.CancelledError, ConnectionResetError):  # cancelled waiting, or the write met the reset
            self.cancelled += 1
            raise

    def _default(self, request: web.Request, body: bytes) -> Reply:
        path = request.path
        if path.startswith("/v1/models"):
            if path == "/v1/models":
                data = {
                    "data": [
                        {
                            "type": "model",
                            "id": "claude-opus-4-6",
                            "display_name": "Claude Opus 4.6",
                            "created_at": "2026-02-04T00:00:00Z",
                        },
                        {
                            "type": "model",
                            "id": "claude-haiku-4-5",
                            "display_name": "Claude Haiku 4.5",
                            "created_at": "2025-10-15T00:00:00Z",
                        },
                    ],
                    "has_more": False,
                    "first_id": "claude-opus-4-6",
                    "last_id": "claude-haiku-4-5",
                }
            else:
                model_id = path.rsplit("/", 1)[-1]
                data = {
                    "type": "model",
                    "id": model_id,
                    "display_name": model_id,
                    "created_at": "2026-02-04T00:00:00Z",
                }
            return Reply(body=json.dumps(data).encode(), stream=False)
        if path == "/v1/messages/count_tokens":
            return Reply(body=b'{"input_tokens":14}', stream=False)
        try:
            wants_stream = json.loads(body).get("stream") is True
        except (ValueError, AttributeError):
            wants_stream = False
        return Reply(fixture="stream-basic.sse" if wants_stream else "message-basic.json")

    async def _answer(self, request: web.Request, reply: Reply) -> web.StreamResponse:
        if reply.headers_delay:
            await asyncio.sleep(reply.headers_delay)
        payload = reply.body if reply.body is not None else fixture(reply.fixture or "message-basic.json")
        is_stream = reply.stream if reply.stream is not None else (reply.fixture or "").endswith(".sse")
        headers = CIMultiDict(
            {
                "request-id": f"req_fake_{self._counter:06d}",
                "anthropic-organization-id": "org-fake",
                "anthropic-ratelimit-requests-limit": "4000",
                "anthropic-ratelimit-requests-remaining": "3999",
                "x-custom-upstream": "kept",
            }
        )
        headers["Content-Type"] = "text/event-stream; charset=utf-8" if is_stream else "application/json"
        if is_stream:
            headers["Cache-Control"] = "no-cache"
        if reply.gzip:
            payload = gzip.compress(payload)
            headers["Content-Encoding"] = "gzip"
        headers.update(reply.headers)
        response = web.StreamResponse(status=reply.status, headers=headers)
        if not is_stream:
            response.content_length = len(payload)
        await response.prepare(request)
        pieces = _cut(payload, reply.cuts)
        sent = 0
        for piece in pieces:
            if reply.drop_after is not None and sent + len(piece) > reply.drop_after:
                piece = piece[: reply.drop_after - sent]
                if piece:
                    await response.write(piece)
                await asyncio.sleep(0.05)
                assert request.transport is not None
                request.transport.abort()
                return response
            if reply.stall_after is not None and sent + len(piece) > reply.stall_after:
                piece = piece[: reply.stall_after - sent]
                if piece:
                    await response.write(piece)
                await asyncio.sleep(3600)
            await response.write(piece)
            sent += len(piece)
            if reply.delay:
                await asyncio.sleep(reply.delay)
        await response.write_eof()
        self.completed += 1
        return response


def _cut(payload: bytes, cuts: list[int] | None) -> list[bytes]:
    if not cuts:
        return [payload]
    pieces, at = [], 0
    for size in cuts:
        if at >= len(payload):
            break
        pieces.append(payload[at : at + size])
        at += size
    if at < len(payload):
        pieces.append(payload[at:])
    return [p for p in pieces if p]


class PromptCache:
    """A responder that simulates Anthropic's prompt cache, which lives per organisation.

    Each key (``x-api-key``) belongs to an organisation (``organizations``, else its own). A request's prompt is
    its system text and messages; like Claude Code's, every request caches its whole prompt, so a later request
    of the same conversation reads the longest prefix its organisation has seen (``cache_read_input_tokens``) and
    writes the rest (``cache_creation_input_tokens``). Tokens are counted as a quarter of the JSON's bytes.
    """

    def __init__(self, organizations: dict[str, str] | None = None, model: str = "claude-sonnet-4-5") -> None:
        self.organizations = organizations or {}
        self.model = model
        self.seen: dict[str, set[str]] = {}

    def __call__(self, received: Received) -> Reply:
        import hashlib

        body = json.loads(received.body)
        key = received.headers.get("x-api-key", "")
        cache = self.seen.setdefault(self.organizations.get(key, key), set())
        parts = [json.dumps(body.get("system", ""))] + [json.dumps(m) for m in body.get("messages", [])]
        digest = hashlib.sha256()
        prefixes: list[tuple[str, int]] = []
        tokens = 0
        for part in parts:
            digest.update(part.encode())
            tokens += len(part) // 4 + 1
            prefixes.append((digest.hexdigest(), tokens))
        read = max((count for name, count in prefixes if name in cache), default=0)
        cache.update(name for name, _ in prefixes)
        usage = {
            "input_tokens": 3,
            "output_tokens": 20,
            "cache_creation_input_tokens": tokens - read,
            "cache_read_input_tokens": read,
        }
        message = {
            "id": f"msg_cache_{len(received.body)}",
            "type": "message",
            "role": "assistant",
            "content": [{"type": "text", "text": "ok"}],
            "model": self.model,
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": usage,
        }
        return Reply(body=json.dumps(message).encode(), stream=False)
