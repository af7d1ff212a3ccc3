"""Label and field selectors, parsed the way the API server parses `?labelSelector=` and `?fieldSelector=`."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

Matcher = Callable[[dict[str, Any]], bool]

_SET_RE = re.compile(r"^\s*(!?)([A-Za-z0-9./_-]+)\s*(?:(in|notin)\s*\(([^)]*)\))?\s*$")
_EQ_RE = re.compile(r"^\s*([A-Za-z0-9./_-]+)\s*(==|=|!=)\s*([A-Za-z0-9._-]*)\s*$")


class SelectorError(ValueError):
    pass


def _split_requirements(selector: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for char in selector:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    if current.strip():
        parts.append(current)
    return parts


def parse_label_selector(selector: str | None) -> Matcher:
    if not selector:
        return lambda labels: True
    checks: list[Matcher] = []
    for requirement in _split_requirements(selector):
        if match := _EQ_RE.match(requirement):
            key, op, value = match.groups()
            if op == "!=":
                checks.append(lambda labels, k=key, v=value: labels.get(k) != v)
            else:
                checks.append(lambda labels, k=key, v=value: labels.get(k) == v)
        elif match := _SET_RE.match(requirement):
            negated, key, op, values = match.groups()
            if op:
                if negated:
                    raise SelectorError(f"unable to parse requirement: {requirement!r}")
                members = {v.strip() for v in values.split(",") if v.strip()}
                if op == "in":
                    checks.append(lambda labels, k=key, m=members: labels.get(k) in m)
                else:
                    checks.append(lambda labels, k=key, m=members: labels.get(k) not in m)
            elif negated:
                checks.append(lambda labels, k=key: k not in labels)
            else:
                checks.append(lambda labels, k=key: k in labels)
        else:
            raise SelectorError(f"unable to parse requirement: {requirement!r}")
    return lambda labels: all(check(labels) for check in checks)


_FIELDS: dict[str, Callable[[dict[str, Any]], str | None]] = {
    "metadata.name": lambda obj: obj.get("metadata", {}).get("name"),
    "metadata.namespace": lambda obj: obj.get("metadata", {}).get("namespace"),
    "status.phase": lambda obj: (obj.get("status") or {}).get("phase"),
    "spec.nodeName": lambda obj: (obj.get("spec") or {}).get("nodeName"),
}


def parse_field_selector(selector: str | None) -> Matcher:
    if not selector:
        return lambda obj: True
    checks: list[Matcher] = []
    for requirement in selector.split(","):
        match = _EQ_RE.match(requirement)
        if not match:
            raise SelectorError(f"invalid field selector: {requirement!r}")
        field, op, value = match.groups()
        if field not in _FIELDS:
            raise SelectorError(f'field label not supported: {field}')
        getter = _FIELDS[field]
        if op == "!=":
            checks.append(lambda obj, g=getter, v=value: g(obj) != v)
        else:
            checks.append(lambda obj, g=getter, v=value: g(obj) == v)
    return lambda obj: all(check(obj) for check in checks)
