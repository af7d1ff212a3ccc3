"""Following one object with list + watch (kube.follow_object) and the sidecar's adapter-set follower on it: what
each listing and watch event delivers, and that a broken or ended watch is followed by a new listing."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest

from loraplex.api.adapter_set import AdapterLimits, AdapterSet
from loraplex.api.types import Runtime
from loraplex.kube import ApiError, follow_object
from loraplex.sidecar.desired import follow_adapter_set

PATH = "/api/v1/namespaces/ns/configmaps"
NAME = "llama3-adapters"


def configmap(version: str, data: dict[str, str] | None = None) -> dict[str, Any]:
    return {"metadata": {"name": NAME, "resourceVersion": version}, "data": data or {}}


class ScriptedApi:
    """Answers each listing with the next of `listings` (an exception is raised instead), and the watch that follows
    it with the next of `watches`, then ends it; once the listings run out the follower is cancelled."""

    def __init__(self, listings: list[Any], watches: list[list[dict[str, Any]]]) -> None:
        self.listings, self.watches = list(listings), list(watches)
        self.calls: list[tuple[str, str | None]] = []

    async def list(self, path: str, field_selector: str | None = None) -> dict[str, Any]:
        assert (path, field_selector) == (PATH, f"metadata.name={NAME}")
        if not self.listings:
            raise asyncio.CancelledError
        listing = self.listings.pop(0)
        if isinstance(listing, Exception):
            self.calls.append(("LIST", "failed"))
            raise listing
        self.calls.append(("LIST", listing["metadata"]["resourceVersion"]))
        return listing

    async def watch(self, path: str, resource_version: str, field_selector: str | None = None,
                    ) -> AsyncIterator[dict[str, Any]]:
        assert (path, field_selector) == (PATH, f"metadata.name={NAME}")
        self.calls.append(("WATCH", resource_version))
        for event in self.watches.pop(0):
            yield event


async def test_each_listing_and_change_is_delivered_and_a_broken_watch_lists_again(caplog):
    api = ScriptedApi(
        listings=[{"items": [configmap("5")], "metadata": {"resourceVersion": "7"}},
                  ApiError(410, "Expired", "too old a resource version"),
                  {"items": [], "metadata": {"resourceVersion": "12"}}],
        watches=[[{"type": "MODIFIED", "object": configmap("8")}, {"type": "BOOKMARK", "object": configmap("9")},
                  {"type": "DELETED", "object": configmap("10")}, {"type": "ADDED", "object": configmap("11")}],
                 []])
    seen: list[str | None] = []
    with pytest.raises(asyncio.CancelledError):
        await follow_object(api, PATH, NAME, lambda obj: seen.append(obj and obj["metadata"]["resourceVersion"]),
                            "adapter set", logging.getLogger("test-follow"), backoff=0)
    assert seen == ["5", "8", None, "11", None]  # a bookmark or an unknown event type delivers nothing
    assert api.calls == [("LIST", "7"), ("WATCH", "7"), ("LIST", "failed"), ("LIST", "12"), ("WATCH", "12")]
    assert [r.getMessage() for r in caplog.records if r.name == "test-follow"] == [
        "adapter set watch interrupted (410 Expired: too old a resource version); re-listing in 0s"]


def adapter_set_data(base_model: str) -> dict[str, str]:
    limits = AdapterLimits(max_rank=16, allowed_formats=[])
    return AdapterSet(base_model=base_model, runtime=Runtime.VLLM, limits=limits, adapters=[]).to_configmap_data()


async def test_the_adapter_set_follower_passes_on_each_new_valid_set_and_keeps_it_when_deleted(caplog):
    api = ScriptedApi(
        listings=[{"items": [configmap("5", adapter_set_data("a"))], "metadata": {"resourceVersion": "5"}},
                  {"items": [configmap("8", adapter_set_data("c"))], "metadata": {"resourceVersion": "8"}}],
        watches=[[{"type": "MODIFIED", "object": configmap("5", adapter_set_data("a"))},  # the version listed
                  {"type": "MODIFIED", "object": configmap("6", adapter_set_data("b"))},
                  {"type": "MODIFIED", "object": configmap("7", {"other": "{}"})},
                  {"type": "DELETED", "object": configmap("7", {"other": "{}"})}],
                 []])
    sets: list[str] = []
    with pytest.raises(asyncio.CancelledError):
        await follow_adapter_set(api, "ns", NAME, lambda adapter_set: sets.append(adapter_set.base_model),
                                 backoff=0)
    assert sets == ["a", "b", "c"]
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == [
        f"ConfigMap ns/{NAME} is not a valid adapter set: ConfigMap has no adapters.json key"]
