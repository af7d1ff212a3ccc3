"""What the sidecar needs from an inference runtime, whichever it is."""

from __future__ import annotations

from typing import Protocol

from loraplex.sidecar.demand import LoraRequests


class RuntimeUnavailable(Exception):
    """The runtime did not answer; loads wait for it rather than fail."""


class LoadFailed(Exception):
    """The runtime answered and refused the adapter; the message is the runtime's own words."""


class RuntimeClient(Protocol):
    async def healthy(self) -> bool:
        """True when the runtime serves requests."""
        ...

    async def served_adapters(self) -> dict[str, str | None]:
        """Adapter names the runtime lists in /v1/models right now -> the path each was loaded from, when the
        runtime says."""
        ...

    async def load(self, name: str, path: str) -> None:
        """Make the runtime serve the adapter at `path` (the runtime's view) under `name`, in place of whatever it
        served under that name before."""
        ...

    async def unload(self, name: str) -> None:
        """Stop serving `name`; called before its files are deleted."""
        ...

    async def retired(self, name: str) -> None:
        """Return once the runtime no longer lists `name`; called after its files are deleted."""
        ...

    async def lora_requests(self) -> LoraRequests | None:
        """Which adapters have requests running and waiting now; None when the runtime does not say."""
        ...

    async def close(self) -> None:
        ...
