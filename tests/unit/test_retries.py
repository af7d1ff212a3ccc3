"""The operator's retry of a failed reconcile runs the newest failed one, and nothing once a later one succeeded."""

from __future__ import annotations

import asyncio

import kopf

from loraplex.operator import handlers


class Metrics:
    async def timed(self, kind: str, fn):  # type: ignore[no-untyped-def]
        await fn()


def memo() -> kopf.Memo:
    return kopf.Memo(metrics=Metrics(), retries={}, pending={})


async def test_a_retry_replays_the_newest_failed_event_not_the_first(monkeypatch):
    monkeypatch.setattr(handlers, "_RETRY_DELAYS", (0.05,))
    state, ran = memo(), []

    def attempt(body: str, fail: bool):  # type: ignore[no-untyped-def]
        async def run() -> None:
            ran.append(body)
            if fail and ran.count(body) == 1:
                raise ConnectionError("apiserver went away")
        return run

    await handlers._guarded(state, ("adapter", ("ns", "a")), attempt("generation 1", fail=True))
    await handlers._guarded(state, ("adapter", ("ns", "a")), attempt("generation 2", fail=True))
    await asyncio.sleep(0.3)
    assert ran == ["generation 1", "generation 2", "generation 2"]
    assert state.pending == {} and state.retries == {}


async def test_a_later_success_cancels_the_pending_retry(monkeypatch):
    monkeypatch.setattr(handlers, "_RETRY_DELAYS", (0.05,))
    state, ran = memo(), []

    async def stale() -> None:
        ran.append("generation 1")
        raise TimeoutError()

    async def fresh() -> None:
        ran.append("generation 2")

    await handlers._guarded(state, ("adapter", ("ns", "a")), stale)
    await handlers._guarded(state, ("adapter", ("ns", "a")), fresh)
    await asyncio.sleep(0.3)
    assert ran == ["generation 1", "generation 2"]  # generation 1 is never replayed over generation 2
