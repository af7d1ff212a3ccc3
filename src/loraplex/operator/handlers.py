"""kopf registrations: indices that mirror the cluster, and thin event handlers that call the Reconciler.

Only event and index handlers are used, so kopf itself writes nothing to any object (no progress
annotations, no kopf finalizers): everything in the cluster is either the user's spec or our status.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any

import kopf

from loraplex.api.types import BASE_MODEL_DEPLOYMENT, GROUP, LORA_ADAPTER, LORA_REPLICA, VERSION
from loraplex.kube import KubeClient
from loraplex.operator.base_models import replica_problem
from loraplex.operator.metrics import OperatorMetrics
from loraplex.operator.naming import BASE_MODEL_LABEL, ChildNames, controller_ref
from loraplex.operator.reconciler import Key, Reconciler
from loraplex.operator.settings import OperatorSettings

logger = logging.getLogger(__name__)

OWNED_RESOURCES = [
    ("apps", "v1", "deployments"), ("", "v1", "services"), ("", "v1", "serviceaccounts"),
    ("rbac.authorization.k8s.io", "v1", "roles"), ("rbac.authorization.k8s.io", "v1", "rolebindings"),
]
_RETRY_DELAYS = (1, 2, 5, 10, 30, 60)


def _plain(body: Any) -> dict[str, Any]:
    return dict(body)


def owning_base_model(meta: Any) -> str | None:
    """The BaseModelDeployment that controls an object, by its owner reference. Labels are not used for
    this: someone editing them must not hide the object from the operator that should repair it."""
    ref = controller_ref(meta)
    if ref is not None and ref.get("kind") == BASE_MODEL_DEPLOYMENT.kind \
            and ref.get("apiVersion") == f"{GROUP}/{VERSION}":
        return str(ref["name"])
    return None


def _owned(meta: Any, **_: Any) -> bool:
    return owning_base_model(meta) is not None


def _owned_as(child: str) -> Callable[..., bool]:
    """A filter for the object a base model owns under the ChildNames property `child`."""
    def is_it(meta: Any, name: str, **_: Any) -> bool:
        owner = owning_base_model(meta)
        return owner is not None and name == getattr(ChildNames(owner), child)
    return is_it


def _owned_besides_adapter_set(meta: Any, name: str, **_: Any) -> bool:
    return _owned(meta) and not _owned_as("adapter_set")(meta, name)


# ---- indices: kopf keeps them current from its watches, before any handler runs ---------------------

@kopf.index(GROUP, VERSION, BASE_MODEL_DEPLOYMENT.plural)
def base_model_index(namespace: str, name: str, body: Any, **_: Any) -> dict[Key, dict[str, Any]]:
    return {(namespace, name): _plain(body)}


@kopf.index("", "v1", "pods", labels={BASE_MODEL_LABEL: kopf.PRESENT})
def replica_index(namespace: str, name: str, labels: Any, meta: Any, status: Any, **_: Any
                  ) -> dict[Key, tuple[str, str | None]] | None:
    if meta.get("deletionTimestamp") or status.get("phase") in ("Succeeded", "Failed"):
        return None
    return {(namespace, labels[BASE_MODEL_LABEL]): (name, replica_problem(_plain(status)))}


@kopf.index(GROUP, VERSION, LORA_REPLICA.plural)
def replica_report_index(namespace: str, name: str, spec: Any, status: Any, **_: Any
                         ) -> dict[Key, tuple[str, dict[str, Any]]]:
    """Each pod's report by its base model: one object per pod, so a kopf index stays small."""
    return {(namespace, spec.get("baseModel") or ""): (name, dict(status.get("adapters") or {}))}


@kopf.index("apps", "v1", "deployments", when=_owned_as("deployment"))
def deployment_index(namespace: str, meta: Any, body: Any, **_: Any) -> dict[Key, dict[str, Any]]:
    return {(namespace, owning_base_model(meta) or ""): _plain(body)}


