"""The price table: what a usage record cost in USD, from the ``prices`` section of the configuration.

Prices are per model pattern (an exact model id, or a prefix ending in ``*``; an exact id wins, then the longest
prefix) and come in versions with an effective date: the version in force at the call's time applies. Token prices
are USD per million tokens, web search USD per 1,000 requests (Anthropic's conventions). A version may price by
prompt length: over its ``long_prompt`` threshold (prompt = input + cache reads + cache writes) every token of the
request takes the long-prompt prices, and the price version says so. Arithmetic is ``Decimal`` only, never floats,
and nothing is rounded: the cost is exact.
"""

from __future__ import annotations

import bisect
import datetime
from dataclasses import dataclass
from decimal import Decimal

from gate.accounting.usage import UsageRecord
from gate.settings import GateSettings, PricesSettings

__all__ = ["LONG_PROMPT_SUFFIX", "Cost", "LongPrompt", "ModelPrice", "PriceTable", "format_usd"]

_PER_MILLION = Decimal(1_000_000)
_PER_THOUSAND = Decimal(1_000)
LONG_PROMPT_SUFFIX = "+long-prompt"  # added to the price version of a call its long-prompt prices priced


@dataclass(frozen=True, slots=True)
class Cost:
    """What one call cost and which price version said so."""

    usd: Decimal
    version: str


@dataclass(frozen=True, slots=True)
class LongPrompt:
    """Token prices (USD per million) for a request whose prompt is over ``threshold_tokens``: every token of it."""

    threshold_tokens: int
    input: Decimal
    output: Decimal
    cache_write_5m: Decimal
    cache_write_1h: Decimal
    cache_read: Decimal


@dataclass(frozen=True, slots=True)
class ModelPrice:
    """One version of a model's prices: tokens in USD per million, web search in USD per 1,000 requests."""

    version: str
    effective_from: datetime.datetime
    input: Decimal
    output: Decimal
    cache_write_5m: Decimal
    cache_write_1h: Decimal
    cache_read: Decimal
    web_search: Decimal
    long_prompt: LongPrompt | None = None

    def cost(self, record: UsageRecord) -> Decimal:
        return self.charge(record).usd

    def charge(self, record: UsageRecord) -> Cost:
        """The exact cost of a record and the version that priced it (``+long-prompt`` when those prices did)."""
        # Anthropic reports the split of cache writes by TTL when the request asked for one; the total can be
        # larger than the split (older answers carry only the total): the rest was written with the default 5 m.
        five = record.cache_creation_5m_tokens or 0
        hour = record.cache_creation_1h_tokens or 0
        five += max(record.cache_creation_tokens - five - hour, 0)
        rates = self.rates_for(record.input_tokens + record.cache_read_tokens + five + hour)
        version = self.version if rates is self else self.version + LONG_PROMPT_SUFFIX
        tokens = (
            record.input_tokens * rates.input
            + record.output_tokens * rates.output
            + five * rates.cache_write_5m
            + hour * rates.cache_write_1h
            + record.cache_read_tokens * rates.cache_read
        )
        searches = (record.web_search_requests or 0) * self.web_search
        return Cost(usd=tokens / _PER_MILLION + searches / _PER_THOUSAND, version=version)

    def rates_for(self, prompt_tokens: int) -> ModelPrice | LongPrompt:
        """The token prices of a request whose prompt is ``prompt_tokens`` long."""
        if self.long_prompt is not None and prompt_tokens > self.long_prompt.threshold_tokens:
            return self.long_prompt
        return self


class _Versions:
    """A pattern's versions, sorted by effective date, and the one in force at a time."""

    __slots__ = ("_prices", "_starts")

    def __init__(self, prices: list[ModelPrice]) -> None:
        self._prices = sorted(prices, key=lambda p: p.effective_from)
        self._starts = [p.effective_from for p in self._prices]

    def at(self, when: datetime.datetime) -> ModelPrice | None:
        index = bisect.bisect_right(self._starts, when) - 1
        return self._prices[index] if index >= 0 else None


