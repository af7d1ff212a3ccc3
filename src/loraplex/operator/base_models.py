"""Pure status of a BaseModelDeployment from its Deployment and the adapters that target it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from loraplex.api.conditions import condition
from loraplex.api.types import AdapterPhase, BaseModelDeploymentSpec, BaseModelDeploymentStatus, ModelTraffic
from loraplex.operator.adapters import AdapterView
from loraplex.operator.naming import endpoint
from loraplex.operator.routing import routing_condition

# Container waiting reasons that mean the container cannot run as it is, rather than that it is starting.
FAILING_WAIT_REASONS = frozenset({"CrashLoopBackOff", "ErrImagePull", "ImagePullBackOff", "InvalidImageName",
                                  "CreateContainerConfigError", "CreateContainerError", "RunContainerError"})

# Reasons a BaseModelDeployment cannot run at all, with what its Ready condition says then.
UNDEPLOYABLE = {
    "InvalidSpec": "The spec cannot be deployed.",
    "InvalidName": "metadata.name cannot name the objects loraplex creates for it.",
}


def replica_problem(pod_status: Mapping[str, Any]) -> str | None:
    """Why a replica pod cannot serve, from its containers' statuses: a container the kubelet cannot start or
    keeps restarting, with how it last ended (the log lines its termination message carries). None when every
    container is running or still starting."""
    for container in pod_status.get("containerStatuses") or []:
        waiting = (container.get("state") or {}).get("waiting") or {}
        reason = waiting.get("reason")
        if reason not in FAILING_WAIT_REASONS:
            continue
        text = f"container {container.get('name')} is in {reason}"
        ended = (container.get("lastState") or {}).get("terminated")
        if ended:
            text += f", last exit code {ended.get('exitCode')}"
            lines = [line.strip() for line in str(ended.get("message") or "").splitlines() if line.strip()]
            if lines:
                text += f": {lines[-1][:300]}"
        elif waiting.get("message"):
            text += f": {waiting['message'][:300]}"
        return text
    return None


def base_model_status(body: dict[str, Any], spec: BaseModelDeploymentSpec | None,
                      problem: tuple[str, str] | None, deployment: dict[str, Any] | None,
                      adapters: list[AdapterView], phases: Mapping[str, str] | None = None,
                      replica_problems: Mapping[str, str] | None = None,
                      routing_problem: tuple[str, str] | None = None, picker: dict[str, Any] | None = None,
                      traffic: list[ModelTraffic] | None = None) -> dict[str, Any]:
    """Every operator-owned status field; conditions carry no transition times yet.

    `problem` is the (reason, message) of why the spec could not be applied, or None. `phases` are the
    adapters' phases by name as the operator last decided them, which its watch may not show yet.
    `replica_problems` are what keeps replica pods from serving, by pod name (replica_problem). `routing_problem`
    is what keeps routing from working (routing_runs.py) and `picker` the endpoint picker's Deployment, for the
    Routing condition; `traffic` the plan of shared model names (traffic.plan_traffic).
    """
    meta = body["metadata"]
    generation = int(meta.get("generation") or 1)
    phases = phases or {}

    def phase(adapter: AdapterView) -> str | None:
        return phases.get(adapter.name) or adapter.status.get("phase")

    live_adapters = [a for a in adapters if not a.deleting]
    ready_adapters = [a for a in live_adapters if phase(a) == AdapterPhase.READY.value]
    deployment_status = (deployment or {}).get("status") or {}
    replicas = int(deployment_status.get("replicas") or 0)
    ready = int(deployment_status.get("readyReplicas") or 0)
    wanted = spec.replicas if spec else 0

    named = problem is None or problem[0] != "InvalidName"  # else no Service can bear the name
    if problem is None:
        reconciled = condition("Reconciled", True, "Applied", "Owned objects match the spec.", generation)
    else:
        reconciled = condition("Reconciled", False, *problem, generation)

    if spec is None or (problem is not None and problem[0] in UNDEPLOYABLE and deployment is None):
        reason = problem[0] if problem is not None and problem[0] in UNDEPLOYABLE else "InvalidSpec"
        available = condition("Ready", False, reason, UNDEPLOYABLE[reason], generation)
    elif deployment is None:
        available = condition("Ready", False, "DeploymentMissing", "The Deployment does not exist yet.", generation)
    elif wanted == 0:
        available = condition("Ready", False, "ScaledToZero", "spec.replicas is 0.", generation)
    elif ready >= wanted:
        available = condition("Ready", True, "ReplicasReady", f"All {wanted} replica(s) are ready.", generation)
    elif replica_problems:
        first = min(replica_problems)
        others = f" ({len(replica_problems) - 1} more pod(s) failing)" if len(replica_problems) > 1 else ""
        available = condition("Ready", False, "ReplicasFailing", f"{ready} of {wanted} replica(s) are ready; "
                              f"pod {first}: {replica_problems[first]}{others}.", generation)
    else:
        available = condition("Ready", False, "ReplicasNotReady", f"{ready} of {wanted} replica(s) are ready.",
                              generation)

    if not live_adapters:
        adapters_ready = condition("AdaptersReady", True, "NoAdapters", "No LoraAdapter targets this model.",
                                   generation)
    elif len(ready_adapters) == len(live_adapters):
        adapters_ready = condition("AdaptersReady", True, "AllAdaptersReady",
                                   f"All {len(live_adapters)} adapter(s) are Ready.", generation)
    else:
        not_ready = sorted(a.name for a in live_adapters if phase(a) != AdapterPhase.READY.value)
        shown = ", ".join(not_ready[:5]) + (f" and {len(not_ready) - 5} more" if len(not_ready) > 5 else "")
        adapters_ready = condition("AdaptersReady", False, "AdaptersNotReady",
                                   f"{len(ready_adapters)} of {len(live_adapters)} adapter(s) are Ready; "
                                   f"not ready: {shown}.", generation)

    routing = routing_condition(spec, routing_problem, picker, meta["name"], generation)
    return BaseModelDeploymentStatus(
        observed_generation=generation, replicas=replicas, ready_replicas=ready, adapters=len(live_adapters),
        adapters_ready=len(ready_adapters),
        # Given even when None, so the reconciler removes an endpoint that no longer holds.
        endpoint=endpoint(meta["name"], meta["namespace"], spec.port) if spec and named else None,
        conditions=[reconciled, available, adapters_ready, *([routing] if routing else [])],
        traffic=traffic or None,
    ).to_patch()
