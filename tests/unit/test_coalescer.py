"""The Coalescer folds concurrent requests for one key into shared runs, at most one per interval."""

from __future__ import annotations

import asyncio

import pytest

from loraplex.operator.coalescer import Coalescer


async def test_requests_during_a_run_share_the_next_run():
    runs: list[str] = []
    gate = asyncio.Event()

    async def work(key: str) -> None:
        runs.append(key)
        await gate.wait()

    coalescer = Coalescer(work)
    first = asyncio.create_task(coalescer.run("a"))
    await asyncio.sleep(0)
    waiting = [asyncio.create_task(coalescer.run("a")) for _ in range(5)]
    other = asyncio.create_task(coalescer.run("b"))
    await asyncio.sleep(0)
    gate.set()
    await asyncio.gather(first, *waiting, other)
    assert sorted(runs) == ["a", "a", "b"]  # the five late requests shared one run after the first


async def test_min_interval_runs_the_first_at_once_and_folds_a_burst():
    starts: list[float] = []
    loop = asyncio.get_running_loop()

    async def work(_: str) -> None:
        starts.append(loop.time())

    coalescer = Coalescer(work, min_interval=0.2)
    begin = loop.time()
    await coalescer.run("a")
    assert starts[0] - begin < 0.05  # after a quiet spell: no delay
    burst = [asyncio.create_task(coalescer.run("a")) for _ in range(20)]
    await asyncio.gather(*burst)
    assert len(starts) == 2 and starts[1] - starts[0] >= 0.19
    await coalescer.run("b")  # keys are independent
    assert len(starts) == 3 and starts[2] - starts[1] < 0.05


async def test_a_failed_run_fails_its_callers_and_the_next_run_still_happens():
    calls = 0

    async def work(_: str) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("boom")

    coalescer = Coalescer(work)
    with pytest.raises(RuntimeError, match="boom"):
        await coalescer.run("a")
    await coalescer.run("a")
    assert calls == 2
