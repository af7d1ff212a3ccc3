"""The PodStatus the local kubelet writes, built from what it knows: its containers' statuses once they run,
or why they cannot be configured yet. Every pod IP is the host's loopback here.
"""

from __future__ import annotations

from typing import Any


def config_error_status(manifest: dict[str, Any], message: str) -> dict[str, Any]:
    """A pod whose containers wait, as CreateContainerConfigError, for what `message` says is missing."""
    waiting = {"waiting": {"reason": "CreateContainerConfigError", "message": message}}
    return {"phase": "Pending", "hostIP": "127.0.0.1", "conditions": [
        {"type": "Ready", "status": "False", "reason": "ContainersNotReady", "message": message}],
        "containerStatuses": [{"name": c["name"], "image": c.get("image", ""), "imageID": "", "ready": False,
                               "restartCount": 0, "state": waiting} for c in manifest["spec"]["containers"]]}


def running_status(containers: list[dict[str, Any]], started_at: str, stamp: str,
                   ) -> tuple[dict[str, Any], dict[str, Any]]:
    """A started pod's status from its ContainerStatuses, with `stamp` as its conditions' transition time;
    and what of it to compare with the last status written, which the transition times are not part of."""
    ready = bool(containers) and all(c["ready"] for c in containers)
    running = any(c["state"].get("running") for c in containers)
    condition = "True" if ready else "False"
    status: dict[str, Any] = {
        "phase": "Running" if running else "Pending", "hostIP": "127.0.0.1", "podIP": "127.0.0.1",
        "hostIPs": [{"ip": "127.0.0.1"}], "podIPs": [{"ip": "127.0.0.1"}], "startTime": started_at,
        "conditions": [{"type": "Initialized", "status": "True"},
                       {"type": "ContainersReady", "status": condition},
                       {"type": "Ready", "status": condition}],
        "containerStatuses": containers,
    }
    comparable = {k: v for k, v in status.items() if k != "conditions"} | {"ready": ready}
    for item in status["conditions"]:
        item["lastTransitionTime"] = stamp
    return status, comparable
