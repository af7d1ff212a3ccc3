"""Bring one owned object to its rendered state: create it, or patch it when it drifted."""

from __future__ import annotations

import logging
from typing import Any

from kubernetes.utils.quantity import parse_quantity

from loraplex.kube import ApiError, KubeClient, NotFound, resource_path, retry_on_conflict
from loraplex.operator.naming import controller_ref

logger = logging.getLogger(__name__)

PLURALS = {
    "Deployment": "deployments", "Service": "services", "ServiceAccount": "serviceaccounts",
    "ConfigMap": "configmaps", "Role": "roles", "RoleBinding": "rolebindings", "InferencePool": "inferencepools",
    "InferenceModelRewrite": "inferencemodelrewrites",
}


def is_quantity(path: tuple[str, ...]) -> bool:
    """Whether the field at `path` (its keys from the object's root, list positions left out) is a
    resource.Quantity in what we render: container (or pod) resources and emptyDir size limits."""
    return path[-1:] == ("sizeLimit",) or path[-3:-1] in (("resources", "requests"), ("resources", "limits"))


def same_quantity(desired: Any, live: Any) -> bool:
    """Equal amounts however written: the API server stores 1000m as 1, 1024Mi as 1Gi, 0.5 as 500m."""
    try:
        return bool(parse_quantity(desired) == parse_quantity(live))
    except (ValueError, ArithmeticError):
        return desired == live


def is_subset(desired: Any, live: Any, path: tuple[str, ...] = ()) -> bool:
    """True when every field we render is present in `live` with the same value.

    The API server adds defaults (protocols, termination grace, clusterIP...), so `live` is a superset
    of what we rendered exactly when nobody changed what we own. Lists must match item for item, and
    quantities by amount, since the server rewrites them in its canonical form.
    """
    if isinstance(desired, dict):
        return isinstance(live, dict) and all(key in live and is_subset(value, live[key], (*path, key))
                                              for key, value in desired.items())
    if isinstance(desired, list):
        return (isinstance(live, list) and len(desired) == len(live)
                and all(is_subset(d, v, path) for d, v in zip(desired, live, strict=True)))
    if is_quantity(path):
        return same_quantity(desired, live)
    return desired == live


def object_path(obj: dict[str, Any], with_name: bool = True) -> str:
    meta = obj["metadata"]
    return resource_path(obj["apiVersion"], PLURALS[obj["kind"]], meta.get("namespace"),
                         meta["name"] if with_name else None)


def _owned_fields(desired: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in desired.items() if k not in ("apiVersion", "kind", "metadata", "status")}


def in_sync(desired: dict[str, Any], live: dict[str, Any]) -> bool:
    """True when `live` has everything we render for it: nothing to write."""
    meta, live_meta = desired["metadata"], live.get("metadata") or {}
    return (is_subset(_owned_fields(desired), live)
            and is_subset(meta.get("labels", {}), live_meta.get("labels") or {})
            and is_subset(meta.get("annotations", {}), live_meta.get("annotations") or {})
            and live_meta.get("ownerReferences") == meta.get("ownerReferences"))


class TakenByAnother(ApiError):
    """The object's name is held by an object another owner controls (a BaseModelDeployment named like this one's
    derived names, say): taking it over would steal that owner's object."""

    def __init__(self, desired: dict[str, Any], controller: dict[str, Any]):
        meta = desired["metadata"]
        super().__init__(409, "AlreadyExists", f"{desired['kind']} {meta['name']} exists and is controlled by "
                         f"{controller.get('kind')} {controller.get('name')}; loraplex does not take it over")


def other_controller(desired: dict[str, Any], live: dict[str, Any]) -> dict[str, Any] | None:
    """The controller of `live` when it is not the owner we render, nor an earlier object of that owner's kind and
    name (a BaseModelDeployment deleted and created again, whose children the garbage collector has yet to take)."""
    ours, theirs = controller_ref(desired["metadata"]), controller_ref(live.get("metadata") or {})
    if ours is None or theirs is None:
        return None
    same = all(theirs.get(field) == ours.get(field) for field in ("apiVersion", "kind", "name"))
    return None if same else theirs


async def apply_object(client: KubeClient, desired: dict[str, Any]) -> str:
    """Create or converge one object; returns 'created', 'updated' or 'unchanged'. Raises TakenByAnother when the
    name is held by an object someone else controls."""

    async def attempt() -> str:
        live = await client.get_or_none(object_path(desired))
        if live is None:
            await client.create(object_path(desired, with_name=False), desired)
            return "created"
        if (controller := other_controller(desired, live)) is not None:
            raise TakenByAnother(desired, controller)
        if in_sync(desired, live):
            return "unchanged"
        meta, live_meta = desired["metadata"], live["metadata"]
        # A full replace at the version we read: our fields win, foreign labels and annotations stay.
        replacement = {
            **live,
            **_owned_fields(desired),
            "metadata": {
                **live_meta,
                "labels": {**(live_meta.get("labels") or {}), **meta.get("labels", {})},
                "annotations": {**(live_meta.get("annotations") or {}), **meta.get("annotations", {})},
                "ownerReferences": meta.get("ownerReferences"),
            },
        }
        if not replacement["metadata"]["annotations"]:
            replacement["metadata"].pop("annotations")
        await client.replace(object_path(desired), replacement)
        return "updated"

    try:
        outcome = await retry_on_conflict(attempt)
    except NotFound:
        outcome = await retry_on_conflict(attempt)  # deleted between our read and write: create it
    if outcome != "unchanged":
        logger.info("%s %s/%s %s", outcome, desired["kind"], desired["metadata"]["namespace"],
                    desired["metadata"]["name"])
    return outcome
