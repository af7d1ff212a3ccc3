"""Structural OpenAPI v3 handling for custom resources: defaulting, pruning and validation.

Covers the keywords loraplex's CRDs (and most CRDs) use. CEL rules (x-kubernetes-validations),
oneOf/anyOf/allOf/not and formats are not evaluated; see README.md.
"""

from __future__ import annotations

import copy
import re
from typing import Any

_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "object": (dict,),
    "array": (list,),
}


def _is_type(value: Any, type_name: str) -> bool:
    if type_name in ("integer", "number") and isinstance(value, bool):
        return False
    return isinstance(value, _TYPES[type_name])


def apply_defaults(value: Any, schema: dict[str, Any]) -> Any:
    """Fill in `default`s the way the API server does: only where the parent object exists."""
    if isinstance(value, dict) and schema.get("type") == "object":
        for name, sub in schema.get("properties", {}).items():
            if name not in value and "default" in sub:
                value[name] = copy.deepcopy(sub["default"])
            if name in value:
                value[name] = apply_defaults(value[name], sub)
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for key in list(value):
                value[key] = apply_defaults(value[key], extra)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [apply_defaults(item, schema["items"]) for item in value]
    return value


def prune(value: Any, schema: dict[str, Any]) -> Any:
    """Drop fields the schema does not declare, unless it preserves unknown fields."""
    if isinstance(value, dict) and schema.get("type") == "object":
        if schema.get("x-kubernetes-preserve-unknown-fields"):
            return value
        properties = schema.get("properties")
        extra = schema.get("additionalProperties")
        if properties is not None:
            return {k: prune(v, properties[k]) for k, v in value.items() if k in properties}
        if isinstance(extra, dict):
            return {k: prune(v, extra) for k, v in value.items()}
        return {}
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [prune(item, schema["items"]) for item in value]
    return value


def unknown_fields(value: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """Paths pruning would drop: what `fieldValidation=Strict` refuses."""
    found: list[str] = []
    if isinstance(value, dict) and schema.get("type") == "object":
        if schema.get("x-kubernetes-preserve-unknown-fields"):
            return []
        properties = schema.get("properties")
        extra = schema.get("additionalProperties")
        for key, item in value.items():
            child = f"{path}.{key}" if path else key
            if properties is not None:
                if key not in properties:
                    found.append(child)
                else:
                    found += unknown_fields(item, properties[key], child)
            elif isinstance(extra, dict):
                found += unknown_fields(item, extra, child)
            else:
                found.append(child)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for index, item in enumerate(value):
            found += unknown_fields(item, schema["items"], f"{path}[{index}]")
    return found


def validate(value: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """Return the API server's style of field errors, e.g. 'spec.replicas: Invalid value: ...'."""
    where = path or "<root>"
    if value is None:
        if schema.get("nullable"):
            return []
        return [f"{where}: Invalid value: \"null\": {where} in body must be of type {schema.get('type')}"]
    type_name = schema.get("type")
    if type_name and not _is_type(value, type_name):
        return [f'{where}: Invalid value: "{_kind_of(value)}": {where} in body must be of type {type_name}: '
                f'"{_kind_of(value)}"']
    errors: list[str] = []
    if "enum" in schema and value not in schema["enum"]:
        allowed = ", ".join(f'"{item}"' for item in schema["enum"])
        errors.append(f'{where}: Unsupported value: {_quote(value)}: supported values: {allowed}')
    if isinstance(value, str):
        if "pattern" in schema and not re.search(schema["pattern"], value):
            errors.append(f"{where}: Invalid value: {_quote(value)}: {where} in body should match "
                          f"'{schema['pattern']}'")
        if "minLength" in schema and len(value) < schema["minLength"]:
            errors.append(f"{where}: Invalid value: {_quote(value)}: {where} in body should be at least "
                          f"{schema['minLength']} chars long")
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            errors.append(f"{where}: Too long: may not be more than {schema['maxLength']} bytes")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            errors.append(f"{where}: Invalid value: {value}: {where} in body should be greater than or "
                          f"equal to {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            errors.append(f"{where}: Invalid value: {value}: {where} in body should be less than or "
                          f"equal to {schema['maximum']}")
    if isinstance(value, list):
        if "minItems" in schema and len(value) < schema["minItems"]:
            errors.append(f"{where}: Invalid value: {len(value)}: {where} in body should have at least "
                          f"{schema['minItems']} items")
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            errors.append(f"{where}: Too many: {len(value)}: must have at most {schema['maxItems']} items")
        items = schema.get("items")
        if isinstance(items, dict):
            for index, item in enumerate(value):
                errors += validate(item, items, f"{where}[{index}]")
    if isinstance(value, dict):
        for name in schema.get("required", []):
            if name not in value:
                child = f"{path}.{name}" if path else name
                errors.append(f"{child}: Required value")
        for name, sub in schema.get("properties", {}).items():
            if name in value:
                errors += validate(value[name], sub, f"{path}.{name}" if path else name)
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict) and "properties" not in schema:
            for key, item in value.items():
                errors += validate(item, extra, f"{where}.{key}" if path else key)
    return errors


def _kind_of(value: Any) -> str:
    for name in _TYPES:
        if _is_type(value, name):
            return name
    return type(value).__name__


def _quote(value: Any) -> str:
    return f'"{value}"' if isinstance(value, str) else str(value)
