"""The price table: cost of a usage record by hand computation, for every token type and every fixture, price
versions by effective date, pattern resolution, and ``cost`` / ``price_version`` in the usage event end to end."""

from __future__ import annotations

import dataclasses
import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import anthropic
import pytest

from gate.accounting.prices import PriceTable, format_usd
from gate.accounting.usage import UsageMeter, UsageRecord
from gate.events.envelope import build_event
from gate.settings import ConfigError, load_settings
from tests.fake_anthropic import FakeAnthropic, Reply, fixture
from tests.harness import RunningGate, read_events

UTC = datetime.UTC
M = Decimal(1_000_000)


def packaged_table() -> PriceTable:
    return PriceTable.from_settings(load_settings(profiles=["local"], env={}, config_dir="/nonexistent"))


def record_from(fixture_name: str, *, stream: bool, time: str = "2026-06-01T12:00:00.000Z") -> UsageRecord:
    """The record the relay would make for this upstream answer (the meter reads the fixture as Gate does)."""
    meter = UsageMeter(stream=stream)
    meter.feed(fixture(fixture_name))
    meter.finish()
    return UsageRecord(
        subject="alice",
        model=meter.model,
        message_id=meter.message_id,
        input_tokens=meter.input_tokens,
        output_tokens=meter.output_tokens,
        cache_creation_tokens=meter.cache_creation_tokens,
        cache_read_tokens=meter.cache_read_tokens,
        latency_ms=1,
        stream=stream,
        stop_reason=meter.stop_reason,
        status="success",
        error_type=None,
        key_alias="primary",
        trace_id=None,
        anthropic_request_id=None,
        cache_creation_5m_tokens=meter.cache_creation_5m_tokens,
        cache_creation_1h_tokens=meter.cache_creation_1h_tokens,
        web_search_requests=meter.web_search_requests,
        time=time,
    )


def table(*entries: dict[str, Any]) -> PriceTable:
    settings = load_settings(
        profiles=["local"], env={}, config_dir="/nonexistent", overrides={"prices": {"models": list(entries)}}
    )
    return PriceTable.from_settings(settings.prices)


def version(effective_from: str, input: str, output: str, **rest: str) -> dict[str, str]:
    return {
        "effective-from": effective_from,
        "input": input,
        "output": output,
        "cache-write-5m": rest.get("cw5", "0"),
        "cache-write-1h": rest.get("cw1", "0"),
        "cache-read": rest.get("cr", "0"),
        "web-search": rest.get("ws", "0"),
        **({"version": rest["label"]} if "label" in rest else {}),
    }


# ------------------------------------------------------------------------------------- hand computations


def test_json_answer_with_cache_writes_of_both_ttls_and_cache_reads() -> None:
    # message-prompt-caching.json: Sonnet 4.5, input 21, output 393, cache read 4096, writes 1500 (5 m) + 551 (1 h)
    record = record_from("message-prompt-caching.json", stream=False)
    cost = packaged_table().cost(record)
    assert cost is not None
    hand = (
        21 * Decimal(3) + 393 * Decimal(15) + 1500 * Decimal("3.75") + 551 * Decimal(6) + 4096 * Decimal("0.30")
    ) / M
    assert cost.usd == hand == Decimal("0.0161178")
    assert format_usd(cost.usd) == "0.0161178"
    assert cost.version == "claude-sonnet-4*@2025-05-22"


def test_stream_with_cache_writes_and_reads_matches_the_json_answer() -> None:
    record = record_from("stream-prompt-caching-usage.sse", stream=True)
    assert (record.cache_creation_5m_tokens, record.cache_creation_1h_tokens) == (1500, 551)
    cost = packaged_table().cost(record)
    assert cost is not None and format_usd(cost.usd) == "0.0161178"


