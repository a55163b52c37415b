"""TLS on Gate's own port (``server.ssl.*``): the SDK and httpx trusting a self-signed CA, mutual TLS, and
hostile clients at the TLS listener (plain HTTP, garbage, no client certificate) that must not hurt it."""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import json
import socket
import ssl
from collections.abc import Callable
from pathlib import Path

import anthropic
import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gate.settings import ConfigError, load_settings
from tests.fake_anthropic import FakeAnthropic
from tests.harness import RunningGate

WAIT = 30.0


class Pki:
    """A throwaway CA with a server certificate for 127.0.0.1/localhost and a client certificate."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.ca_key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Gate test CA")])
        self.ca_cert = (
            self._builder(name, name, self.ca_key)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
            .sign(self.ca_key, hashes.SHA256())
        )
        self.ca = self._write("ca.pem", self.ca_cert)
        self.server_cert, self.server_key = self.issue(
            "server",
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            ExtendedKeyUsageOID.SERVER_AUTH,
        )
        self.client_cert, self.client_key = self.issue(
            "client", x509.SubjectAlternativeName([x509.DNSName("alice.example")]), ExtendedKeyUsageOID.CLIENT_AUTH
        )

    def _builder(
        self, subject: x509.Name, issuer: x509.Name, key: ec.EllipticCurvePrivateKey
    ) -> x509.CertificateBuilder:
        now = datetime.datetime.now(datetime.UTC)
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
        )

    def issue(self, cn: str, san: x509.SubjectAlternativeName, usage: x509.ObjectIdentifier) -> tuple[Path, Path]:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
        cert = (
            self._builder(subject, self.ca_cert.subject, key)
            .add_extension(san, critical=False)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .sign(self.ca_key, hashes.SHA256())
        )
        key_path = self.tmp / f"{cn}.key"
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        return self._write(f"{cn}.pem", cert), key_path

    def _write(self, name: str, cert: x509.Certificate) -> Path:
        path = self.tmp / name
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return path

    def client_context(self, *, with_cert: bool = False) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca))
        if with_cert:
            context.load_cert_chain(str(self.client_cert), str(self.client_key))
        return context


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path)


def https(gate: RunningGate) -> str:
    return f"https://127.0.0.1:{gate.port}"


def tls_gate(start_gate: Callable[..., RunningGate], pki: Pki, **ssl_settings: str) -> RunningGate:
    settings = {"certificate": str(pki.server_cert), "certificate-private-key": str(pki.server_key), **ssl_settings}
    return start_gate(server={"ssl": settings})


def test_the_sdk_trusting_the_ca_streams_through_gate_over_tls(
    start_gate: Callable[..., RunningGate], pki: Pki, fake: FakeAnthropic
) -> None:
    gate = tls_gate(start_gate, pki)
    client = anthropic.Anthropic(
        base_url=https(gate),
        auth_token=gate.token(),
        max_retries=0,
        http_client=anthropic.DefaultHttpxClient(verify=pki.client_context()),
    )
    with client.messages.stream(
        model="claude-opus-4-6", max_tokens=64, messages=[{"role": "user", "content": "Hi"}]
    ) as stream:
        message = stream.get_final_message()
    assert message.usage.output_tokens == 15
    reply = client.messages.create(model="claude-opus-4-6", max_tokens=16, messages=[{"role": "user", "content": "Hi"}])
    assert reply.id
    health = httpx.get(https(gate) + "/actuator/health/liveness", verify=pki.client_context(), timeout=WAIT)
    assert health.status_code == 200
    assert len(fake.received) == 2


def test_a_client_that_does_not_trust_the_certificate_is_refused(
    start_gate: Callable[..., RunningGate], pki: Pki
) -> None:
    gate = tls_gate(start_gate, pki)
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(https(gate) + "/actuator/health/liveness", timeout=WAIT)  # the system's CAs only


def test_plain_http_and_garbage_at_the_tls_port_are_closed_and_gate_keeps_serving(
    start_gate: Callable[..., RunningGate], pki: Pki
) -> None:
    gate = tls_gate(start_gate, pki)
    for payload in (
        b"GET /actuator/health HTTP/1.1\r\nHost: x\r\n\r\n",
        b"\x16\x03\x01\x00\x05\xff\xff\xff\xff\xff" + b"\x00" * 4096,  # a handshake record that is not one
        bytes(range(256)) * 16,
    ):
        with socket.create_connection(("127.0.0.1", gate.port), timeout=WAIT) as sock:
            sock.sendall(payload)
            try:
                answer = sock.recv(65536)
            except ConnectionResetError:
                answer = b""
            assert b"HTTP/1.1" not in answer  # no plaintext answer, only a TLS alert or a close
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{gate.port}/actuator/health", timeout=WAIT)
    health = httpx.get(https(gate) + "/actuator/health/liveness", verify=pki.client_context(), timeout=WAIT)
    assert health.status_code == 200


def test_a_client_that_never_completes_the_handshake_is_closed_at_the_header_deadline(
    start_gate: Callable[..., RunningGate], pki: Pki
) -> None:
    settings = {"certificate": str(pki.server_cert), "certificate-private-key": str(pki.server_key)}
    gate = start_gate(server={"ssl": settings, "limits": {"header-timeout": "300ms"}})
    silent = socket.create_connection(("127.0.0.1", gate.port), timeout=WAIT)  # connects, says nothing
    half = socket.create_connection(("127.0.0.1", gate.port), timeout=WAIT)
    half.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")  # the start of a ClientHello, then silence
    for sock in (silent, half):
        with sock, contextlib.suppress(ConnectionResetError):
            assert sock.recv(65536) == b""  # closed by Gate; a TimeoutError after WAIT would fail the test
    health = httpx.get(https(gate) + "/actuator/health/liveness", verify=pki.client_context(), timeout=WAIT)
    assert health.status_code == 200


def test_mutual_tls_needs_a_client_certificate_from_the_trusted_ca(
    start_gate: Callable[..., RunningGate], pki: Pki
) -> None:
    gate = tls_gate(start_gate, pki, **{"trust-certificate": str(pki.ca)})
    url = https(gate) + "/actuator/health/liveness"
    with pytest.raises(httpx.HTTPError):
        httpx.get(url, verify=pki.client_context(), timeout=WAIT)  # no client certificate
    (pki.tmp / "other").mkdir()
    other = Pki(pki.tmp / "other")
    stranger = ssl.create_default_context(cafile=str(pki.ca))
    stranger.load_cert_chain(str(other.client_cert), str(other.client_key))  # a certificate from another CA
    with pytest.raises(httpx.HTTPError):
        httpx.get(url, verify=stranger, timeout=WAIT)
    answer = httpx.get(url, verify=pki.client_context(with_cert=True), timeout=WAIT)
    assert answer.status_code == 200
    assert json.loads(answer.content)["status"] == "UP"


def test_client_auth_without_a_trust_certificate_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"server\.ssl.*trust-certificate"):
        load_settings(
            env={},
            config_dir=tmp_path,
            overrides={"server": {"ssl": {"certificate": "/x.pem", "client-auth": "need"}}},
        )


def test_an_unreadable_certificate_stops_gate_with_the_file_named(tmp_path: Path) -> None:
    import subprocess
    import sys

    gate = Path(sys.executable).parent / "gate"
    done = subprocess.run(
        [str(gate), "serve", "--port", "0"],
        env={"SERVER_SSL_CERTIFICATE": str(tmp_path / "missing.pem"), "HOME": str(tmp_path), "PATH": ""},
        capture_output=True,
        text=True,
        timeout=WAIT,
        cwd=tmp_path,
        check=False,
    )
    assert done.returncode == 1
    assert "cannot start" in done.stderr and "missing.pem" in done.stderr and "No such file" in done.stderr