class PriceTable:
    """Prices by model and date; ``cost`` for a record, ``estimate`` for a reservation before the call."""

    def __init__(self, exact: dict[str, list[ModelPrice]], prefixes: dict[str, list[ModelPrice]]) -> None:
        self._exact = {model: _Versions(prices) for model, prices in exact.items()}
        # Longest first: the first prefix that matches is the most specific one.
        self._prefixes = sorted(
            ((prefix, _Versions(prices)) for prefix, prices in prefixes.items()), key=lambda item: -len(item[0])
        )
        self._resolved: dict[str, _Versions | None] = {}

    @classmethod
    def from_settings(cls, settings: PricesSettings | GateSettings) -> PriceTable:
        """From the ``prices`` section (or the whole settings, whose ``prices`` section is used)."""
        section = settings.prices if isinstance(settings, GateSettings) else settings
        exact: dict[str, list[ModelPrice]] = {}
        prefixes: dict[str, list[ModelPrice]] = {}
        for entry in section.models:
            for pattern in entry.match:
                target = prefixes if pattern.endswith("*") else exact
                key = pattern.removesuffix("*")
                for version in entry.versions:
                    start = version.effective_from
                    label = version.version or f"{pattern}@{start.date().isoformat() if _midnight(start) else start}"
                    tier = version.long_prompt
                    target.setdefault(key, []).append(
                        ModelPrice(
                            version=label,
                            effective_from=start,
                            input=version.input,
                            output=version.output,
                            cache_write_5m=version.cache_write_5m,
                            cache_write_1h=version.cache_write_1h,
                            cache_read=version.cache_read,
                            web_search=version.web_search,
                            long_prompt=None
                            if tier is None
                            else LongPrompt(
                                threshold_tokens=tier.threshold_tokens,
                                input=tier.input,
                                output=tier.output,
                                cache_write_5m=tier.cache_write_5m,
                                cache_write_1h=tier.cache_write_1h,
                                cache_read=tier.cache_read,
                            ),
                        )
                    )
        return cls(exact, prefixes)

    def price(self, model: str | None, at: datetime.datetime | None = None) -> ModelPrice | None:
        """The version in force for ``model`` at ``at`` (now when None); None when the model has no price."""
        if not model:
            return None
        versions = self._resolved.get(model, _UNRESOLVED)
        if versions is _UNRESOLVED:
            versions = self._resolve(model)
            if len(self._resolved) < 10_000:  # model names come from upstream answers: keep the memo bounded
                self._resolved[model] = versions
        if versions is None:
            return None
        return versions.at(_aware(at) if at is not None else datetime.datetime.now(datetime.UTC))

    def cost(self, record: UsageRecord, at: datetime.datetime | None = None) -> Cost | None:
        """The exact cost of a record, priced at ``at``, else at the record's time, else now."""
        if at is None and record.time:
            at = _parse_time(record.time)
        price = self.price(record.model, at)
        if price is None:
            return None
        return price.charge(record)

    def estimate(
        self, model: str, *, input_tokens: int, output_tokens: int, at: datetime.datetime | None = None
    ) -> Decimal | None:
        """A worst-case figure for a reservation: input tokens at the input price, output at the output price (the
        long-prompt prices when ``input_tokens`` alone is over the version's threshold)."""
        price = self.price(model, at)
        if price is None:
            return None
        rates = price.rates_for(input_tokens)
        return (input_tokens * rates.input + output_tokens * rates.output) / _PER_MILLION

    def _resolve(self, model: str) -> _Versions | None:
        exact = self._exact.get(model)
        if exact is not None:
            return exact
        for prefix, versions in self._prefixes:
            if model.startswith(prefix):
                return versions
        return None


_UNRESOLVED = _Versions([])


def format_usd(amount: Decimal) -> str:
    """The exact amount as a plain decimal string without exponent or trailing zeros: ``0.000615``, ``0``."""
    text = format(amount.normalize(), "f")
    return "0" if text in ("-0", "0") else text


def _aware(when: datetime.datetime) -> datetime.datetime:
    return when if when.tzinfo is not None else when.replace(tzinfo=datetime.UTC)


def _midnight(when: datetime.datetime) -> bool:
    return when.timetz() == datetime.time(0, tzinfo=when.tzinfo) and when.utcoffset() == datetime.timedelta(0)


def _parse_time(stamp: str) -> datetime.datetime | None:
    try:
        return _aware(datetime.datetime.fromisoformat(stamp))
    except ValueError:
        return None
