"""An event loop whose clock jumps ahead whenever it would otherwise wait for a timer, so tests of pacing and
idle periods take no real time."""

from __future__ import annotations

import asyncio
import selectors
from typing import Any


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """An event loop whose clock jumps ahead whenever it would otherwise wait for a timer."""

    def __init__(self) -> None:
        super().__init__(selectors.DefaultSelector())
        self.now = 0.0
        real = self._selector  # type: ignore[attr-defined]
        loop = self

        class Skipping(selectors.BaseSelector):
            def select(self, timeout: float | None = None) -> Any:
                ready = real.select(0)
                if not ready and timeout:
                    loop.now += timeout
                return ready

            def register(self, *args: Any, **kwargs: Any) -> Any:
                return real.register(*args, **kwargs)

            def unregister(self, *args: Any, **kwargs: Any) -> Any:
                return real.unregister(*args, **kwargs)

            def modify(self, *args: Any, **kwargs: Any) -> Any:
                return real.modify(*args, **kwargs)

            def get_map(self) -> Any:
                return real.get_map()

            def close(self) -> None:
                real.close()

        self._selector = Skipping()  # type: ignore[attr-defined]

    def time(self) -> float:
        return self.now


def run_in_virtual_time(coroutine: Any) -> Any:
    loop = VirtualTimeLoop()
    try:
        return loop.run_until_complete(coroutine)
    finally:
        loop.close()
