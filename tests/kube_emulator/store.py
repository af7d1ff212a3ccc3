"""The emulator's state: objects, resourceVersions, watch history, finalizers and garbage collection.

All methods are synchronous and run on the server's event loop, so each request is atomic the way a
single etcd transaction is. Errors are `ApiError`s carrying the Status the API server would return.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import copy
import dataclasses
import datetime
import secrets
import uuid
from typing import Any

from . import patches, schema, selectors
from .resources import BUILTINS, ResourceType, from_crd

CRD_KEY = "customresourcedefinitions.apiextensions.k8s.io"
NAMESPACE_KEY = "namespaces"


class ApiError(Exception):
    def __init__(self, code: int, reason: str, message: str, details: dict[str, Any] | None = None):
        super().__init__(message)
        self.code, self.reason, self.message, self.details = code, reason, message, details or {}

    def status(self) -> dict[str, Any]:
        return {
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": self.message, "reason": self.reason, "details": self.details, "code": self.code,
        }


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _qualified(rt: ResourceType) -> str:
    return rt.key


def not_found(rt: ResourceType, name: str) -> ApiError:
    return ApiError(404, "NotFound", f'{_qualified(rt)} "{name}" not found',
                    {"name": name, "group": rt.group, "kind": rt.plural})


def conflict(rt: ResourceType, name: str) -> ApiError:
    return ApiError(409, "Conflict",
                    f'Operation cannot be fulfilled on {_qualified(rt)} "{name}": the object has been '
                    "modified; please apply your changes to the latest version and try again",
                    {"name": name, "group": rt.group, "kind": rt.plural})


CONFIGMAP_MAX_BYTES = 1024 * 1024  # the API server's limit on a ConfigMap's data and binaryData together


def invalid(rt: ResourceType, name: str, causes: list[str]) -> ApiError:
    return ApiError(422, "Invalid", f'{rt.kind}.{rt.group or "core"} "{name}" is invalid: ' + ", ".join(causes),
                    {"name": name, "group": rt.group, "kind": rt.kind,
                     "causes": [{"message": cause} for cause in causes]})


@dataclasses.dataclass(eq=False)
class Watcher:
    rt: ResourceType
    namespace: str | None
    labels: selectors.Matcher
    fields: selectors.Matcher
    queue: asyncio.Queue[dict[str, Any] | None]

    def matches(self, obj: dict[str, Any] | None) -> bool:
        if obj is None:
            return False
        meta = obj["metadata"]
        if self.namespace is not None and meta.get("namespace") != self.namespace:
            return False
        return self.labels(meta.get("labels") or {}) and self.fields(obj)


@dataclasses.dataclass
class HistoryEntry:
    resource_version: int
    type_key: str
    event_type: str
    old: dict[str, Any] | None
    new: dict[str, Any]


class Store:
    def __init__(self, history_limit: int = 50_000) -> None:
        self.types: dict[tuple[str, str, str], ResourceType] = {}
        self.objects: dict[str, dict[tuple[str | None, str], dict[str, Any]]] = collections.defaultdict(dict)
        self.resource_version = 1
        self.history: collections.deque[HistoryEntry] = collections.deque(maxlen=history_limit)
        self.compacted_at = 0  # history holds every event after this resourceVersion
        self.watchers: set[Watcher] = set()
        self.request_counts: collections.Counter[tuple[str, str]] = collections.Counter()
        # (client, verb, resource): client "aiohttp" for loraplex's processes and kopf, "other" for kubectl
        # and test clients.
        self.client_counts: collections.Counter[tuple[str, str, str]] = collections.Counter()
        # Faults to inject: (verb, resource key) -> how many of the next such requests fail with a 409.
        self.injected_conflicts: collections.Counter[tuple[str, str]] = collections.Counter()
        for rt in BUILTINS:
            self.types[(rt.group, rt.version, rt.plural)] = rt
        for namespace in ("default", "kube-system"):
            self.create(self.builtin("", "namespaces"), None, {"metadata": {"name": namespace}})

    def inject_conflicts(self, verb: str, resource: str, count: int) -> None:
        """Make the next `count` `verb` requests on `resource` (e.g. 'patch', 'loraadapters.loraplex.io')
        fail with 409 Conflict, as if another writer got there first."""
        self.injected_conflicts[(verb, resource)] += count

    def take_injected_conflict(self, verb: str, resource: str) -> bool:
        if self.injected_conflicts[(verb, resource)] > 0:
            self.injected_conflicts[(verb, resource)] -= 1
            return True
        return False

    # ---- types -------------------------------------------------------------------------------------

    def builtin(self, group: str, plural: str) -> ResourceType:
        return next(rt for (g, _, p), rt in self.types.items() if g == group and p == plural)

    def resolve(self, group: str, version: str, plural: str) -> ResourceType | None:
        return self.types.get((group, version, plural))

    def group_versions(self) -> dict[str, list[str]]:
        result: dict[str, list[str]] = collections.defaultdict(list)
        for group, version, _ in self.types:
            if version not in result[group]:
                result[group].append(version)
        return result

    def _register_crd(self, crd: dict[str, Any]) -> None:
        self._unregister_crd(crd)
        for rt in from_crd(crd):
            self.types[(rt.group, rt.version, rt.plural)] = rt

    def _unregister_crd(self, crd: dict[str, Any]) -> None:
        group, plural = crd["spec"]["group"], crd["spec"]["names"]["plural"]
        for key in [k for k in self.types if k[0] == group and k[2] == plural]:
            del self.types[key]

    # ---- reading -----------------------------------------------------------------------------------

    def get(self, rt: ResourceType, namespace: str | None, name: str) -> dict[str, Any]:
        obj = self.objects[rt.key].get((namespace if rt.namespaced else None, name))
        if obj is None:
            raise not_found(rt, name)
        return self._present(rt, obj)

    def list(self, rt: ResourceType, namespace: str | None, label_selector: str | None = None,
             field_selector: str | None = None) -> tuple[list[dict[str, Any]], int]:
        labels = selectors.parse_label_selector(label_selector)
        fields = selectors.parse_field_selector(field_selector)
        items = []
        for (ns, _), obj in sorted(self.objects[rt.key].items(), key=lambda kv: (kv[0][0] or "", kv[0][1])):
            if namespace is not None and ns != namespace:
                continue
            if labels(obj["metadata"].get("labels") or {}) and fields(obj):
                items.append(self._present(rt, obj))
        return items, self.resource_version

    def _present(self, rt: ResourceType, obj: dict[str, Any]) -> dict[str, Any]:
        shown = copy.deepcopy(obj)
        shown["apiVersion"] = rt.api_version  # one storage version, served under every version unchanged
        return shown

    # ---- writing -----------------------------------------------------------------------------------

    def _next_version(self) -> int:
        self.resource_version += 1
        return self.resource_version

    def _check_namespace(self, rt: ResourceType, namespace: str | None) -> None:
        if not rt.namespaced:
            return
        if not namespace:
            raise ApiError(400, "BadRequest", "the namespace of the provided object does not match the "
                           "namespace sent on the request")
        ns_obj = self.objects[NAMESPACE_KEY].get((None, namespace))
        if ns_obj is None:
            raise ApiError(404, "NotFound", f'namespaces "{namespace}" not found',
                           {"name": namespace, "kind": "namespaces"})
        if ns_obj["metadata"].get("deletionTimestamp"):
            raise ApiError(403, "Forbidden", f'unable to create new content in namespace {namespace} because '
                           "it is being terminated")

    def _admit(self, rt: ResourceType, obj: dict[str, Any], name: str, strict: bool = False) -> dict[str, Any]:
        """Defaulting, pruning and validation for custom resources; basic metadata checks for all."""
        if rt.key == "secrets" and "stringData" in obj:
            # Write-only convenience field: folded into base64 `data`, as the API server does.
            encoded = {k: base64.b64encode(str(v).encode()).decode() for k, v in (obj.pop("stringData") or {}).items()}
            obj["data"] = {**(obj.get("data") or {}), **encoded}
        if rt.schema is not None:
            body = {k: v for k, v in obj.items() if k not in ("metadata", "apiVersion", "kind")}
            unknown = schema.unknown_fields(body, rt.schema) if strict else []
            if unknown:
                raise ApiError(400, "BadRequest", "strict decoding error: " + ", ".join(
                    f'unknown field "{field}"' for field in unknown))
            body = schema.prune(schema.apply_defaults(body, rt.schema), rt.schema)
            errors = schema.validate(body, {**rt.schema, "properties": {
                k: v for k, v in rt.schema.get("properties", {}).items()
                if k not in ("metadata", "apiVersion", "kind")}})
            if errors:
                raise invalid(rt, name, errors)
            obj = {"apiVersion": obj.get("apiVersion"), "kind": obj.get("kind"), "metadata": obj["metadata"],
                   **body}
        meta = obj["metadata"]
        for field in ("labels", "annotations"):
            value = meta.get(field)
            if value is not None and (not isinstance(value, dict) or
                                      not all(isinstance(v, str) for v in value.values())):
                raise invalid(rt, name, [f"metadata.{field}: Invalid value: must be a map of strings"])
        if rt.key == CRD_KEY:
            self._validate_crd(rt, obj, name)
        if rt.key == "configmaps":
            size = sum(len(str(v).encode()) for v in (obj.get("data") or {}).values()) + sum(
                len(base64.b64decode(v)) for v in (obj.get("binaryData") or {}).values())
            if size > CONFIGMAP_MAX_BYTES:
                raise invalid(rt, name, [f"[]: Too long: must have at most {CONFIGMAP_MAX_BYTES} bytes"])
        return obj

    def _validate_crd(self, rt: ResourceType, obj: dict[str, Any], name: str) -> None:
        spec = obj.get("spec") or {}
        try:
            expected = f'{spec["names"]["plural"]}.{spec["group"]}'
        except (KeyError, TypeError):
            raise invalid(rt, name, ["spec: Required value: group and names.plural are required"]) from None
        if name != expected:
            raise invalid(rt, name, [f'metadata.name: Invalid value: "{name}": must be spec.names.plural+"."'
                                     f"+spec.group"])

    def create(self, rt: ResourceType, namespace: str | None, body: dict[str, Any],
               strict: bool = False) -> dict[str, Any]:
        obj = copy.deepcopy(body)
        meta = obj.setdefault("metadata", {})
        if not isinstance(meta, dict):
            raise ApiError(400, "BadRequest", "metadata must be an object")
        if rt.namespaced:
            if meta.get("namespace") and namespace and meta["namespace"] != namespace:
                raise ApiError(400, "BadRequest", "the namespace of the provided object does not match the "
                               "namespace sent on the request")
            namespace = namespace or meta.get("namespace")
            self._check_namespace(rt, namespace)
            meta["namespace"] = namespace
        else:
            meta.pop("namespace", None)
            namespace = None
        name = meta.get("name")
        if not name:
            if not meta.get("generateName"):
                raise invalid(rt, "", ["metadata.name: Required value: name or generateName is required"])
            name = meta["generateName"] + secrets.token_hex(3)[:5]
            meta["name"] = name
        if (namespace, name) in self.objects[rt.key]:
            raise ApiError(409, "AlreadyExists", f'{_qualified(rt)} "{name}" already exists',
                           {"name": name, "group": rt.group, "kind": rt.plural})
        obj["apiVersion"], obj["kind"] = rt.api_version, rt.kind
        if rt.status_subresource and rt.schema is not None:
            obj.pop("status", None)  # the status of a custom resource cannot be set on create
        for field in ("resourceVersion", "uid", "creationTimestamp", "deletionTimestamp", "generation"):
            meta.pop(field, None)
        obj = self._admit(rt, obj, name, strict)
        meta = obj["metadata"]
        meta.update(uid=str(uuid.uuid4()), creationTimestamp=now(), generation=1)
        if rt.key == CRD_KEY:
            self._register_crd(obj)
            obj["status"] = self._crd_status(obj)
        meta["resourceVersion"] = str(self._next_version())
        self.objects[rt.key][(namespace, name)] = obj
        self._publish(rt, "ADDED", None, obj)
        created = self._present(rt, obj)
        owners = meta.get("ownerReferences") or []
        if owners and not {ref.get("uid") for ref in owners} & self._all_uids():
            # Created for owners that are already gone: the garbage collector removes it right after.
            self._collect_garbage()
        return created

    def _crd_status(self, crd: dict[str, Any]) -> dict[str, Any]:
        stamp = now()
        return {
            "acceptedNames": crd["spec"]["names"],
            "storedVersions": [v["name"] for v in crd["spec"]["versions"] if v.get("storage")],
            "conditions": [
                {"type": t, "status": "True", "reason": r, "message": m, "lastTransitionTime": stamp}
                for t, r, m in (("NamesAccepted", "NoConflicts", "no conflicts found"),
                                ("Established", "InitialNamesAccepted", "the initial names have been accepted"))
            ],
        }

    def update(self, rt: ResourceType, namespace: str | None, name: str, body: dict[str, Any],
               subresource: str | None = None, *, require_version: bool = True,
               strict: bool = False) -> dict[str, Any]:
        namespace = namespace if rt.namespaced else None
        current = self.objects[rt.key].get((namespace, name))
        if current is None:
            raise not_found(rt, name)
        if not isinstance(body, dict) or not isinstance(body.get("metadata", {}), dict):
            raise ApiError(400, "BadRequest", "the body of the request was not a valid object")
        meta = body.setdefault("metadata", {})
        if meta.get("name", name) != name:
            raise ApiError(400, "BadRequest", f'the name of the object ({meta["name"]}) does not match the name '
                           f"on the URL ({name})")
        requested_version = meta.get("resourceVersion")
        if requested_version:
            if requested_version != current["metadata"]["resourceVersion"]:
                raise conflict(rt, name)
        elif require_version and not rt.unconditional_update:
            raise invalid(rt, name, ["metadata.resourceVersion: Invalid value: 0x0: must be specified for an "
                                     "update"])
        if subresource == "status":
            new = copy.deepcopy(current)
            if "status" in body:
                new["status"] = copy.deepcopy(body["status"])
            else:
                new.pop("status", None)
        elif subresource is not None:
            raise not_found(rt, f"{name}/{subresource}")
        else:
            new = copy.deepcopy(body)
            new["apiVersion"], new["kind"] = rt.api_version, rt.kind
            if rt.status_subresource:
                if "status" in current:
                    new["status"] = copy.deepcopy(current["status"])
                else:
                    new.pop("status", None)
        return self._commit(rt, namespace, name, current, new, strict)

    def patch(self, rt: ResourceType, namespace: str | None, name: str, content_type: str, patch: Any,
              subresource: str | None = None, strict: bool = False) -> dict[str, Any]:
        namespace = namespace if rt.namespaced else None
        current = self.objects[rt.key].get((namespace, name))
        if current is None:
            raise not_found(rt, name)
        try:
            if content_type == "application/json-patch+json":
                patched = patches.json_patch(current, patch)
            elif content_type in ("application/merge-patch+json", "application/strategic-merge-patch+json"):
                if not isinstance(patch, dict):
                    raise patches.PatchError("a merge patch must be a JSON object")
                patched = patches.merge_patch(current, _strip_directives(patch))
            else:
                raise ApiError(415, "UnsupportedMediaType", f"the body of the request was in an unknown format "
                               f"- accepted media types include: application/json-patch+json, "
                               f"application/merge-patch+json, application/strategic-merge-patch+json "
                               f"(got {content_type})")
        except patches.PatchError as exc:
            raise ApiError(422, "Invalid", str(exc)) from None
        if not isinstance(patched, dict):
            raise ApiError(422, "Invalid", "the patch produced something that is not an object")
        patched.setdefault("metadata", {})
        if patched["metadata"].get("resourceVersion") == current["metadata"]["resourceVersion"]:
            # The precondition only applies when the patch itself names a resourceVersion.
            named = isinstance(patch, dict) and "resourceVersion" in (patch.get("metadata") or {})
            if not named:
                patched["metadata"].pop("resourceVersion")
        return self.update(rt, namespace, name, patched, subresource, require_version=False, strict=strict)

    def _commit(self, rt: ResourceType, namespace: str | None, name: str, current: dict[str, Any],
                new: dict[str, Any], strict: bool = False) -> dict[str, Any]:
        meta = new.setdefault("metadata", {})
        old_meta = current["metadata"]
        meta["name"] = name
        if rt.namespaced:
            meta["namespace"] = namespace
        for field in ("uid", "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds",
                      "generation"):
            if field in old_meta:
                meta[field] = old_meta[field]
            else:
                meta.pop(field, None)
        if old_meta.get("deletionTimestamp"):
            added = set(meta.get("finalizers") or []) - set(old_meta.get("finalizers") or [])
            if added:
                raise invalid(rt, name, [f"metadata.finalizers: Forbidden: no new finalizers can be added if "
                                         f"the object is being deleted, found new finalizers {sorted(added)}"])
        new = self._admit(rt, new, name, strict)
        meta = new["metadata"]
        if _without_volatile(new) == _without_volatile(current):
            return self._present(rt, current)  # a no-op write does not bump resourceVersion
        if _spec_part(new) != _spec_part(current):
            meta["generation"] = int(old_meta.get("generation", 1)) + 1
        if rt.key == CRD_KEY:
            self._register_crd(new)
        meta["resourceVersion"] = str(self._next_version())
        self.objects[rt.key][(namespace, name)] = new
        self._publish(rt, "MODIFIED", current, new)
        if meta.get("deletionTimestamp") and not meta.get("finalizers"):
            self._remove(rt, namespace, name)
        return self._present(rt, new)

    def delete(self, rt: ResourceType, namespace: str | None, name: str, propagation: str = "Background",
               preconditions: dict[str, Any] | None = None) -> dict[str, Any]:
        namespace = namespace if rt.namespaced else None
        current = self.objects[rt.key].get((namespace, name))
        if current is None:
            raise not_found(rt, name)
        preconditions = preconditions or {}
        meta = current["metadata"]
        if preconditions.get("uid") and preconditions["uid"] != meta["uid"]:
            raise conflict(rt, name)
        if preconditions.get("resourceVersion") and preconditions["resourceVersion"] != meta["resourceVersion"]:
            raise conflict(rt, name)
        if propagation == "Orphan":
            self._orphan_dependents(meta["uid"])
        if rt.key == NAMESPACE_KEY:
            for type_key, objects in list(self.objects.items()):
                for (ns, dependent_name), _ in list(objects.items()):
                    if ns == name:
                        dependent_rt = self._type_for_key(type_key)
                        if dependent_rt is not None:
                            self.delete(dependent_rt, ns, dependent_name)
        if meta.get("finalizers"):
            if not meta.get("deletionTimestamp"):
                new = copy.deepcopy(current)
                new["metadata"].update(deletionTimestamp=now(), deletionGracePeriodSeconds=0,
                                       resourceVersion=str(self._next_version()))
                self.objects[rt.key][(namespace, name)] = new
                self._publish(rt, "MODIFIED", current, new)
                return self._present(rt, new)
            return self._present(rt, current)
        return self._present(rt, self._remove(rt, namespace, name))

    def _remove(self, rt: ResourceType, namespace: str | None, name: str) -> dict[str, Any]:
        obj = self.objects[rt.key].pop((namespace, name))
        gone = copy.deepcopy(obj)
        gone["metadata"]["resourceVersion"] = str(self._next_version())
        self._publish(rt, "DELETED", obj, gone)
        if rt.key == CRD_KEY:
            self._unregister_crd(obj)
            self.objects.pop(f'{obj["spec"]["names"]["plural"]}.{obj["spec"]["group"]}', None)
        self._collect_garbage()
        return gone

    def _all_uids(self) -> set[str]:
        return {obj["metadata"]["uid"] for objects in self.objects.values() for obj in objects.values()}

    def _collect_garbage(self) -> None:
        """Background cascading deletion: dependents whose every owner is gone are deleted."""
        alive = self._all_uids()
        for type_key, objects in list(self.objects.items()):
            rt = self._type_for_key(type_key)
            if rt is None:
                continue
            for (ns, name), obj in list(objects.items()):
                owners = obj["metadata"].get("ownerReferences") or []
                if owners and not any(ref.get("uid") in alive for ref in owners):
                    if (ns, name) in objects and not obj["metadata"].get("deletionTimestamp"):
                        self.delete(rt, ns, name)

    def _orphan_dependents(self, owner_uid: str) -> None:
        for type_key, objects in list(self.objects.items()):
            rt = self._type_for_key(type_key)
            for (ns, name), obj in list(objects.items()):
                owners = obj["metadata"].get("ownerReferences") or []
                if rt is not None and any(ref.get("uid") == owner_uid for ref in owners):
                    new = copy.deepcopy(obj)
                    new["metadata"]["ownerReferences"] = [r for r in owners if r.get("uid") != owner_uid]
                    self._commit(rt, ns, name, obj, new)

    def _type_for_key(self, type_key: str) -> ResourceType | None:
        return next((rt for rt in self.types.values() if rt.key == type_key), None)

    # ---- watching ----------------------------------------------------------------------------------

    def _publish(self, rt: ResourceType, event_type: str, old: dict[str, Any] | None,
                 new: dict[str, Any]) -> None:
        if self.history.maxlen and len(self.history) == self.history.maxlen:
            self.compacted_at = self.history[0].resource_version
        entry = HistoryEntry(int(new["metadata"]["resourceVersion"]), rt.key, event_type,
                             copy.deepcopy(old), copy.deepcopy(new))
        self.history.append(entry)
        for watcher in list(self.watchers):
            if watcher.rt.key == rt.key:
                event = self._event_for(watcher, entry)
                if event is not None:
                    watcher.queue.put_nowait(event)

    def _event_for(self, watcher: Watcher, entry: HistoryEntry) -> dict[str, Any] | None:
        """The event a selective watch sees: objects entering or leaving its selector appear or vanish."""
        was, now_matches = watcher.matches(entry.old), watcher.matches(entry.new)
        if entry.event_type == "DELETED":
            event_type = "DELETED" if was or now_matches else None
        elif was and now_matches:
            event_type = entry.event_type
        elif now_matches:
            event_type = "ADDED"
        elif was:
            event_type = "DELETED"
        else:
            event_type = None
        if event_type is None:
            return None
        return {"type": event_type, "object": self._present(watcher.rt, entry.new)}

    def subscribe(self, rt: ResourceType, namespace: str | None, label_selector: str | None,
                  field_selector: str | None, since: str | None) -> Watcher:
        watcher = Watcher(rt, namespace, selectors.parse_label_selector(label_selector),
                          selectors.parse_field_selector(field_selector), asyncio.Queue())
        if since in (None, "", "0"):
            items, _ = self.list(rt, namespace, label_selector, field_selector)
            for item in items:
                watcher.queue.put_nowait({"type": "ADDED", "object": item})
        else:
            try:
                start = int(since)
            except ValueError:
                raise ApiError(400, "BadRequest", f'invalid resource version "{since}"') from None
            if start < self.compacted_at:
                watcher.queue.put_nowait({"type": "ERROR", "object": ApiError(
                    410, "Expired", f"too old resource version: {start} ({self.compacted_at})").status()})
                watcher.queue.put_nowait(None)
                return watcher
            for entry in self.history:
                if entry.resource_version > start and entry.type_key == rt.key:
                    event = self._event_for(watcher, entry)
                    if event is not None:
                        watcher.queue.put_nowait(event)
        self.watchers.add(watcher)
        return watcher

    def unsubscribe(self, watcher: Watcher) -> None:
        self.watchers.discard(watcher)

    def close_watches(self) -> None:
        """End every open watch stream, as an API server restart would."""
        for watcher in list(self.watchers):
            watcher.queue.put_nowait(None)
        self.watchers.clear()


def _without_volatile(obj: dict[str, Any]) -> dict[str, Any]:
    stripped = copy.deepcopy(obj)
    stripped["metadata"].pop("resourceVersion", None)
    stripped.pop("apiVersion", None)
    return stripped


def _spec_part(obj: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in obj.items() if k not in ("metadata", "status", "apiVersion", "kind")}


def _strip_directives(patch: Any) -> Any:
    """Strategic-merge-patch directives ($patch, $setElementOrder...) have no merge-patch meaning."""
    if isinstance(patch, dict):
        return {k: _strip_directives(v) for k, v in patch.items() if not k.startswith("$")}
    return patch