def test_plain_stream() -> None:
    # stream-basic.sse: Opus 4.6, input 25, output 15
    cost = packaged_table().cost(record_from("stream-basic.sse", stream=True))
    assert cost is not None
    assert cost.usd == (25 * Decimal(5) + 15 * Decimal(25)) / M
    assert format_usd(cost.usd) == "0.0005"


def test_stream_of_claude_3_haiku() -> None:
    # stream-tool-use.sse: claude-3-haiku-20240307, input 472, output 89
    cost = packaged_table().cost(record_from("stream-tool-use.sse", stream=True))
    assert cost is not None
    assert format_usd(cost.usd) == format_usd((472 * Decimal("0.25") + 89 * Decimal("1.25")) / M) == "0.00022925"


def test_web_search_is_priced_per_thousand_requests() -> None:
    # stream-web-search-usage.sse: Opus 4.1, input 10682 (raised by message_delta), output 510, 1 web search
    record = record_from("stream-web-search-usage.sse", stream=True)
    assert record.web_search_requests == 1
    cost = packaged_table().cost(record)
    assert cost is not None
    assert cost.usd == (10682 * Decimal(15) + 510 * Decimal(75)) / M + Decimal(10) / 1000
    assert format_usd(cost.usd) == "0.20848"


def test_cache_writes_without_a_ttl_split_are_priced_at_five_minutes() -> None:
    record = dataclasses.replace(
        record_from("message-basic.json", stream=False),
        model="claude-haiku-4-5",
        input_tokens=0,
        output_tokens=0,
        cache_creation_tokens=1000,
        cache_read_tokens=0,
    )
    cost = packaged_table().cost(record)
    assert cost is not None and cost.usd == 1000 * Decimal("1.25") / M


def test_unpriced_model_has_no_cost_and_the_event_no_cost_fields() -> None:
    # Claude Fable 5.2 is not in the packaged table (its cache prices were not confirmed), and Fable 5's row must
    # not take it
    record = dataclasses.replace(record_from("message-basic.json", stream=False), model="claude-fable-5-2")
    prices = packaged_table()
    assert prices.cost(record) is None
    data = build_event(record, event_type="t", source="/s", prices=prices)["data"]
    assert "cost" not in data and "price_version" not in data
    assert prices.cost(dataclasses.replace(record, model=None)) is None


def test_the_event_carries_cost_as_an_exact_string_and_the_version() -> None:
    record = record_from("stream-web-search-usage.sse", stream=True)
    data = build_event(record, event_type="t", source="/s", prices=packaged_table())["data"]
    assert data["cost"] == "0.20848"
    assert data["price_version"] == "claude-opus-4*@2025-05-22"


def test_no_floats_anywhere() -> None:
    price = packaged_table().price("claude-3-5-haiku-20241022")
    assert price is not None
    for field in dataclasses.fields(price):
        value = getattr(price, field.name)
        assert not isinstance(value, float)
    assert price.input == Decimal("0.80")


# ------------------------------------------------------------------------------------- the packaged table

