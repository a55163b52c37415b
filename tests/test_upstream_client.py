"""Gate's own upstream client as a deployment meets it: HTTPS through a corporate egress proxy (CONNECT), plain
HTTP through a forward proxy, certificate checks, keep-alive reuse and the pool limit, driven with the SDK."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anthropic
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.fake_anthropic import FakeAnthropic, Reply
from tests.harness import RunningGate, read_events

PROXY_USER, PROXY_PASSWORD = "egress-user", "s3cret-pass"


def client(gate: RunningGate) -> anthropic.Anthropic:
    # trust_env=False: the proxy variables set for Gate must not send the SDK's own calls through the proxy.
    return anthropic.Anthropic(
        base_url=gate.url,
        api_key=gate.token(),
        max_retries=0,
        http_client=anthropic.DefaultHttpxClient(trust_env=False),
    )


def ask(gate: RunningGate) -> anthropic.types.Message:
    return client(gate).messages.create(
        model="claude-sonnet-4-5", max_tokens=16, messages=[{"role": "user", "content": "hi"}]
    )


def self_signed(tmp: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp / "upstream-cert.pem", tmp / "upstream-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


@dataclass
class Relays:
    """A TLS front for the fake (``tls_port``) and an egress proxy (``proxy_port``), on one background loop."""

    fake_port: int
    cert: Path
    key: Path
    tls_port: int = 0
    proxy_port: int = 0
    connects: list[str] = field(default_factory=list)  # CONNECT targets, in order
    forwarded: list[str] = field(default_factory=list)  # request lines of absolute-form requests
    proxy_auth: list[str] = field(default_factory=list)
    tls_connections: int = 0
    proxy_connections: int = 0
    loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.new_event_loop)
    _servers: list[asyncio.Server] = field(default_factory=list)
    _thread: threading.Thread | None = None

    def start(self) -> Relays:
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self._thread.start()
        assert ready.wait(10)
        return self

    def stop(self) -> None:
        async def shut() -> None:
            for server in self._servers:
                server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shut(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        assert self._thread is not None
        self._thread.join(10)
        self.loop.close()

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.cert, self.key)
        tls = self.loop.run_until_complete(asyncio.start_server(self._tls_front, "127.0.0.1", 0, ssl=context))
        proxy = self.loop.run_until_complete(asyncio.start_server(self._proxy, "127.0.0.1", 0))
        self._servers = [tls, proxy]
        self.tls_port = tls.sockets[0].getsockname()[1]
        self.proxy_port = proxy.sockets[0].getsockname()[1]
        ready.set()
        self.loop.run_forever()

    async def _tls_front(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.tls_connections += 1
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.fake_port)
        await _pipe_both(reader, writer, up_reader, up_writer)

    async def _proxy(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.proxy_connections += 1
        head = await reader.readuntil(b"\r\n\r\n")
        request_line, *header_lines = head.decode("latin-1").split("\r\n")
        for line in header_lines:
            if line.lower().startswith("proxy-authorization:"):
                self.proxy_auth.append(line.split(":", 1)[1].strip())
        method, target, _ = request_line.split(" ", 2)
        if method == "CONNECT":
            self.connects.append(target)
            host, port = target.rsplit(":", 1)
            up_reader, up_writer = await asyncio.open_connection(
                "127.0.0.1", self.tls_port if host == "localhost" else int(port)
            )
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await writer.drain()
        else:  # absolute form: pass the request on to the origin it names
            self.forwarded.append(f"{method} {target}")
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.fake_port)
            up_writer.write(head)
        await _pipe_both(reader, writer, up_reader, up_writer)


async def _pipe_both(
    a_reader: asyncio.StreamReader,
    a_writer: asyncio.StreamWriter,
    b_reader: asyncio.StreamReader,
    b_writer: asyncio.StreamWriter,
) -> None:
    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    await asyncio.gather(pipe(a_reader, b_writer), pipe(b_reader, a_writer))


@pytest.fixture
def relays(tmp_path: Path, fake: FakeAnthropic) -> Iterator[Relays]:
    cert, key = self_signed(tmp_path)
    running = Relays(int(fake.url.rsplit(":", 1)[1]), cert, key).start()
    yield running
    running.stop()


@pytest.fixture
def clean_proxy_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "NO_PROXY", "no_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_https_upstream_through_an_egress_proxy_tunnel(
    start_gate: Any, fake: FakeAnthropic, relays: Relays, clean_proxy_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    clean_proxy_env.setenv("HTTPS_PROXY", f"http://{PROXY_USER}:{PROXY_PASSWORD}@127.0.0.1:{relays.proxy_port}")
    clean_proxy_env.setenv("SSL_CERT_FILE", str(relays.cert))  # the company's CA bundle, as OpenSSL reads it
    gate = start_gate(upstream_url=f"https://localhost:{relays.tls_port}")
    for _ in range(3):
        assert ask(gate).usage.output_tokens > 0
    # One tunnel, kept alive for all three calls; the proxy got Basic credentials; Anthropic got the company key.
    assert relays.connects == [f"localhost:{relays.tls_port}"]
    assert relays.tls_connections == 1
    assert relays.proxy_auth and relays.proxy_auth[0].startswith("Basic ")
    assert fake.received[-1].headers["x-api-key"].startswith("sk-ant-test-")
    events = read_events(Path(gate.settings.usage.file.path), 3)
    assert {event["data"]["status"] for event in events} == {"success"}


def test_an_untrusted_upstream_certificate_is_refused(
    start_gate: Any, fake: FakeAnthropic, relays: Relays, clean_proxy_env: pytest.MonkeyPatch
) -> None:
    gate = start_gate(upstream_url=f"https://localhost:{relays.tls_port}")
    with pytest.raises(anthropic.APIStatusError) as refused:
        ask(gate)
    assert refused.value.status_code == 502
    assert refused.value.body["error"]["type"] == "api_error"  # type: ignore[index]
    assert fake.received == []  # nothing went past the handshake
    attempts = gate.settings.anthropic.api.retry.connect_attempts  # a failed handshake is retried: nothing was sent
    events = read_events(Path(gate.settings.usage.file.path), attempts)
    assert [event["data"]["status"] for event in events] == ["error"] * attempts


def test_plain_http_upstream_through_a_forward_proxy(
    start_gate: Any, fake: FakeAnthropic, relays: Relays, clean_proxy_env: pytest.MonkeyPatch
) -> None:
    clean_proxy_env.setenv("HTTP_PROXY", f"http://127.0.0.1:{relays.proxy_port}")
    gate = start_gate()
    assert ask(gate).usage.output_tokens > 0
    assert relays.forwarded == [f"POST {fake.url}/v1/messages"]
    assert relays.connects == []


def test_a_pool_of_one_connection_serves_concurrent_streams_in_turn(
    start_gate: Any, fake: FakeAnthropic, relays: Relays, clean_proxy_env: pytest.MonkeyPatch
) -> None:
    # Through the forward proxy, each upstream connection Gate opens is one proxy connection: countable.
    clean_proxy_env.setenv("HTTP_PROXY", f"http://127.0.0.1:{relays.proxy_port}")
    gate = start_gate(anthropic={"api": {"pool-size": 1}})
    fake.enqueue(*[Reply(fixture="stream-basic.sse", headers_delay=0.2) for _ in range(3)])

    def stream() -> str:
        with client(gate).messages.stream(
            model="claude-sonnet-4-5", max_tokens=16, messages=[{"role": "user", "content": "hi"}]
        ) as s:
            return s.get_final_message().stop_reason or ""

    results: list[str] = []
    threads = [threading.Thread(target=lambda: results.append(stream())) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert results == ["end_turn"] * 3
    assert relays.proxy_connections == 1  # the three took turns on one connection
    events = read_events(Path(gate.settings.usage.file.path), 3)
    assert all(event["data"]["status"] == "success" for event in events)
