"""Folding a burst of requests for one key into a few runs, so many adapter events for one base model
cost a few adapter-set and status writes rather than one each."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Any


class Coalescer:
    """Runs `fn(key)` so that concurrent requests for one key share a run that starts after them.

    With `min_interval`, runs for one key start at least that many seconds apart: the first request after
    a quiet spell runs at once, and a burst is folded into one run per interval instead of one per event.
    """

    def __init__(self, fn: Callable[[Any], Awaitable[None]], min_interval: float = 0.0):
        self._fn = fn
        self._min_interval = min_interval
        self._pending: dict[Hashable, asyncio.Future[None]] = {}
        self._running: set[Hashable] = set()
        self._last_start: dict[Hashable, float] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def run(self, key: Hashable) -> None:
        future = self._pending.get(key)
        if future is None:
            future = asyncio.get_running_loop().create_future()
            self._pending[key] = future
            if key not in self._running:
                task = asyncio.create_task(self._drain(key))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        await asyncio.shield(future)

    async def _drain(self, key: Hashable) -> None:
        self._running.add(key)
        try:
            while key in self._pending:
                loop = asyncio.get_running_loop()
                wait = self._last_start.get(key, -self._min_interval) + self._min_interval - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)  # requests arriving meanwhile join this run
                self._last_start[key] = loop.time()
                future = self._pending.pop(key)
                try:
                    await self._fn(key)
                except Exception as exc:
                    future.set_exception(exc)
                else:
                    future.set_result(None)
        finally:
            self._running.discard(key)
