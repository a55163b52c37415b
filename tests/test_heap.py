"""The collector settings ``gate serve`` applies once started (``gate.ops.heap``)."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from gate.ops import heap
from gate.settings import GateSettings


@pytest.fixture
def restore_gc() -> Iterator[None]:
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


def test_settle_freezes_what_startup_left_and_makes_young_collections_rarer(restore_gc: None) -> None:
    survivor = {"built": "at startup"}
    heap.settle()
    assert gc.get_freeze_count() > 0  # startup's objects (this dict among them) are out of every later scan
    assert not gc.is_finalized(survivor)
    assert gc.get_threshold() == heap.THRESHOLDS
    heap.settle()  # twice is harmless
    assert gc.get_threshold() == heap.THRESHOLDS


def test_gate_serve_settles_the_heap_once_its_ports_are_bound(
    restore_gc: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The process entry point does it, through serve()'s ready callback; serve() itself does not (tests run
    it inside their own process)."""
    import gate.app

    calls: list[str] = []

    def run_loop(main: object) -> None:
        ready = main.cr_frame.f_locals["ready"]  # type: ignore[attr-defined] # serve()'s argument, not yet run
        main.close()  # type: ignore[attr-defined]
        calls.append("serve")
        ready(8080)

    monkeypatch.setattr(gate.app, "_run_loop", run_loop)
    monkeypatch.setattr(heap, "settle", lambda: calls.append("settle"))
    assert gate.app.run(GateSettings.model_validate({})) == 0
    assert calls == ["serve", "settle"]
