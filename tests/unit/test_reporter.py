"""The sidecar's status reporter: paced progress, outcomes at once, only its own replicaStatus key."""

from __future__ import annotations

import asyncio
from typing import Any

from loraplex.api.types import ReplicaAdapterStatus
from loraplex.sidecar.reporter import StatusReporter


class RecordingClient:
    def __init__(self) -> None:
        self.patches: list[tuple[float, str, dict[str, Any]]] = []

    async def merge_patch(self, path: str, patch: dict[str, Any]) -> dict[str, Any]:
        self.patches.append((asyncio.get_running_loop().time(), path, patch))
        return {}

    def states(self, adapter: str) -> list[str | None]:
        return [(patch["status"]["replicaStatus"]["pod-0"] or {}).get("state")
                for _, path, patch in self.patches if path.endswith(f"/loraadapters/{adapter}/status")]


async def run_reporter(interval: float) -> tuple[StatusReporter, RecordingClient, asyncio.Task[None]]:
    client = RecordingClient()
    reporter = StatusReporter(client, "default", "pod-0", min_interval=interval)  # type: ignore[arg-type]
    return reporter, client, asyncio.create_task(reporter.run())


async def test_progress_is_paced_and_the_latest_state_wins():
    reporter, client, task = await run_reporter(interval=0.3)
    try:
        reporter.set("math", ReplicaAdapterStatus(state="Downloading", bytes_done=0))
        await asyncio.sleep(0.05)
        for done in range(1, 20):
            reporter.set("math", ReplicaAdapterStatus(state="Downloading", bytes_done=done))
            await asyncio.sleep(0.005)
        assert client.states("math") == ["Downloading"]  # the first went out at once, the rest wait
        await asyncio.sleep(0.5)
        assert len(client.patches) == 2
        assert client.patches[1][2]["status"]["replicaStatus"]["pod-0"]["bytesDone"] == 19
        assert client.patches[1][0] - client.patches[0][0] >= 0.29
    finally:
        task.cancel()


async def test_outcomes_and_removals_go_out_at_once():
    reporter, client, task = await run_reporter(interval=5.0)
    try:
        reporter.set("math", ReplicaAdapterStatus(state="Downloading"))
        await asyncio.sleep(0.02)
        reporter.set("math", ReplicaAdapterStatus(state="Validating"))
        reporter.set("math", ReplicaAdapterStatus(state="Loaded", rank=8))
        await asyncio.sleep(0.1)
        assert client.states("math") == ["Downloading", "Loaded"]  # Validating was overtaken, no 5 s wait
        reporter.set("math", None)
        await asyncio.sleep(0.1)
        assert client.states("math")[-1] is None
        assert all(list(patch["status"]["replicaStatus"]) == ["pod-0"] for _, _, patch in client.patches)
    finally:
        task.cancel()


async def test_unchanged_entries_are_not_written_again():
    reporter, client, task = await run_reporter(interval=0.01)
    try:
        reporter.set("math", ReplicaAdapterStatus(state="Loaded", rank=8))
        await asyncio.sleep(0.05)
        reporter.set("math", ReplicaAdapterStatus(state="Loaded", rank=8))
        await asyncio.sleep(0.05)
        assert client.states("math") == ["Loaded"]
        reporter.reassert()  # the periodic re-assert writes it once more, on purpose
        await asyncio.sleep(0.05)
        assert client.states("math") == ["Loaded", "Loaded"]
    finally:
        task.cancel()
