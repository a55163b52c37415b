"""Shared fixtures: a fake Anthropic on its own loop, and Gates started against it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fake_anthropic import FakeAnthropic
from tests.harness import BackgroundLoop, RunningGate, gate_settings


@pytest.fixture(scope="session")
def fake_loop() -> Iterator[BackgroundLoop]:
    bg = BackgroundLoop()
    yield bg
    bg.close()


@pytest.fixture(scope="session")
def fake_session(fake_loop: BackgroundLoop) -> Iterator[FakeAnthropic]:
    fake = FakeAnthropic()
    fake_loop.run(fake.__aenter__())
    yield fake
    fake_loop.run(fake.__aexit__(None, None, None))


@pytest.fixture
def fake(fake_session: FakeAnthropic) -> FakeAnthropic:
    fake_session.reset()
    return fake_session


@pytest.fixture
def start_gate(tmp_path: Path, fake_session: FakeAnthropic) -> Iterator[Callable[..., RunningGate]]:
    """``start_gate(**sections)`` runs a Gate against the fake; stopped at the end of the test."""
    started: list[RunningGate] = []

    def start(
        upstream_url: str | None = None, profiles: tuple[str, ...] = ("local",), **sections: Any
    ) -> RunningGate:
        settings = gate_settings(
            tmp_path / f"gate{len(started)}", upstream_url or fake_session.url, profiles=profiles, **sections
        )
        running = RunningGate(settings).start()
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop()


@pytest.fixture(scope="module")
def module_gate(
    tmp_path_factory: pytest.TempPathFactory, fake_session: FakeAnthropic
) -> Iterator[RunningGate]:
    settings = gate_settings(tmp_path_factory.mktemp("gate"), fake_session.url)
    running = RunningGate(settings).start()
    yield running
    running.stop()
