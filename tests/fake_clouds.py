"""Local fakes of Claude's cloud upstreams, each speaking its cloud's wire format, checking paths, bodies and
credentials as the cloud would: Vertex AI (with a Google OAuth2 token endpoint for the service-account flow),
Bedrock (SigV4 recomputed with botocore, or an API key; streams as real AWS event-stream frames) and Foundry.

Each fake records what it received and answers from the same fixtures as ``fake_anthropic``; ``fail`` queues
statuses to answer first (in the cloud's own error shape), so failover can be driven.
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import jwt
from aiohttp import web
from anthropic._constants import ANTHROPIC_API_VERSION
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from multidict import CIMultiDict

from tests.fake_anthropic import fixture

VERTEX_TOKEN_PREFIX = "ya29.fake-"
# The clouds' documented versions, and the one the installed SDK's AnthropicVertex / AnthropicBedrock send.
VERTEX_VERSIONS = {"vertex-2023-10-16", ANTHROPIC_API_VERSION}
BEDROCK_VERSIONS = {"bedrock-2023-05-31", ANTHROPIC_API_VERSION}
AWS_ACCESS_KEY = "AKIDEXAMPLEGATE00001"
AWS_SECRET_KEY = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
BEDROCK_API_KEY = "bedrock-api-key-test-0001"
FOUNDRY_KEY = "foundry-key-test-0001"
FOUNDRY_TOKEN = "entra-token-test-0001"


@dataclass
class Seen:
    method: str
    path: str
    headers: CIMultiDict[str]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)


def sse_events(raw: bytes) -> list[tuple[str, bytes]]:
    """(event name, data bytes) of an SSE fixture, in order."""
    out = []
    for block in raw.split(b"\n\n"):
        if not block.strip():
            continue
        name, data = b"", b""
        for line in block.split(b"\n"):
            if line.startswith(b"event: "):
                name = line[7:]
            elif line.startswith(b"data: "):
                data = line[6:]
        out.append((name.decode(), data))
    return out


# ------------------------------------------------------------------------------------------------ event stream


def _header(name: str, value: str) -> bytes:
    encoded = name.encode()
    text = value.encode()
    return bytes([len(encoded)]) + encoded + b"\x07" + struct.pack(">H", len(text)) + text


def frame(headers: dict[str, str], payload: bytes) -> bytes:
    """One AWS event-stream message: prelude (total length, headers length, CRC32), headers, payload, CRC32."""
    head = b"".join(_header(k, v) for k, v in headers.items())
    total = 16 + len(head) + len(payload)
    prelude = struct.pack(">II", total, len(head))
    prelude += struct.pack(">I", binascii.crc32(prelude))
    message = prelude + head + payload
    return message + struct.pack(">I", binascii.crc32(message))


def chunk_frame(event_json: bytes) -> bytes:
    payload = json.dumps({"bytes": base64.b64encode(event_json).decode(), "p": "abcdefgh"}).encode()
    return frame({":event-type": "chunk", ":content-type": "application/json", ":message-type": "event"}, payload)


def exception_frame(kind: str, message: str) -> bytes:
    payload = json.dumps({"message": message}).encode()
    return frame({":exception-type": kind, ":content-type": "application/json", ":message-type": "exception"}, payload)


def bedrock_stream(sse: bytes, *, with_metrics: bool = True) -> bytes:
    """An SSE fixture as Bedrock streams it; ``message_stop`` carries Bedrock's metrics, as Bedrock's does."""
    frames = []
    for _name, data in sse_events(sse):
        event = json.loads(data)
        if with_metrics and event.get("type") == "message_stop":
            event["amazon-bedrock-invocationMetrics"] = {
                "inputTokenCount": 25,
                "outputTokenCount": 15,
                "invocationLatency": 512,
                "firstByteLatency": 300,
            }
            data = json.dumps(event, separators=(",", ":")).encode()
        frames.append(chunk_frame(data))
    return b"".join(frames)


# ------------------------------------------------------------------------------------------------ servers


@dataclass
class _Fake:
    received: list[Seen] = field(default_factory=list)
    fail: deque[int] = field(default_factory=deque)  # statuses to answer first, one per call
    stream_body: bytes | None = None  # replaces the default stream answer once
    cuts: list[int] | None = None  # write a stream in pieces of these sizes
    runner: web.AppRunner | None = None
    url: str = ""

    async def serve(self, app: web.Application) -> None:
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"

    async def close(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    async def _seen(self, request: web.Request) -> Seen:
        seen = Seen(request.method, request.rel_url.raw_path, CIMultiDict(request.headers), await request.read())
        self.received.append(seen)
        return seen

    async def _write(
        self, request: web.Request, payload: bytes, content_type: str, headers: dict[str, str] | None = None
    ) -> web.StreamResponse:
        response = web.StreamResponse(status=200, headers={"content-type": content_type, **(headers or {})})
        await response.prepare(request)
        position = 0
        for size in self.cuts or []:
            await response.write(payload[position : position + size])
            position += size
        if position < len(payload):
            await response.write(payload[position:])
        await response.write_eof()
        return response


class FakeGoogleToken(_Fake):
    """Google's OAuth2 token endpoint for the service-account (JWT bearer) flow: checks the assertion's signature
    against the service account's public key and issues access tokens."""

    def __init__(self, public_key_pem: bytes) -> None:
        super().__init__()
        self.public_key = public_key_pem
        self.issued: list[str] = []
        self.expires_in = 3600

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/token", self._token)
        await self.serve(app)

    async def _token(self, request: web.Request) -> web.Response:
        form = await request.post()
        if form.get("grant_type") != "urn:ietf:params:oauth:grant-type:jwt-bearer":
            return web.json_response({"error": "unsupported_grant_type"}, status=400)
        try:
            # google-auth always names Google's own endpoint as the audience, wherever token_uri points
            claims = jwt.decode(
                str(form.get("assertion")),
                self.public_key,
                algorithms=["RS256"],
                audience="https://oauth2.googleapis.com/token",
            )
        except jwt.PyJWTError as exc:
            return web.json_response({"error": "invalid_grant", "error_description": str(exc)}, status=400)
        assert "cloud-platform" in claims["scope"]
        token = f"{VERTEX_TOKEN_PREFIX}{len(self.issued) + 1}-{int(time.time())}"
        self.issued.append(token)
        return web.json_response({"access_token": token, "expires_in": self.expires_in, "token_type": "Bearer"})


