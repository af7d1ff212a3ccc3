"""The local kubelet's Node: registered with its GPUs as extended resources and a Ready condition, and kept
alive as a kubelet keeps it, by renewing its Lease in kube-node-lease and re-posting its status less often.
"""

from __future__ import annotations

import datetime
import logging
import os
import threading

import kubernetes
from kubernetes.client.rest import ApiException

from loraplex.local.containers import now

logger = logging.getLogger(__name__)

NODE_LEASE_SECONDS = 40
LEASE_RENEW_SECONDS = 10


class LocalNode:
    def __init__(self, core: kubernetes.client.CoreV1Api, leases: kubernetes.client.CoordinationV1Api, name: str,
                 gpus: int, labels: dict[str, str] | None = None):
        self.core, self.leases, self.name, self.gpus = core, leases, name, gpus
        self.labels = {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux",
                       "kubernetes.io/arch": "amd64", "nvidia.com/gpu.present": "true", **(labels or {})}

    def register(self) -> None:
        node = {"metadata": {"name": self.name, "labels": self.labels}, "spec": {}}
        try:
            self.core.create_node(node)
        except ApiException as exc:
            if exc.status != 409:
                raise
            self.core.patch_node(self.name, {"metadata": {"labels": self.labels}})
        self.write_status()

    def write_status(self) -> None:
        resources = {"cpu": str(os.cpu_count() or 2), "memory": "64Gi", "pods": "110",
                     "ephemeral-storage": "100Gi", "nvidia.com/gpu": str(self.gpus)}
        stamp = now()
        conditions = [
            {"type": "Ready", "status": "True", "reason": "KubeletReady",
             "message": "the local process kubelet is posting ready status", "lastHeartbeatTime": stamp,
             "lastTransitionTime": stamp},
            *({"type": kind, "status": "False", "reason": f"KubeletHasNo{kind[:-8]}Pressure" if kind.endswith(
                "Pressure") else "KubeletReady", "message": "", "lastHeartbeatTime": stamp,
               "lastTransitionTime": stamp} for kind in ("MemoryPressure", "DiskPressure", "PIDPressure")),
        ]
        self.core.patch_node_status(self.name, {"status": {
            "capacity": resources, "allocatable": resources, "conditions": conditions,
            "addresses": [{"type": "InternalIP", "address": "127.0.0.1"},
                          {"type": "Hostname", "address": self.name}],
            "nodeInfo": {"kubeletVersion": "v1.36.2-loraplex-local", "operatingSystem": "linux",
                         "architecture": "amd64", "containerRuntimeVersion": "local-process://1",
                         "kernelVersion": os.uname().release, "osImage": "local", "kubeProxyVersion": "",
                         "machineID": "", "systemUUID": "", "bootID": ""},
        }})

    def renew_lease(self) -> None:
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        body = {"metadata": {"name": self.name, "namespace": "kube-node-lease"},
                "spec": {"holderIdentity": self.name, "leaseDurationSeconds": NODE_LEASE_SECONDS,
                         "renewTime": stamp}}
        try:
            self.leases.patch_namespaced_lease(self.name, "kube-node-lease", {"spec": body["spec"]})
        except ApiException as exc:
            if exc.status != 404:
                raise
            self.leases.create_namespaced_lease("kube-node-lease", body)

    def heartbeat(self, stop: threading.Event) -> None:
        """Renew the Lease until `stop` is set (run in a thread of its own)."""
        beats = 0
        while not stop.is_set():
            try:
                self.renew_lease()
                if beats % 6 == 0:  # the Ready condition's heartbeat, less often than the Lease, as a kubelet
                    self.write_status()
                beats += 1
            except (ApiException, OSError) as exc:
                logger.warning("node heartbeat failed: %s", exc)
            stop.wait(LEASE_RENEW_SECONDS)

    def delete(self) -> None:
        try:
            self.core.delete_node(self.name)
        except ApiException:
            pass
