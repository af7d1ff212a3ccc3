"""JSON merge patch (RFC 7386) as loraplex writes status: the smallest patch from what an object holds to
what it should hold. A merge patch merges nested objects key by key, so a field that must go is sent as null."""

from __future__ import annotations

from typing import Any


def merge_difference(current: dict[str, Any], wanted: dict[str, Any]) -> dict[str, Any]:
    """The merge patch that turns `current` into `wanted`: only what differs, null for a key `wanted` lacks."""
    patch: dict[str, Any] = {key: None for key in current if key not in wanted}
    for key, value in wanted.items():
        if isinstance(value, dict) and isinstance(current.get(key), dict):
            if difference := merge_difference(current[key], value):
                patch[key] = difference
        elif current.get(key) != value:
            patch[key] = value
    return patch