# Anthropic's list prices, USD per million tokens: input, output, 5 m and 1 h cache writes, cache reads; and the
# price version each model id resolves to (README, "Prices"; the sources are in application.yaml's comment).
CURRENT = datetime.datetime(2026, 12, 3, tzinfo=UTC)
LIST_PRICES = {
    "claude-fable-5-1": (("10", "50", "12.50", "20", "0.25"), "claude-fable-5-1@2026-09-01"),
    "claude-mythos-5-1": (("10", "50", "12.50", "20", "0.25"), "claude-mythos-5-1@2026-09-01"),
    "claude-fable-5": (("10", "50", "12.50", "20", "1"), "claude-fable-5@2026-06-09"),
    "claude-mythos-5": (("10", "50", "12.50", "20", "1"), "claude-mythos-5@2026-06-09"),
    "claude-opus-5-5": (("4", "20", "5", "8", "0.20"), "claude-opus-5-5@2026-09-22"),
    "claude-opus-5": (("5", "25", "6.25", "10", "0.50"), "claude-opus-5@2026-07-24"),
    "claude-opus-4-8": (("5", "25", "6.25", "10", "0.50"), "claude-opus-4-8*@2026-05-28"),
    "claude-opus-4-7": (("5", "25", "6.25", "10", "0.50"), "claude-opus-4-7*@2026-04-16"),
    "claude-opus-4-6": (("5", "25", "6.25", "10", "0.50"), "claude-opus-4-6*@2026-02-05"),
    "claude-opus-4-1-20250805": (("15", "75", "18.75", "30", "1.50"), "claude-opus-4*@2025-05-22"),
    "claude-sonnet-5-5": (("2", "10", "2.50", "4", "0.10"), "claude-sonnet-5-5@2026-10-07"),
    "claude-sonnet-5": (("2", "10", "2.50", "4", "0.20"), "claude-sonnet-5@2026-06-30"),
    "claude-sonnet-4-6": (("3", "15", "3.75", "6", "0.30"), "claude-sonnet-4*@2025-05-22"),
    "claude-haiku-4-5": (("1", "5", "1.25", "2", "0.10"), "claude-haiku-4-5*@2025-10-15"),
}


@pytest.mark.parametrize("model", sorted(LIST_PRICES))
def test_each_model_id_resolves_to_its_own_row(model: str) -> None:
    (input, output, cw5, cw1, cache_read), label = LIST_PRICES[model]
    price = packaged_table().price(model, CURRENT)
    assert price is not None, model
    assert (price.input, price.output, price.cache_write_5m, price.cache_write_1h, price.cache_read) == tuple(
        Decimal(v) for v in (input, output, cw5, cw1, cache_read)
    )
    assert price.web_search == 10 and price.long_prompt is None
    assert price.version == label


@pytest.mark.parametrize(
    ("model", "row"),
    [
        ("claude-fable-5-1-20260901", "claude-fable-5-1-*"),
        ("claude-mythos-5-1-20260901", "claude-mythos-5-1-*"),
        ("claude-fable-5-20260609", "claude-fable-5-20*"),
        ("claude-mythos-5-20260609", "claude-mythos-5-20*"),
        ("claude-opus-5-5-20260922", "claude-opus-5-5-*"),
        ("claude-opus-5-20260724", "claude-opus-5-20*"),
        ("claude-opus-4-8-20260528", "claude-opus-4-8*"),
        ("claude-opus-4-7-20260416", "claude-opus-4-7*"),
        ("claude-sonnet-5-5-20260928", "claude-sonnet-5-5-*"),
        ("claude-sonnet-5-20260630", "claude-sonnet-5-20*"),
        ("claude-sonnet-4-6-20260217", "claude-sonnet-4*"),
    ],
)
def test_dated_snapshot_ids_resolve_to_their_model_row(model: str, row: str) -> None:
    price = packaged_table().price(model, CURRENT)
    assert price is not None and price.version.startswith(row + "@"), (model, price)
    undated = packaged_table().price(model[: model.rindex("-")], CURRENT)
    assert undated is not None and (price.input, price.output, price.cache_read) == (
        undated.input,
        undated.output,
        undated.cache_read,
    )


def test_a_minor_version_never_takes_its_elders_row() -> None:
    prices = packaged_table()
    sonnet_55, sonnet_5 = prices.price("claude-sonnet-5-5", CURRENT), prices.price("claude-sonnet-5", CURRENT)
    assert sonnet_55 is not None and sonnet_5 is not None
    assert (sonnet_55.version, sonnet_5.version) == ("claude-sonnet-5-5@2026-10-07", "claude-sonnet-5@2026-06-30")
    assert (sonnet_55.cache_read, sonnet_5.cache_read) == (Decimal("0.10"), Decimal("0.20"))
    # Opus 4.7 and 4.8 are not Opus 4's $15 / $75
    for model in ("claude-opus-4-7", "claude-opus-4-8"):
        price = prices.price(model, CURRENT)
        assert price is not None and price.input == 5, model
    # versions without a confirmed price, and future ones, are unpriced rather than borrowing a neighbour's price
    for model in (
        "claude-fable-5-2",
        "claude-fable-5-2-20261109",
        "claude-mythos-5-2",
        "claude-haiku-5-5",
        "claude-sonnet-5-7",
        "claude-opus-5-7",
        "claude-fable-5-10",
        "claude-opus-5-5x",
    ):
        assert prices.price(model, CURRENT) is None, model


