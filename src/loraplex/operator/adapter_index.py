"""LoraAdapters by (namespace, base model), kept by the operator itself rather than by a kopf index.

kopf holds every handler until all of its indices are filled at start-up, through a gate that wakes
every waiting object whenever one more object is listed: quadratic in the number of indexed objects,
minutes at a few thousand adapters. This index is filled by one LIST when the operator starts (so it
is complete before any handler decides anything) and then follows the adapter events. Every resync
merges a fresh LIST into it, which repairs anything an event did not bring (an adapter deleted in the
instant between the first LIST and kopf's own) without undoing what newer events brought.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, ValuesView
from typing import Any

from loraplex.operator.adapters import AdapterView

Key = tuple[str, str]  # (namespace, name)


class AdapterIndex:
    def __init__(self) -> None:
        self._by_base: dict[Key, dict[str, AdapterView]] = {}  # (namespace, base model) -> name -> view
        self._base_of: dict[Key, Key] = {}  # (namespace, adapter) -> (namespace, base model)
        self._changes = 0  # counts puts and removals
        self._changed_at: dict[Key, int] = {}  # (namespace, adapter) -> change number of its last put or removal

    @property
    def changes(self) -> int:
        """Take this before a LIST and pass it to merge_list."""
        return self._changes

    def put(self, view: AdapterView) -> None:
        self._touch((view.namespace, view.name))
        self._put(view)

    def remove(self, namespace: str, name: str) -> None:
        self._touch((namespace, name))
        self._remove((namespace, name))

    def merge_list(self, bodies: Iterable[dict[str, Any]], changes_before_list: int) -> None:
        """Take a LIST's objects, except where an event since the LIST began already said more."""
        listed = {(body["metadata"].get("namespace", ""), body["metadata"]["name"]): body for body in bodies}
        for adapter in list(self._base_of):
            if adapter not in listed and self._changed_at.get(adapter, 0) <= changes_before_list:
                self._remove(adapter)
        for adapter, body in listed.items():
            if self._changed_at.get(adapter, 0) <= changes_before_list:
                self._put(AdapterView.from_body(body))
        for adapter in [a for a, n in self._changed_at.items() if n <= changes_before_list and a not in listed]:
            del self._changed_at[adapter]  # removals the LIST confirms need no memory any more

    def _touch(self, adapter: Key) -> None:
        self._changes += 1
        self._changed_at[adapter] = self._changes

    def _put(self, view: AdapterView) -> None:
        adapter, base = (view.namespace, view.name), (view.namespace, view.base_model or "")
        previous = self._base_of.get(adapter)
        if previous is not None and previous != base:
            self._discard(adapter, previous)
        self._by_base.setdefault(base, {})[view.name] = view
        self._base_of[adapter] = base

    def _remove(self, adapter: Key) -> None:
        base = self._base_of.pop(adapter, None)
        if base is not None:
            self._discard(adapter, base)

    def holds(self, namespace: str, name: str) -> bool:
        """Whether the adapter (namespace, name) is in the index; iterating the index yields base models."""
        return (namespace, name) in self._base_of

    def find(self, namespace: str, name: str) -> AdapterView | None:
        base = self._base_of.get((namespace, name))
        return None if base is None else self._by_base[base].get(name)

    def get(self, base: Key, default: Any = ()) -> ValuesView[AdapterView] | Any:
        views = self._by_base.get(base)
        return views.values() if views else default

    def values(self) -> Iterator[ValuesView[AdapterView]]:
        return (views.values() for views in self._by_base.values())

    def __iter__(self) -> Iterator[Key]:
        return iter(self._by_base)

    def __len__(self) -> int:
        return len(self._base_of)

    def _discard(self, adapter: Key, base: Key) -> None:
        views = self._by_base.get(base)
        if views is not None:
            views.pop(adapter[1], None)
            if not views:
                del self._by_base[base]