@kopf.index("apps", "v1", "deployments", when=_owned_as("endpoint_picker"))
def picker_index(namespace: str, meta: Any, body: Any, **_: Any) -> dict[Key, dict[str, Any]]:
    return {(namespace, owning_base_model(meta) or ""): _plain(body)}


# ---- lifecycle -----------------------------------------------------------------------------------------

# kopf retries a failed startup handler after settings.execution.default_backoff, 60 s, by default. Our
# client already retried what was worth retrying (throttling, an API server that is starting), so what
# is left is a real outage, and the operator should come up soon after it ends, not a minute later.
@kopf.on.startup(backoff=5)
async def start(settings: kopf.OperatorSettings, memo: kopf.Memo, **kwargs: Any) -> None:
    settings.posting.enabled = False  # we post our own, meaningful Events
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    # kopf retries its own list, watch and patch calls (429 honouring Retry-After, 5xx, 403, no
    # connection) with these delays, then gives up; a watcher that gives up stops the whole operator
    # (kopf 1.45 re-raises its error from the orchestrator) and the pod restarts cold. The default
    # (1 … 21 s, 54 s in all) is shorter than an API server upgrade; these ride out about four minutes.
    settings.networking.error_backoffs = (1, 2, 4, 8, 15, 30, 30, 30, 30, 30, 30, 30)
    # How long a silent peer counts as alive: the failover time after a replica dies without goodbye.
    settings.peering.lifetime = int(os.environ.get("LORAPLEX_PEERING_LIFETIME_SECONDS", "60"))
    operator_settings = OperatorSettings.from_environment()
    reconciler = Reconciler(KubeClient.from_environment(), operator_settings, kwargs,
                            namespaces=memo.get("namespaces"))
    try:
        await reconciler.load_adapters()  # complete before any handler decides (see adapter_index.py)
    except BaseException:
        await reconciler.client.close()  # kopf runs this handler again, with a client of its own
        raise
    memo.reconciler = reconciler
    memo.metrics = OperatorMetrics(memo.reconciler.adapter_phases)
    memo.metrics_runner = await memo.metrics.serve(operator_settings.metrics_port) \
        if operator_settings.metrics_port else None
    memo.retries = {}
    memo.pending = {}
    memo.resync = asyncio.create_task(_resync_forever(memo, operator_settings.resync_seconds))


@kopf.on.cleanup()
async def stop(memo: kopf.Memo, **_: Any) -> None:
    memo.resync.cancel()
    if memo.metrics_runner is not None:
        await memo.metrics_runner.cleanup()
    await memo.reconciler.client.close()


async def _resync_forever(memo: kopf.Memo, interval: float) -> None:
    """A periodic full pass, so a missed event or a failed write is repaired without waiting for the next one."""
    reconciler: Reconciler = memo.reconciler
    while True:
        await asyncio.sleep(interval)
        try:
            await reconciler.load_adapters()
        except Exception as exc:
            logger.warning("resync could not list the LoraAdapters (%s); using what the events brought", exc)
        reconciler.forget_shortcuts()
        for key in list(reconciler.base_models):
            await _guarded(memo, ("base-model", key), lambda k=key: reconciler.reconcile_base_model(k))
        for key in list(reconciler.adapters):
            if reconciler.base_model(key) is None:
                await _guarded(memo, ("adapters", key), lambda k=key: reconciler.refresh_adapters(k))


