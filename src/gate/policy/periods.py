"""Spend periods (day, ISO week, month) in a configured time zone, and minute windows for rate limits.

A window is named by a label (``2026-12-03``, ``2026-W49``, ``2026-12``) and ends at an epoch second; both are
cached until the window ends, so the request path does no calendar arithmetic.
"""

from __future__ import annotations

from datetime import date, datetime, timedelta
from typing import Literal
from zoneinfo import ZoneInfo

__all__ = ["PERIODS", "Period", "Window", "Windows"]

Period = Literal["daily", "weekly", "monthly"]
PERIODS: tuple[Period, ...] = ("daily", "weekly", "monthly")


class Window:
    """One window: its label, its start and end (epoch seconds)."""

    __slots__ = ("end", "label", "start")

    def __init__(self, label: str, start: float, end: float) -> None:
        self.label = label
        self.start = start
        self.end = end


class Windows:
    """The current window of each period in ``zone``; ``window`` is cheap while the window lasts."""

    def __init__(self, zone: str) -> None:
        self._zone = ZoneInfo(zone)
        self._current: dict[str, Window] = {}

    def window(self, period: Period, now: float) -> Window:
        known = self._current.get(period)
        if known is not None and known.start <= now < known.end:
            return known
        window = self.compute(period, now)
        self._current[period] = window
        return window

    def compute(self, period: Period, now: float) -> Window:
        today = datetime.fromtimestamp(now, self._zone).date()
        if period == "daily":
            start, end, label = today, today + timedelta(days=1), today.isoformat()
        elif period == "weekly":
            start = today - timedelta(days=today.weekday())
            end = start + timedelta(days=7)
            year, week, _ = today.isocalendar()
            label = f"{year}-W{week:02d}"
        else:
            start = today.replace(day=1)
            end = (start + timedelta(days=32)).replace(day=1)
            label = f"{today.year}-{today.month:02d}"
        return Window(label, self._midnight(start), self._midnight(end))

    def _midnight(self, day: date) -> float:
        return datetime(day.year, day.month, day.day, tzinfo=self._zone).timestamp()


def minute(now: float) -> Window:
    """The minute window of rate limits (fixed windows, UTC minutes)."""
    index = int(now // 60)
    return Window(str(index), index * 60.0, index * 60.0 + 60.0)
