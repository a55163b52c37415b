"""benchmarks/micro/ttfb_breakdown.py reads its tcpdump capture by hand: the reader and the split it makes of each
probe, on a capture built here (Ethernet and Linux cooked frames, micro- and nanosecond pcap files)."""

from __future__ import annotations

import struct
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "micro"))

import ttfb_breakdown as tb

PROXY, FAKE = 8000, 9000


def _frame(sport: int, dport: int, payload: bytes, cooked: bool) -> bytes:
    tcp = struct.pack("!HHIIBBHHH", sport, dport, 1, 1, 5 << 4, 0x18, 65535, 0, 0) + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 0, 0, 64, 6, 0, b"\x7f\0\0\1", b"\x7f\0\0\1") + tcp
    link = b"\0" * 14 + b"\x08\x00" if cooked else b"\0" * 12 + b"\x08\x00"
    return link + ip


def _pcap(
    path: Path, packets: list[tuple[float, int, int, bytes]], *, cooked: bool = False, nano: bool = False
) -> Path:
    magic = 0xA1B23C4D if nano else 0xA1B2C3D4
    out = [struct.pack("<IHHiIII", magic, 2, 4, 0, 0, 65535, 113 if cooked else 1)]
    for ts, sport, dport, payload in packets:
        frame = _frame(sport, dport, payload, cooked)
        sec = int(ts)
        frac = round((ts - sec) * (1e9 if nano else 1e6))
        out.append(struct.pack("<IIII", sec, frac, len(frame), len(frame)) + frame)
    path.write_bytes(b"".join(out))
    return path


PROBE = b"POST /v1/messages HTTP/1.1\r\n\r\n{}"
PACED = b"POST /v1/messages HTTP/1.1\r\n\r\n{(bench-pace-ms=10)}"
CAPTURE = [
    (99.990, 5001, PROXY, PACED),  # wrk's paced request: never a probe
    (99.991, 6001, FAKE, PACED),
    (100.0020, 4000, PROXY, PROBE),  # the probe reaches the proxy
    (100.0025, 6002, FAKE, PROBE),  # the proxy's upstream request
    (100.0027, FAKE, 6001, b"HTTP/1.1 200 OK\r\n\r\n"),  # the paced stream's answer, on another connection
    (100.0030, FAKE, 6002, b"HTTP/1.1 200 OK\r\n\r\nevent: message_start"),
    (100.0034, PROXY, 4000, b"HTTP/1.1 200 OK\r\n\r\nevent: message_start"),
    (100.0040, FAKE, 6002, b"event: ping"),  # later bytes change nothing
    (100.0050, PROXY, 4000, b"event: ping"),
]


@pytest.mark.parametrize(("cooked", "nano"), [(False, False), (True, False), (False, True)])
def test_each_probe_is_split_at_its_four_packets(tmp_path: Path, cooked: bool, nano: bool) -> None:
    capture = _pcap(tmp_path / "c.pcap", CAPTURE, cooked=cooked, nano=nano)

    result = tb.breakdown(tb.read_pcap(capture), PROXY, FAKE)

    assert len(result.probes) == 1
    probe = result.probes[0]
    assert probe.client_port == 4000 and probe.upstream_port == 6002
    assert (probe.upstream_sent - probe.sent) * 1000 == pytest.approx(0.5, abs=1e-3)  # type: ignore[operator]
    assert (probe.upstream_first - probe.upstream_sent) * 1000 == pytest.approx(0.5, abs=1e-3)  # type: ignore[operator]
    assert (probe.first - probe.upstream_first) * 1000 == pytest.approx(0.4, abs=1e-3)  # type: ignore[operator]
    assert len(result.requests_in) == 2 and len(result.upstream_requests) == 2
    summary = tb.summarize("proxy", result, {})
    assert summary["wire"]["p50"] == pytest.approx(1.4, abs=1e-3)
    assert summary["slowest"][0]["requests_around"] == 1  # the paced request came 12 ms before: not around it


def test_direct_has_no_upstream_leg(tmp_path: Path) -> None:
    packets = [(1.0, 4000, FAKE, PROBE), (1.0002, FAKE, 4000, b"HTTP/1.1 200 OK\r\n\r\n")]

    result = tb.summarize("direct", tb.breakdown(tb.read_pcap(_pcap(tmp_path / "d.pcap", packets)), FAKE, FAKE), {})

    assert result["probes"] == 1 and result["wire"]["p50"] == pytest.approx(0.2, abs=1e-3)
    assert "in" not in result


def test_other_files_are_refused(tmp_path: Path) -> None:
    (tmp_path / "x.pcap").write_bytes(b"not a capture at all, but long enough")
    with pytest.raises(ValueError, match="not a pcap"):
        list(tb.read_pcap(tmp_path / "x.pcap"))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400))
def test_any_bytes_after_a_valid_header_never_crash_the_reader(tail: bytes) -> None:
    data = struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1) + tail
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder, "any.pcap")
        path.write_bytes(data)
        for segment in tb.read_pcap(path):
            assert segment.head
