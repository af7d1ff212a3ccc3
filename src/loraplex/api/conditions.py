"""Status conditions the Kubernetes way: lastTransitionTime moves only when status flips."""

from __future__ import annotations

import datetime
from typing import Any


def utc_now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def condition(type_: str, ok: bool | None, reason: str, message: str, generation: int | None) -> dict[str, Any]:
    status = "Unknown" if ok is None else ("True" if ok else "False")
    return {"type": type_, "status": status, "reason": reason, "message": message,
            "observedGeneration": generation}


def merge_conditions(current: list[dict[str, Any]] | None, desired: list[dict[str, Any]],
                     now: str | None = None) -> list[dict[str, Any]]:
    """Desired conditions, keeping each one's lastTransitionTime unless its status changed."""
    previous = {c.get("type"): c for c in current or []}
    merged = []
    for wanted in desired:
        before = previous.get(wanted["type"])
        stamp = before.get("lastTransitionTime") if before and before.get("status") == wanted["status"] else None
        merged.append({**wanted, "lastTransitionTime": stamp or now or utc_now()})
    return merged


def find(conditions: list[dict[str, Any]] | None, type_: str) -> dict[str, Any] | None:
    return next((c for c in conditions or [] if c.get("type") == type_), None)