def test_sonnet_5_5_cache_reads_cost_half_from_2026_10_07() -> None:
    # Anthropic's release notes, October 7, 2026: Sonnet 5.5 cache reads from $0.20 to $0.10 per million tokens
    prices = packaged_table()
    record = dataclasses.replace(
        record_from("message-prompt-caching.json", stream=False),  # input 21, output 393, 4096 read, 1500 + 551
        model="claude-sonnet-5-5",
    )
    before = prices.cost(dataclasses.replace(record, time="2026-10-06T23:59:59.999Z"))
    after = prices.cost(dataclasses.replace(record, time="2026-10-07T00:00:00.000Z"))
    assert before is not None and after is not None
    tokens = 21 * Decimal(2) + 393 * Decimal(10) + 1500 * Decimal("2.50") + 551 * Decimal(4)
    assert (before.usd, before.version) == ((tokens + 4096 * Decimal("0.20")) / M, "claude-sonnet-5-5@2026-09-28")
    assert (after.usd, after.version) == ((tokens + 4096 * Decimal("0.10")) / M, "claude-sonnet-5-5@2026-10-07")
    assert (format_usd(before.usd), format_usd(after.usd)) == ("0.0107452", "0.0103356")
    # before its first version the model has no price
    assert prices.cost(dataclasses.replace(record, time="2026-09-27T23:59:59.999Z")) is None


def test_fable_5_1_cache_reads_are_a_quarter_of_fable_5s() -> None:
    prices = packaged_table()
    record = dataclasses.replace(
        record_from("message-prompt-caching.json", stream=False, time="2026-12-03T00:00:00.000Z"),
        model="claude-fable-5-1",
    )
    cost = prices.cost(record)
    older = prices.cost(dataclasses.replace(record, model="claude-fable-5"))
    assert cost is not None and older is not None
    writes_and_tokens = 21 * Decimal(10) + 393 * Decimal(50) + 1500 * Decimal("12.50") + 551 * Decimal(20)
    assert cost.usd == (writes_and_tokens + 4096 * Decimal("0.25")) / M
    assert older.usd == (writes_and_tokens + 4096 * Decimal(1)) / M
    assert format_usd(cost.usd) == "0.050654"


def test_the_packaged_configuration_validates() -> None:
    settings = load_settings(profiles=["local"], env={}, config_dir="/nonexistent")
    patterns = [p for entry in settings.prices.models for p in entry.match]
    assert len(patterns) == len(set(patterns))
    assert {"claude-sonnet-5-5", "claude-opus-5-5", "claude-fable-5-1", "claude-mythos-5"} <= set(patterns)


# ------------------------------------------------------------------------------------------ versions


