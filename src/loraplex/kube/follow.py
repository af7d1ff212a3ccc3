"""Follow one named object with list + watch: list it, watch from the list's resourceVersion, and list again
whenever the server ends the watch or it breaks (a disconnect, an expired version), so no change is missed."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from loraplex.kube.client import KubeClient
from loraplex.kube.errors import ApiError


async def follow_object(client: KubeClient, path: str, name: str, on_object: Callable[[dict[str, Any] | None], None],
                        what: str, log: logging.Logger, backoff: float = 1.0) -> None:
    """Call `on_object` with the object named `name` in the collection at `path` after each listing and on each
    change, and with None where it is absent or deleted; never returns. Interruptions are logged to `log` as
    "<what> watch ..." and followed by a new listing after `backoff` seconds."""
    selector = f"metadata.name={name}"
    while True:
        try:
            listing = await client.list(path, field_selector=selector)
            items = listing.get("items") or []
            on_object(items[0] if items else None)
            async for event in client.watch(path, listing["metadata"]["resourceVersion"], field_selector=selector):
                if event["type"] in ("ADDED", "MODIFIED"):
                    on_object(event["object"])
                elif event["type"] == "DELETED":
                    on_object(None)
            continue  # the server closed the watch (timeout): re-list and watch again
        except asyncio.CancelledError:
            raise
        except (ApiError, OSError, TimeoutError, ValueError) as exc:
            log.warning("%s watch interrupted (%s); re-listing in %.0fs", what, exc, backoff)
        except Exception as exc:  # aiohttp payload errors and the like: never let the follower die
            log.warning("%s watch failed (%s: %s); re-listing", what, type(exc).__name__, exc)
        await asyncio.sleep(backoff)