async def _guarded(memo: kopf.Memo, what: tuple[Any, ...], fn: Callable[[], Awaitable[None]]) -> None:
    """Run a reconcile; on failure, log it and try again later with backoff (event handlers are not retried).

    A retry runs the newest failed reconcile of the same thing, and none once a later one succeeded:
    replaying an older event's body would put state the cluster has moved past back into the indices.
    """
    try:
        await memo.metrics.timed(str(what[0]), fn)
    except Exception as exc:
        attempt = memo.retries.get(what, 0)
        delay = _RETRY_DELAYS[min(attempt, len(_RETRY_DELAYS) - 1)]
        memo.retries[what] = attempt + 1
        logger.warning("reconcile of %s failed (%s: %s); retrying in %ss", what, type(exc).__name__, exc, delay)
        already_scheduled = what in memo.pending
        memo.pending[what] = fn
        if not already_scheduled:
            loop = asyncio.get_running_loop()
            loop.call_later(delay, lambda: loop.create_task(_retry(memo, what)))
    else:
        memo.retries.pop(what, None)
        memo.pending.pop(what, None)


async def _retry(memo: kopf.Memo, what: tuple[Any, ...]) -> None:
    fn = memo.pending.pop(what, None)
    if fn is not None:
        await _guarded(memo, what, fn)


# ---- events ----------------------------------------------------------------------------------------------

@kopf.on.event(GROUP, VERSION, BASE_MODEL_DEPLOYMENT.plural)
async def base_model_event(type: str | None, body: Any, namespace: str, name: str, memo: kopf.Memo,
                           **_: Any) -> None:
    key = (namespace, name)
    current = None if type == "DELETED" else _plain(body)
    await _guarded(memo, ("base-model", key), lambda: memo.reconciler.base_model_changed(key, current))


@kopf.on.event(GROUP, VERSION, LORA_ADAPTER.plural)
async def adapter_event(type: str | None, body: Any, namespace: str, name: str, memo: kopf.Memo,
                        **_: Any) -> None:
    key = (namespace, name)
    current = None if type == "DELETED" else _plain(body)
    await _guarded(memo, ("adapter", key), lambda: memo.reconciler.adapter_changed(key, current))


@kopf.on.event("", "v1", "pods", labels={BASE_MODEL_LABEL: kopf.PRESENT})
async def replica_event(namespace: str, labels: Any, memo: kopf.Memo, **_: Any) -> None:
    key = (namespace, labels[BASE_MODEL_LABEL])
    await _guarded(memo, ("replicas", key), lambda: memo.reconciler.replicas_changed(key))


@kopf.on.event(GROUP, VERSION, LORA_REPLICA.plural)
async def replica_report_event(type: str | None, namespace: str, name: str, spec: Any, status: Any,
                               memo: kopf.Memo, **_: Any) -> None:
    base = (namespace, spec.get("baseModel") or "")
    adapters = None if type == "DELETED" else dict(status.get("adapters") or {})
    await _guarded(memo, ("report", (namespace, name)),
                   lambda: memo.reconciler.report_changed(base, name, adapters))


async def owned_object_event(namespace: str, meta: Any, memo: kopf.Memo, **_: Any) -> None:
    """Someone changed or deleted what we own, or its status moved: converge the owner."""
    key = (namespace, owning_base_model(meta) or "")
    await _guarded(memo, ("owned", key), lambda: memo.reconciler.converge_owned_objects(key))


@kopf.on.event("", "v1", "configmaps", when=_owned_as("adapter_set"))
async def adapter_set_event(type: str | None, body: Any, namespace: str, meta: Any, memo: kopf.Memo,
                            **_: Any) -> None:
    """Mostly the echo of our own adapter-set write; otherwise someone edited or deleted it."""
    key = (namespace, owning_base_model(meta) or "")
    live = None if type == "DELETED" else _plain(body)
    await _guarded(memo, ("adapter-set", key), lambda: memo.reconciler.sync_adapter_set(key, live))


for _group, _version, _plural in OWNED_RESOURCES:
    kopf.on.event(_group, _version, _plural, when=_owned, id=f"owned-{_plural}")(owned_object_event)
# The endpoint picker's config; the InferencePool has no watch (its CRD may be absent): resyncs repair it.
kopf.on.event("", "v1", "configmaps", when=_owned_besides_adapter_set, id="owned-configmaps")(owned_object_event)