def test_a_price_change_applies_from_its_effective_date() -> None:
    prices = table(
        {
            "match": ["claude-sonnet-4*"],
            "versions": [
                version("2025-05-22", "3", "15", label="list-2025"),
                version("2026-07-01T00:00:00Z", "2", "10", label="contract-2026"),
            ],
        }
    )
    record = record_from("message-prompt-caching.json", stream=False)  # input 21, output 393 (other prices 0)
    before = prices.cost(dataclasses.replace(record, time="2026-06-30T23:59:59.999Z"))
    after = prices.cost(dataclasses.replace(record, time="2026-07-01T00:00:00.000Z"))
    assert before is not None and after is not None
    assert (before.version, before.usd) == ("list-2025", (21 * 3 + 393 * 15) / M)
    assert (after.version, after.usd) == ("contract-2026", (21 * 2 + 393 * 10) / M)
    # before the first version there is no price; an explicit `at` wins over the record's time
    assert prices.cost(dataclasses.replace(record, time="2025-05-21T23:59:59.000Z")) is None
    at = datetime.datetime(2026, 8, 1, tzinfo=UTC)
    assert prices.cost(dataclasses.replace(record, time="2025-01-01T00:00:00.000Z"), at=at) == after
    # build_event prices at the event's time
    event = build_event(
        dataclasses.replace(record, time="2026-07-01T00:00:00.000Z"), event_type="t", source="/s", prices=prices
    )
    assert event["data"]["price_version"] == "contract-2026"


def test_exact_id_wins_then_the_longest_prefix() -> None:
    prices = table(
        {"match": ["claude-*"], "versions": [version("2024-01-01", "1", "1")]},
        {"match": ["claude-sonnet-4*"], "versions": [version("2024-01-01", "2", "2")]},
        {"match": ["claude-sonnet-4-5*"], "versions": [version("2024-01-01", "3", "3")]},
        {"match": ["claude-sonnet-4-5"], "versions": [version("2024-01-01", "4", "4")]},
    )
    at = datetime.datetime(2025, 1, 1, tzinfo=UTC)

    def input_price(model: str) -> Decimal | None:
        price = prices.price(model, at)
        return None if price is None else price.input

    assert input_price("claude-sonnet-4-5") == 4
    assert input_price("claude-sonnet-4-5-20250929") == 3
    assert input_price("claude-sonnet-4-20250514") == 2
    assert input_price("claude-haiku-4-5") == 1
    assert input_price("gpt-4") is None
    assert prices.price("claude-sonnet-4-5", at).version == "claude-sonnet-4-5@2024-01-01"  # type: ignore[union-attr]


def test_estimate_prices_input_as_input_and_output_as_output() -> None:
    prices = packaged_table()
    assert (
        prices.estimate("claude-sonnet-4-5", input_tokens=1000, output_tokens=4096)
        == (1000 * Decimal(3) + 4096 * Decimal(15)) / M
    )
    assert prices.estimate("unknown-model", input_tokens=1, output_tokens=1) is None


# ------------------------------------------------------------------------------------- prompt length


def tiered(**long_prompt: str | int) -> PriceTable:
    """A fixture table (not the packaged one): one model priced by prompt length, 100,000 tokens the threshold."""
    tier: dict[str, str | int] = {
        "threshold-tokens": 100_000,
        "input": "0.50",
        "output": "2.50",
        "cache-write-5m": "0.625",
        "cache-write-1h": "1",
        "cache-read": "0.05",
    }
    base = version("2026-10-07", "0.10", "0.50", cw5="0.125", cw1="0.20", cr="0.01", ws="10", label="list")
    return table({"match": ["tiered-model"], "versions": [{**base, "long-prompt": {**tier, **long_prompt}}]})


def prompt_of(input_tokens: int, *, cache_read: int = 30_000, five: int = 6_000, hour: int = 4_000) -> UsageRecord:
    """A call whose prompt is input + 30,000 cache reads + 6,000 + 4,000 cache writes, with 2,000 output tokens."""
    return dataclasses.replace(
        record_from("message-basic.json", stream=False, time="2026-11-01T00:00:00.000Z"),
        model="tiered-model",
        input_tokens=input_tokens,
        output_tokens=2_000,
        cache_read_tokens=cache_read,
        cache_creation_tokens=five + hour,
        cache_creation_5m_tokens=five,
        cache_creation_1h_tokens=hour,
        web_search_requests=None,
    )