class FakeVertex(_Fake):
    """Vertex AI's Anthropic publisher endpoints; a token is good if the token endpoint issued it."""

    def __init__(self, tokens: FakeGoogleToken, project: str, region: str) -> None:
        super().__init__()
        self.tokens = tokens
        self.prefix = f"/v1/projects/{project}/locations/{region}/publishers/anthropic/models/"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        await self.serve(app)

    @staticmethod
    def _google_error(status: int, message: str, code: str) -> web.Response:
        return web.json_response({"error": {"code": status, "message": message, "status": code}}, status=status)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        seen = await self._seen(request)
        if request.method != "POST" or not seen.path.startswith(self.prefix):
            return self._google_error(404, f"The requested URL {seen.path} was not found.", "NOT_FOUND")
        auth = seen.headers.get("authorization", "")
        if not auth.startswith("Bearer ") or auth[7:] not in self.tokens.issued:
            return self._google_error(401, "Request had invalid authentication credentials.", "UNAUTHENTICATED")
        if self.fail:
            status = self.fail.popleft()
            return self._google_error(status, "Quota exceeded or service unavailable.", "UNAVAILABLE")
        body = seen.json
        if body.get("anthropic_version") not in VERTEX_VERSIONS:
            return self._google_error(400, "anthropic_version must be vertex-2023-10-16", "INVALID_ARGUMENT")
        model, _, method = seen.path[len(self.prefix) :].rpartition(":")
        if model == "count-tokens" and method == "rawPredict":
            assert "model" in body
            return web.json_response({"input_tokens": 14})
        if "model" in body:
            return self._google_error(400, "model is not allowed in the body", "INVALID_ARGUMENT")
        if method == "streamRawPredict":
            assert body.get("stream") is True
            payload, self.stream_body = self.stream_body or fixture("stream-basic.sse"), None
            return await self._write(request, payload, "text/event-stream; charset=utf-8")
        if method == "rawPredict":
            return web.Response(body=fixture("message-basic.json"), content_type="application/json")
        return self._google_error(404, f"unknown method {method}", "NOT_FOUND")


