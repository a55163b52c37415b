"""Session-affine key selection: rendezvous hashing over organisations (unit), and a replayed 20-turn Claude Code
session against a fake upstream whose prompt cache lives per organisation (end to end)."""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from gate.settings import ApiKey, KeyHealthSettings
from gate.upstreams.keys import KeyPool, NoKeyAvailable
from tests.fake_anthropic import FakeAnthropic, PromptCache, error_reply
from tests.harness import RunningGate

KEYS = {
    "a": "sk-ant-test-key-a-000000000000000000",
    "b": "sk-ant-test-key-b-000000000000000000",
    "c": "sk-ant-test-key-c-000000000000000000",
}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def pool(organizations: dict[str, str | None], clock: Clock | None = None, **kwargs: Any) -> KeyPool:
    keys = [ApiKey(alias=alias, value=f"v-{alias}", organization=org) for alias, org in organizations.items()]
    return KeyPool(keys, KeyHealthSettings(), clock=clock or Clock(), selection="session-affinity", **kwargs)


def test_a_session_keeps_its_organisation_and_sessions_spread() -> None:
    keys = pool({"a": "org-a", "b": "org-b", "c": "org-c"})
    homes = {f"session-{i}": keys.acquire(affinity=f"session-{i}").alias for i in range(300)}
    for session, alias in list(homes.items())[:50]:
        assert {keys.acquire(affinity=session).alias for _ in range(5)} == {alias}
    spread = Counter(homes.values())
    assert set(spread) == {"a", "b", "c"} and min(spread.values()) > 60  # roughly a third each


def test_keys_of_one_organisation_take_turns_and_one_organisation_means_round_robin() -> None:
    keys = pool({"a1": "org-a", "a2": "org-a", "b": "org-b"})
    session = next(f"s{i}" for i in range(100) if keys.acquire(affinity=f"s{i}").alias.startswith("a"))
    assert {keys.acquire(affinity=session).alias for _ in range(4)} == {"a1", "a2"}
    single = pool({"x": "org", "y": "org"})
    assert [single.acquire(affinity="s").alias for _ in range(4)] == ["x", "y", "x", "y"]


def test_only_the_sessions_of_a_resting_organisation_move_and_they_come_back() -> None:
    clock = Clock()
    keys = pool({"a": "org-a", "b": "org-b", "c": "org-c"}, clock)
    homes = {f"s{i}": keys.acquire(affinity=f"s{i}").alias for i in range(200)}
    keys.report_rate_limited("a", 30)
    moved = {s: keys.acquire(affinity=s).alias for s in homes}
    assert all(moved[s] == home for s, home in homes.items() if home != "a")  # nobody else moves
    assert all(moved[s] != "a" for s, home in homes.items() if home == "a")
    clock.now += 31
    assert {s: keys.acquire(affinity=s).alias for s in homes} == homes  # back home after the cooldown
    keys.report_rejected("b", 401)
    keys.report_rejected("c", 401)
    with pytest.raises(NoKeyAvailable):
        keys.acquire(exclude=frozenset({"a"}), affinity="s0")
    # Without an affinity keys take turns as before.
    fresh = pool({"a": "org-a", "b": "org-b", "c": "org-c"})
    assert sorted(fresh.acquire().alias for _ in range(3)) == ["a", "b", "c"]


def session_turns(
    gate: RunningGate, token: str, turns: int, on_turn: Callable[[int], None] | None = None
) -> list[dict[str, int]]:
    """Replay a Claude Code session: each turn resends the whole conversation plus one new user message."""
    system = "You are Claude Code, Anthropic's official CLI for Claude. " * 40
    messages: list[dict[str, Any]] = []
    usages = []
    for turn in range(turns):
        if on_turn is not None:
            on_turn(turn)
        messages.append({"role": "user", "content": f"Turn {turn}: please refactor module {turn} " + "ctx " * 200})
        body = {"model": "claude-sonnet-4-5", "max_tokens": 1024, "system": system, "messages": messages}
        response = httpx.post(
            gate.url + "/v1/messages",
            json=body,
            headers={"authorization": f"Bearer {token}", "x-claude-code-session-id": "3f1c9a7e-session"},
            timeout=30,
        )
        assert response.status_code == 200, response.text
        answer = response.json()
        usages.append(answer["usage"])
        messages.append({"role": "assistant", "content": answer["content"]})
    return usages


def cache_read_share(usages: list[dict[str, int]]) -> float:
    read = sum(u["cache_read_input_tokens"] for u in usages)
    total = sum(u["input_tokens"] + u["cache_read_input_tokens"] + u["cache_creation_input_tokens"] for u in usages)
    return read / total


@pytest.mark.parametrize("selection", ["round-robin", "session-affinity", "session-affinity-429-at-turn-10"])
def test_a_20_turn_session_reads_the_prompt_cache_with_each_key_selection(
    selection: str, start_gate: Callable[..., RunningGate], fake: FakeAnthropic
) -> None:
    cache = PromptCache({value: f"org-{alias}" for alias, value in KEYS.items()})
    fake.responder = cache
    keys = [{"alias": alias, "value": value, "organization": f"org-{alias}"} for alias, value in KEYS.items()]
    mode = "round-robin" if selection == "round-robin" else "session-affinity"
    gate = start_gate(anthropic={"api": {"keys": keys, "key-selection": mode}})

    def trouble(turn: int) -> None:
        if selection.endswith("429-at-turn-10") and turn == 10:
            fake.enqueue(error_reply(429, "rate_limit_error", "slow down", {"retry-after": "3600"}))

    usages = session_turns(gate, gate.token("alice"), 20, trouble)
    aliases = [next(a for a, v in KEYS.items() if v == r.headers["x-api-key"]) for r in fake.received]
    hits = [u["cache_read_input_tokens"] > 0 for u in usages]
    share = cache_read_share(usages)
    # Prompt cost at Sonnet 4.5's list prices: $3 input, $3.75 cache write (5 m), $0.30 cache read per million.
    prompt_cost = sum(
        u["input_tokens"] * 3 + u["cache_creation_input_tokens"] * 3.75 + u["cache_read_input_tokens"] * 0.30
        for u in usages
    )
    print(
        f"\n{selection}: cache-read share {share:.1%} of input tokens over 20 turns; turns with a cache hit "
        f"{sum(hits)}/20; prompt cost ${prompt_cost / 1e6:.4f}; keys used {''.join(aliases)}"
    )
    if selection == "session-affinity":
        assert len(set(aliases)) == 1  # one organisation all along
        assert hits == [False] + [True] * 19  # every turn after the first reads the cache
        for previous, usage in itertools.pairwise(usages):
            # and reads all of the previous turn's prompt: only what the turn added is written
            seen = previous["cache_read_input_tokens"] + previous["cache_creation_input_tokens"]
            assert usage["cache_read_input_tokens"] == seen
    elif selection == "round-robin":
        assert len(set(aliases)) == 3
        assert sum(hits) < 19
    else:
        assert hits[11:] == [True] * 9  # after the move, the session stays on its new organisation
        assert not hits[10]  # the turn that moved wrote the whole prompt again