def test_a_prompt_at_or_below_the_threshold_pays_the_version_prices() -> None:
    prices = tiered()
    at = prices.cost(prompt_of(60_000))  # prompt 60,000 + 30,000 + 6,000 + 4,000 = 100,000: not over
    below = prices.cost(prompt_of(59_999))
    assert at is not None and below is not None
    assert (
        at.usd
        == (
            60_000 * Decimal("0.10")
            + 2_000 * Decimal("0.50")
            + 6_000 * Decimal("0.125")
            + 4_000 * Decimal("0.20")
            + 30_000 * Decimal("0.01")
        )
        / M
    )
    assert (at.usd, at.version) == (Decimal("0.00885"), "list")
    assert (below.usd, below.version) == (Decimal("0.0088499"), "list")


def test_a_prompt_over_the_threshold_pays_the_long_prompt_prices_on_every_token() -> None:
    cost = tiered().cost(prompt_of(60_001))  # prompt 100,001: input, cache reads and writes, and output too
    assert cost is not None
    assert (
        cost.usd
        == (
            60_001 * Decimal("0.50")
            + 2_000 * Decimal("2.50")
            + 6_000 * Decimal("0.625")
            + 4_000 * Decimal(1)
            + 30_000 * Decimal("0.05")
        )
        / M
    )
    assert (cost.usd, cost.version) == (Decimal("0.0442505"), "list+long-prompt")
    assert format_usd(cost.usd) == "0.0442505"


def test_the_prompt_counts_cache_reads_and_writes_but_not_output() -> None:
    prices = tiered()

    def version_of(record: UsageRecord) -> str:
        cost = prices.cost(record)
        assert cost is not None
        return cost.version

    # the same 100,001 prompt tokens, however they split, cross the threshold
    assert version_of(prompt_of(1, cache_read=100_000, five=0, hour=0)) == "list+long-prompt"
    assert version_of(prompt_of(1, cache_read=0, five=100_000, hour=0)) == "list+long-prompt"
    assert version_of(prompt_of(1, cache_read=0, five=0, hour=100_000)) == "list+long-prompt"
    # cache writes reported without a TTL split count too (and are priced at 5 minutes)
    unsplit = dataclasses.replace(prompt_of(70_000, five=0, hour=0), cache_creation_tokens=1)
    assert version_of(unsplit) == "list+long-prompt"
    # output tokens are not prompt
    assert version_of(dataclasses.replace(prompt_of(100_000, cache_read=0, five=0, hour=0), output_tokens=99_999)) == (
        "list"
    )


def test_web_search_keeps_the_version_price_over_the_threshold() -> None:
    record = dataclasses.replace(prompt_of(100_001, cache_read=0, five=0, hour=0), output_tokens=0)
    cost = tiered().cost(dataclasses.replace(record, web_search_requests=3))
    assert cost is not None
    assert cost.usd == 100_001 * Decimal("0.50") / M + 3 * Decimal(10) / 1000


def test_the_estimate_takes_the_long_prompt_prices_when_the_input_alone_is_over() -> None:
    prices = tiered()
    assert (
        prices.estimate("tiered-model", input_tokens=100_000, output_tokens=1_000)
        == (100_000 * Decimal("0.10") + 1_000 * Decimal("0.50")) / M
    )
    assert (
        prices.estimate("tiered-model", input_tokens=100_001, output_tokens=1_000)
        == (100_001 * Decimal("0.50") + 1_000 * Decimal("2.50")) / M
    )


def test_a_version_without_long_prompt_prices_any_prompt_alike() -> None:
    prices = table({"match": ["m"], "versions": [version("2024-01-01", "1", "2", label="flat")]})
    record = dataclasses.replace(prompt_of(5_000_000), model="m")
    cost = prices.cost(record)
    assert cost is not None and cost.version == "flat"
    assert cost.usd == (5_000_000 * Decimal(1) + 2_000 * Decimal(2)) / M