class FakeBedrock(_Fake):
    """bedrock-runtime's InvokeModel and InvokeModelWithResponseStream; SigV4 is checked by recomputing it."""

    def __init__(self, region: str) -> None:
        super().__init__()
        self.region = region
        self.signed = 0

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        await self.serve(app)

    @staticmethod
    def _aws_error(status: int, kind: str, message: str) -> web.Response:
        return web.json_response(
            {"message": message},
            status=status,
            headers={"x-amzn-ErrorType": f"{kind}:http://internal.amazon.com/coral/com.amazon.bedrock/"},
        )

    def _authorised(self, seen: Seen, host: str) -> bool:
        auth = seen.headers.get("authorization", "")
        if auth == f"Bearer {BEDROCK_API_KEY}":
            return True
        if not auth.startswith("AWS4-HMAC-SHA256 "):
            return False
        parts = dict(item.strip().split("=", 1) for item in auth[len("AWS4-HMAC-SHA256 ") :].split(","))
        access_key, _date, region, service, _ = parts["Credential"].split("/")
        if access_key != AWS_ACCESS_KEY or region != self.region or service != "bedrock":
            return False
        signed = parts["SignedHeaders"].split(";")
        headers = {name: seen.headers[name] for name in signed if name != "host"}
        request = AWSRequest(method=seen.method, url=f"http://{host}{seen.path}", headers=headers, data=seen.body)
        request.context["timestamp"] = seen.headers["x-amz-date"]
        signer = SigV4Auth(Credentials(AWS_ACCESS_KEY, AWS_SECRET_KEY), "bedrock", self.region)
        canonical = signer.canonical_request(request)
        expected = signer.signature(signer.string_to_sign(request, canonical), request)
        if expected == parts["Signature"]:
            self.signed += 1
            return True
        return False

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        seen = await self._seen(request)
        path = seen.path
        if request.method != "POST" or not path.startswith("/model/"):
            return self._aws_error(404, "UnknownOperationException", "Unknown operation")
        if not self._authorised(seen, request.headers["host"]):
            return self._aws_error(
                403, "InvalidSignatureException", "The request signature we calculated does not match the signature"
            )
        if self.fail:
            status = self.fail.popleft()
            return self._aws_error(
                status,
                "ThrottlingException" if status == 429 else "ServiceUnavailableException",
                "Too many requests, please wait before trying again.",
            )
        body = seen.json
        if body.get("anthropic_version") not in BEDROCK_VERSIONS or "model" in body or "stream" in body:
            return self._aws_error(400, "ValidationException", "Malformed input request")
        _model, operation = path[len("/model/") :].rsplit("/", 1)
        headers = {"x-amzn-requestid": "bedrock-req-0001"}
        if operation == "invoke":
            return web.Response(body=fixture("message-basic.json"), content_type="application/json", headers=headers)
        if operation == "invoke-with-response-stream":
            payload, self.stream_body = self.stream_body or bedrock_stream(fixture("stream-tool-use.sse")), None
            response = await self._write(request, payload, "application/vnd.amazon.eventstream", headers)
            return response
        return self._aws_error(404, "UnknownOperationException", "Unknown operation")


class FakeFoundry(_Fake):
    """Foundry's Anthropic-compatible endpoint under ``/anthropic``: Anthropic's wire format, Azure's credentials."""

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        await self.serve(app)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        seen = await self._seen(request)
        key = seen.headers.get("x-api-key") or seen.headers.get("api-key")
        bearer = seen.headers.get("authorization", "")
        if key != FOUNDRY_KEY and bearer != f"Bearer {FOUNDRY_TOKEN}":
            return web.json_response(
                {"error": {"code": "401", "message": "Access denied due to invalid subscription key."}}, status=401
            )
        if self.fail:
            status = self.fail.popleft()
            return web.json_response({"error": {"code": str(status), "message": "Rate limit"}}, status=status)
        if seen.path != "/anthropic/v1/messages":
            return web.json_response({"error": {"code": "404", "message": "Resource not found"}}, status=404)
        if seen.json.get("stream"):
            return await self._write(request, fixture("stream-basic.sse"), "text/event-stream; charset=utf-8")
        return web.Response(body=fixture("message-basic.json"), content_type="application/json")
