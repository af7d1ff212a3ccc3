"""A kubelet for machines without a container runtime: it registers a Node (with GPUs as extended
resources), keeps its Lease renewed, and runs the containers of the pods the real scheduler binds to it as
local processes, writing their status back as a kubelet does.

What a container gets, as in a real pod: its environment (values, fieldRefs, Secrets and ConfigMaps), its
volumes at their mount paths (a private mount namespace per container, so this needs root), the pod's
ServiceAccount token from the TokenRequest API at /var/run/secrets/kubernetes.io/serviceaccount, probes,
restarts with back-off, and graceful termination. What it does not get: an image (commands run from this
machine's PATH, so images are not pulled) and a network of its own. Pods share the host's loopback, so
each container port is mapped to a free host port, and arguments and environment values that name a
container port are rewritten to it (`port_of` tells tests and the demo where a pod listens).

This module is the pod lifecycle: the watch of the pods bound here, admission, the sync loop and termination.
The Node and its Lease are node.py's, what each container runs with pod_config.py's, and the status written
pod_status.py's.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kubernetes
import urllib3
from kubernetes.client.rest import ApiException

from loraplex.local.containers import LocalContainer, now
from loraplex.local.controlplane import free_port
from loraplex.local.node import LocalNode
from loraplex.local.pod_config import ConfigError, PodConfig
from loraplex.local.pod_status import config_error_status, running_status

logger = logging.getLogger(__name__)

SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
TERMINAL_PHASES = ("Succeeded", "Failed")
HELD_RETRY_SECONDS = 2.0


@dataclass
class LocalPod:
    namespace: str
    name: str
    uid: str
    root: Path
    ports: dict[int, int]
    containers: dict[str, LocalContainer]
    grace_seconds: float
    started_at: str
    volumes: dict[str, Path] = field(default_factory=dict)
    reported: dict[str, Any] | None = None


class ProcessKubelet:
    def __init__(self, kubeconfig: Path, workdir: Path, node_name: str = "local-gpu-node", gpus: int = 8,
                 labels: dict[str, str] | None = None, extra_env: dict[str, str] | None = None,
                 restart_backoff_seconds: float = 10.0, tick_seconds: float = 0.25):
        self.workdir, self.node_name, self.gpus = workdir, node_name, gpus
        self.extra_env = extra_env or {}
        self.restart_backoff_seconds, self.tick_seconds = restart_backoff_seconds, tick_seconds
        configuration = kubernetes.client.Configuration()
        kubernetes.config.load_kube_config(str(kubeconfig), client_configuration=configuration)
        self.api_host = configuration.host
        self.ca_file = configuration.ssl_ca_cert
        self.client = kubernetes.client.ApiClient(configuration)
        self.client.user_agent = f"loraplex-local-kubelet/{node_name}"
        self.core = kubernetes.client.CoreV1Api(self.client)
        self.node = LocalNode(self.core, kubernetes.client.CoordinationV1Api(self.client), node_name, gpus, labels)
        self.config = PodConfig(self.core, self.api_host, self.extra_env, restart_backoff_seconds)
        self.pods: dict[str, LocalPod] = {}  # by uid
        self._bound: dict[str, dict[str, Any]] = {}  # uid -> pod as last listed
        self._terminating: set[str] = set()
        self._finishing: list[threading.Thread] = []
        self._held: dict[str, tuple[str, float]] = {}  # uid -> (why its containers cannot start, next try)
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run_pods, name=f"kubelet-{node_name}", daemon=True),
                         threading.Thread(target=self.node.heartbeat, args=(self._stop,), name=f"lease-{node_name}",
                                          daemon=True)]

    # ---- control ------------------------------------------------------------------------------------------

    def start(self) -> ProcessKubelet:
        if os.geteuid() != 0:
            raise PermissionError("the local kubelet mounts each container's volumes at their paths in a private "
                                  "mount namespace, which needs root")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.node.register()
        try:  # a started kubelet holds its Lease already; the heartbeat renews it
            self.node.renew_lease()
        except ApiException as exc:
            logger.warning("node lease not written yet: %s", exc.reason)
        for thread in self._threads:
            thread.start()
        return self

    def stop(self, delete_node: bool = True) -> None:
        self._stop.set()
        for thread in [*self._threads, *self._finishing]:
            thread.join(timeout=30)
        with self._lock:
            for pod in list(self.pods.values()):
                self._stop_pod(pod, grace_seconds=min(pod.grace_seconds, 5))
        if delete_node:
            self.node.delete()
        self.client.close()

    def _running(self, namespace: str, pod_name: str) -> LocalPod:
        for pod in self.pods.values():
            if (pod.namespace, pod.name) == (namespace, pod_name):
                return pod
        raise KeyError(f"pod {namespace}/{pod_name} is not running on {self.node_name}")

    def port_of(self, namespace: str, pod_name: str, container_port: int) -> int:
        """The host port where `container_port` of a running pod listens."""
        with self._lock:
            return self._running(namespace, pod_name).ports[container_port]

    def url(self, namespace: str, pod_name: str, container_port: int) -> str:
        return f"http://127.0.0.1:{self.port_of(namespace, pod_name, container_port)}"

    def volume_path(self, namespace: str, pod_name: str, volume: str) -> Path:
        """Where a running pod's volume lives on this machine."""
        with self._lock:
            return self._running(namespace, pod_name).volumes[volume]

    def logs(self, namespace: str, pod_name: str, container: str) -> str:
        """What `kubectl logs` would show (this kubelet serves no API of its own)."""
        with self._lock:
            return self._running(namespace, pod_name).containers[container].log.read_text(errors="replace")

    def running_pods(self, namespace: str | None = None) -> list[str]:
        with self._lock:
            return sorted(p.name for p in self.pods.values() if namespace in (None, p.namespace))

    def kill_container(self, namespace: str, pod_name: str, container: str) -> None:
        """SIGKILL one container, as an OOM kill would; it restarts as restartPolicy Always says."""
        with self._lock:
            self._running(namespace, pod_name).containers[container].signal(signal.SIGKILL)

    # ---- pods ------------------------------------------------------------------------------------------------

    def _run_pods(self) -> None:
        watcher = threading.Thread(target=self._watch_pods, name=f"pod-watch-{self.node_name}", daemon=True)
        watcher.start()
        while not self._stop.is_set():
            try:
                self._sync()
            except (ApiException, OSError) as exc:
                logger.warning("pod sync failed: %s", exc)
            self._stop.wait(self.tick_seconds)

    def _watch_pods(self) -> None:
        selector = f"spec.nodeName={self.node_name}"
        while not self._stop.is_set():
            try:
                listed = self.core.list_pod_for_all_namespaces(field_selector=selector)
                with self._lock:
                    self._bound = {p.metadata.uid: self.client.sanitize_for_serialization(p) for p in listed.items}
                stream = kubernetes.watch.Watch().stream(
                    self.core.list_pod_for_all_namespaces, field_selector=selector,
                    resource_version=listed.metadata.resource_version, timeout_seconds=60)
                for event in stream:
                    if self._stop.is_set():
                        return
                    pod = self.client.sanitize_for_serialization(event["object"])
                    with self._lock:
                        if event["type"] == "DELETED":
                            self._bound.pop(pod["metadata"]["uid"], None)
                        else:
                            self._bound[pod["metadata"]["uid"]] = pod
            except (ApiException, OSError, ValueError, urllib3.exceptions.HTTPError) as exc:
                logger.info("pod watch ended (%s); listing again", exc)
                self._stop.wait(1)

    def _sync(self) -> None:
        with self._lock:
            bound = dict(self._bound)
            for uid, pod in list(self.pods.items()):
                if uid not in bound:  # deleted outright (grace 0, or its Node went): nothing to report to
                    self._stop_pod(pod, grace_seconds=0)
            for uid, manifest in bound.items():
                meta = manifest["metadata"]
                if meta.get("deletionTimestamp"):
                    self._terminate(uid, manifest)
                elif uid not in self.pods and (manifest.get("status") or {}).get("phase") not in TERMINAL_PHASES \
                        and self._held.get(uid, ("", 0.0))[1] <= time.monotonic():
                    self._admit(manifest)
            for pod in self.pods.values():
                changed = [container.tick() for container in pod.containers.values()]
                if any(changed) or pod.reported is None:
                    self._report(pod)

    def _terminate(self, uid: str, manifest: dict[str, Any]) -> None:
        if uid in self._terminating:
            return
        self._terminating.add(uid)
        thread = threading.Thread(target=self._finish_pod, args=(uid, manifest), daemon=True)
        self._finishing.append(thread)
        thread.start()

    def _finish_pod(self, uid: str, manifest: dict[str, Any]) -> None:
        """Graceful termination off the sync loop: the grace period may be long, other pods go on."""
        with self._lock:
            pod = self.pods.pop(uid, None)
        if pod is not None:
            grace = (manifest["metadata"].get("deletionGracePeriodSeconds") or pod.grace_seconds)
            self._stop_pod(pod, grace_seconds=float(grace))
        meta = manifest["metadata"]
        try:  # the kubelet has the last word: the object goes once the containers are gone
            # Options in the body: the apiserver ignores the query's grace period when a body is sent.
            self.core.delete_namespaced_pod(meta["name"], meta["namespace"],
                                            body={"gracePeriodSeconds": 0, "preconditions": {"uid": uid}})
        except ApiException as exc:
            if exc.status not in (404, 409):
                logger.warning("pod %s/%s not deleted: %s", meta["namespace"], meta["name"], exc.reason)
        except (OSError, urllib3.exceptions.HTTPError) as exc:
            logger.warning("pod %s/%s not deleted: %s", meta["namespace"], meta["name"], exc)
        finally:
            with self._lock:
                self._bound.pop(uid, None)
                self._terminating.discard(uid)

    def _stop_pod(self, pod: LocalPod, grace_seconds: float) -> None:
        for container in pod.containers.values():
            container.signal(signal.SIGTERM)
        for container in pod.containers.values():
            container.stop(grace_seconds)
        with self._lock:
            self.pods.pop(pod.uid, None)
        shutil.rmtree(pod.root, ignore_errors=True)

    def _admit(self, manifest: dict[str, Any]) -> None:
        meta, spec = manifest["metadata"], manifest["spec"]
        root = self.workdir / "pods" / f"{meta['namespace']}_{meta['name']}_{meta['uid'][:8]}"
        root.mkdir(parents=True, exist_ok=True)
        ports = {p["containerPort"]: free_port() for c in spec["containers"] for p in c.get("ports", [])}
        pod = LocalPod(meta["namespace"], meta["name"], meta["uid"], root, ports, {},
                       float(spec.get("terminationGracePeriodSeconds", 30)), now())
        self.pods[pod.uid] = pod
        try:
            volumes = pod.volumes = self.config.volumes(manifest, root)
            for container in spec["containers"]:
                pod.containers[container["name"]] = self.config.container(manifest, container, volumes, root, ports)
        except ConfigError as exc:
            self.pods.pop(pod.uid)
            shutil.rmtree(root, ignore_errors=True)
            self._hold(manifest, str(exc))
            return
        self._held.pop(pod.uid, None)
        for container in pod.containers.values():
            container.start()
        logger.info("started pod %s/%s", pod.namespace, pod.name)

    # ---- status ----------------------------------------------------------------------------------------------

    def _hold(self, manifest: dict[str, Any], message: str) -> None:
        """Containers that cannot be configured yet wait, and say why, as CreateContainerConfigError."""
        meta = manifest["metadata"]
        previous = self._held.get(meta["uid"], ("", 0.0))[0]
        self._held[meta["uid"]] = (message, time.monotonic() + HELD_RETRY_SECONDS)
        if previous == message:
            return
        logger.warning("pod %s/%s cannot start: %s", meta["namespace"], meta["name"], message)
        try:
            self.core.patch_namespaced_pod_status(meta["name"], meta["namespace"],
                                                  {"status": config_error_status(manifest, message)})
        except ApiException as exc:
            logger.warning("status of pod %s/%s not written: %s", meta["namespace"], meta["name"], exc.reason)

    def _report(self, pod: LocalPod) -> None:
        status, comparable = running_status([c.status() for c in pod.containers.values()], pod.started_at, now())
        if comparable == pod.reported:
            return
        try:
            self.core.patch_namespaced_pod_status(pod.name, pod.namespace, {"status": status})
            pod.reported = comparable
        except ApiException as exc:
            if exc.status != 404:
                logger.warning("status of pod %s/%s not written: %s", pod.namespace, pod.name, exc.reason)