def test_the_printed_configuration_keeps_long_prompt_prices_as_text() -> None:
    settings = load_settings(
        profiles=["local"],
        env={},
        config_dir="/nonexistent",
        overrides={
            "prices": {
                "models": [
                    {
                        "match": ["m"],
                        "versions": [
                            {
                                **version("2024-01-01", "1", "2"),
                                "long-prompt": {
                                    "threshold-tokens": 10,
                                    "input": "0.5",
                                    "output": "2.5",
                                    "cache-write-5m": "0.625",
                                    "cache-write-1h": "1",
                                    "cache-read": "0.05",
                                },
                            }
                        ],
                    }
                ]
            }
        },
    )
    (entry,) = settings.masked()["prices"]["models"]
    assert entry["versions"][0]["long-prompt"] == {
        "threshold-tokens": 10,
        "input": "0.5",
        "output": "2.5",
        "cache-write-5m": "0.625",
        "cache-write-1h": "1",
        "cache-read": "0.05",
    }


@pytest.mark.parametrize(
    ("entry", "complaint"),
    [
        ({"match": ["*"], "versions": [version("2024-01-01", "1", "1")]}, "prefix"),
        ({"match": ["claude-*-x"], "versions": [version("2024-01-01", "1", "1")]}, "prefix"),
        ({"match": ["m"], "versions": [version("2024-01-01", "-1", "1")]}, "non-negative"),
        ({"match": ["m"], "versions": [version("2024-01-01", "abc", "1")]}, "not an amount"),
        ({"match": ["m"], "versions": [version("yesterday", "1", "1")]}, "not a date"),
        ({"match": ["m"], "versions": [version("2024-01-01", "1", "1"), version("2024-01-01", "2", "2")]}, "same"),
        ({"match": ["m"], "versions": [{"effective-from": "2024-01-01", "input": "1"}]}, "output"),
        (
            {"match": ["m"], "versions": [{**version("2024-01-01", "1", "1"), "long-prompt": {"threshold-tokens": 0}}]},
            "threshold-tokens",
        ),
        (
            {
                "match": ["m"],
                "versions": [
                    {
                        **version("2024-01-01", "1", "1"),
                        "long-prompt": {
                            "threshold-tokens": 100,
                            "input": "1",
                            "output": "1",
                            "cache-write-5m": "1",
                            "cache-write-1h": "1",
                        },
                    }
                ],
            },
            "cache-read",
        ),
    ],
)
def test_bad_price_configuration_is_refused_with_the_key(entry: dict[str, Any], complaint: str) -> None:
    with pytest.raises(ConfigError, match=r"prices\.models") as caught:
        table(entry)
    assert complaint in str(caught.value)


def test_yaml_floats_are_read_by_their_text() -> None:
    prices = table({"match": ["m"], "versions": [{**version("2024-01-01", "0", "0"), "cache-read": 0.3}]})
    price = prices.price("m")
    assert price is not None and price.cache_read == Decimal("0.3")


# ------------------------------------------------------------------------------------------ end to end


def test_usage_events_from_gate_carry_cost_and_price_version(
    tmp_path: Path, fake: FakeAnthropic, start_gate: Any
) -> None:
    gate: RunningGate = start_gate()
    fake.enqueue(Reply(fixture="message-prompt-caching.json"), Reply(fixture="stream-web-search-usage.sse"))
    client = anthropic.Anthropic(base_url=gate.url, api_key=gate.token(), max_retries=0)
    client.messages.create(model="claude-haiku-4-5", max_tokens=64, messages=[{"role": "user", "content": "hi"}])
    with client.messages.stream(
        model="claude-opus-4-1", max_tokens=64, messages=[{"role": "user", "content": "hi"}]
    ) as stream:
        stream.until_done()
    path = Path(gate.settings.usage.file.path)
    events = read_events(path, 2)
    assert [e["data"]["cost"] for e in events] == ["0.0161178", "0.20848"]
    assert [e["data"]["price_version"] for e in events] == ["claude-sonnet-4*@2025-05-22", "claude-opus-4*@2025-05-22"]
