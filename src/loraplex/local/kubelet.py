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
"""

from __future__ import annotations

import base64
import datetime
import logging
import os
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kubernetes
import urllib3
from kubernetes.client.rest import ApiException

from loraplex.local.containers import LocalContainer, Probe, now
from loraplex.local.controlplane import free_port

logger = logging.getLogger(__name__)

NODE_LEASE_SECONDS = 40
LEASE_RENEW_SECONDS = 10
SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
TERMINAL_PHASES = ("Succeeded", "Failed")
HELD_RETRY_SECONDS = 2.0
# Commands a runtime image would provide, for the programs installed on this machine (`vllm serve`).
LAUNCHERS = Path(__file__).parent / "launchers"


class ConfigError(Exception):
    """What keeps a container from starting (a missing Secret, say): its waiting message."""


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
        self.labels = {"kubernetes.io/hostname": node_name, "kubernetes.io/os": "linux",
                       "kubernetes.io/arch": "amd64", "nvidia.com/gpu.present": "true", **(labels or {})}
        self.extra_env = extra_env or {}
        self.restart_backoff_seconds, self.tick_seconds = restart_backoff_seconds, tick_seconds
        configuration = kubernetes.client.Configuration()
        kubernetes.config.load_kube_config(str(kubeconfig), client_configuration=configuration)
        self.api_host = configuration.host
        self.ca_file = configuration.ssl_ca_cert
        self.client = kubernetes.client.ApiClient(configuration)
        self.client.user_agent = f"loraplex-local-kubelet/{node_name}"
        self.core = kubernetes.client.CoreV1Api(self.client)
        self.leases = kubernetes.client.CoordinationV1Api(self.client)
        self.pods: dict[str, LocalPod] = {}  # by uid
        self._bound: dict[str, dict[str, Any]] = {}  # uid -> pod as last listed
        self._terminating: set[str] = set()
        self._finishing: list[threading.Thread] = []
        self._held: dict[str, tuple[str, float]] = {}  # uid -> (why its containers cannot start, next try)
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run_pods, name=f"kubelet-{node_name}", daemon=True),
                         threading.Thread(target=self._heartbeat, name=f"lease-{node_name}", daemon=True)]

    # ---- control ------------------------------------------------------------------------------------------

    def start(self) -> ProcessKubelet:
        if os.geteuid() != 0:
            raise PermissionError("the local kubelet mounts each container's volumes at their paths in a private "
                                  "mount namespace, which needs root")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._register_node()
        try:  # a started kubelet holds its Lease already; the heartbeat renews it
            self._renew_lease()
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
            try:
                self.core.delete_node(self.node_name)
            except ApiException:
                pass
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

    # ---- the Node and its Lease -----------------------------------------------------------------------------

    def _register_node(self) -> None:
        node = {"metadata": {"name": self.node_name, "labels": self.labels}, "spec": {}}
        try:
            self.core.create_node(node)
        except ApiException as exc:
            if exc.status != 409:
                raise
            self.core.patch_node(self.node_name, {"metadata": {"labels": self.labels}})
        self._write_node_status()

    def _write_node_status(self) -> None:
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
        self.core.patch_node_status(self.node_name, {"status": {
            "capacity": resources, "allocatable": resources, "conditions": conditions,
            "addresses": [{"type": "InternalIP", "address": "127.0.0.1"},
                          {"type": "Hostname", "address": self.node_name}],
            "nodeInfo": {"kubeletVersion": "v1.36.2-loraplex-local", "operatingSystem": "linux",
                         "architecture": "amd64", "containerRuntimeVersion": "local-process://1",
                         "kernelVersion": os.uname().release, "osImage": "local", "kubeProxyVersion": "",
                         "machineID": "", "systemUUID": "", "bootID": ""},
        }})

    def _renew_lease(self) -> None:
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        body = {"metadata": {"name": self.node_name, "namespace": "kube-node-lease"},
                "spec": {"holderIdentity": self.node_name, "leaseDurationSeconds": NODE_LEASE_SECONDS,
                         "renewTime": stamp}}
        try:
            self.leases.patch_namespaced_lease(self.node_name, "kube-node-lease", {"spec": body["spec"]})
        except ApiException as exc:
            if exc.status != 404:
                raise
            self.leases.create_namespaced_lease("kube-node-lease", body)

    def _heartbeat(self) -> None:
        beats = 0
        while not self._stop.is_set():
            try:
                self._renew_lease()
                if beats % 6 == 0:  # the Ready condition's heartbeat, less often than the Lease, as a kubelet
                    self._write_node_status()
                beats += 1
            except (ApiException, OSError) as exc:
                logger.warning("node heartbeat failed: %s", exc)
            self._stop.wait(LEASE_RENEW_SECONDS)

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
            volumes = pod.volumes = self._volumes(manifest, root)
            for container in spec["containers"]:
                pod.containers[container["name"]] = self._container(manifest, container, volumes, pod)
        except ConfigError as exc:
            self.pods.pop(pod.uid)
            shutil.rmtree(root, ignore_errors=True)
            self._hold(manifest, str(exc))
            return
        self._held.pop(pod.uid, None)
        for container in pod.containers.values():
            container.start()
        logger.info("started pod %s/%s", pod.namespace, pod.name)

    def _container(self, manifest: dict[str, Any], container: dict[str, Any], volumes: dict[str, Path],
                   pod: LocalPod) -> LocalContainer:
        def port_of(port: int | str) -> int:
            if isinstance(port, str):
                port = next(p["containerPort"] for p in container.get("ports", []) if p.get("name") == port)
            return pod.ports.get(int(port), int(port))

        rewrite = _PortRewriter(pod.ports)
        env = {"PATH": f"{Path(sys.executable).parent}:{LAUNCHERS}:/usr/local/bin:/usr/bin:/bin", "HOME": "/tmp",
               "LANG": "C.UTF-8", "HOSTNAME": pod.name, **self._service_environment(), **self.extra_env}
        for source in container.get("envFrom", []):
            env.update(self._env_from(manifest["metadata"]["namespace"], source))
        for item in container.get("env", []):
            env[item["name"]] = rewrite(self._env_value(manifest, item))
        argv = [rewrite(part) for part in [*container.get("command", []), *container.get("args", [])]]
        if not argv:
            raise ConfigError(f"container {container['name']} has no command: images are not run here, "
                              f"only commands")
        mounts = []
        for mount in container.get("volumeMounts", []):
            if mount["name"] not in volumes:
                raise ConfigError(f"volume {mount['name']} of container {container['name']} is not defined")
            source = volumes[mount["name"]] / mount.get("subPath", "")
            if mount.get("subPath") and not source.exists():
                source.mkdir(parents=True)
            mounts.append({"source": str(source), "target": mount["mountPath"],
                           "readOnly": bool(mount.get("readOnly"))})
        return LocalContainer(
            container["name"], container.get("image", ""), argv, env, mounts,
            pod.root / f"{container['name']}.log",
            readiness=Probe.from_spec(container.get("readinessProbe"), port_of),
            liveness=Probe.from_spec(container.get("livenessProbe"), port_of),
            startup=Probe.from_spec(container.get("startupProbe"), port_of),
            initial_backoff=self.restart_backoff_seconds,
            termination_message_policy=container.get("terminationMessagePolicy", "File"))

    def _service_environment(self) -> dict[str, str]:
        """What in-cluster clients look for: the `kubernetes` Service, here the apiserver on loopback."""
        host, _, port = self.api_host.removeprefix("https://").partition(":")
        return {"KUBERNETES_SERVICE_HOST": host, "KUBERNETES_SERVICE_PORT": port or "443",
                "KUBERNETES_SERVICE_PORT_HTTPS": port or "443", "KUBERNETES_PORT": f"tcp://{host}:{port}"}

    # ---- env and volumes -------------------------------------------------------------------------------------

    def _secret(self, namespace: str, name: str, optional: bool) -> dict[str, str] | None:
        try:
            secret = self.core.read_namespaced_secret(name, namespace)
        except ApiException as exc:
            if exc.status == 404 and optional:
                return None
            if exc.status == 404:
                raise ConfigError(f'secret "{name}" not found') from None
            raise
        return {k: base64.b64decode(v).decode() for k, v in (secret.data or {}).items()}

    def _config_map(self, namespace: str, name: str, optional: bool) -> dict[str, str] | None:
        try:
            return dict(self.core.read_namespaced_config_map(name, namespace).data or {})
        except ApiException as exc:
            if exc.status == 404 and optional:
                return None
            if exc.status == 404:
                raise ConfigError(f'configmap "{name}" not found') from None
            raise

    def _env_from(self, namespace: str, source: dict[str, Any]) -> dict[str, str]:
        prefix = source.get("prefix", "")
        if "secretRef" in source:
            ref = source["secretRef"]
            data = self._secret(namespace, ref["name"], bool(ref.get("optional")))
        elif "configMapRef" in source:
            ref = source["configMapRef"]
            data = self._config_map(namespace, ref["name"], bool(ref.get("optional")))
        else:
            data = None
        return {f"{prefix}{key}": value for key, value in (data or {}).items()}

    def _env_value(self, manifest: dict[str, Any], item: dict[str, Any]) -> str:
        if "valueFrom" not in item:
            return str(item.get("value", ""))
        source, namespace = item["valueFrom"], manifest["metadata"]["namespace"]
        if "fieldRef" in source:
            return _field(manifest, source["fieldRef"]["fieldPath"])
        for kind, read in (("secretKeyRef", self._secret), ("configMapKeyRef", self._config_map)):
            if kind in source:
                ref = source[kind]
                data = read(namespace, ref["name"], bool(ref.get("optional")))
                if data is None or ref["key"] not in data:
                    if ref.get("optional"):
                        return ""
                    raise ConfigError(f"couldn't find key {ref['key']} in {kind[:-6]} {namespace}/{ref['name']}")
                return data[ref["key"]]
        return ""

    def _volumes(self, manifest: dict[str, Any], root: Path) -> dict[str, Path]:
        namespace = manifest["metadata"]["namespace"]
        paths = {}
        for volume in manifest["spec"].get("volumes", []):
            path = root / "volumes" / volume["name"]
            if "persistentVolumeClaim" in volume:
                path = self._claimed_path(namespace, volume["persistentVolumeClaim"]["claimName"])
            elif "hostPath" in volume:
                path = Path(volume["hostPath"]["path"])
            elif "configMap" in volume or "secret" in volume:
                path.mkdir(parents=True, exist_ok=True)
                self._write_keys(namespace, volume, path)
            elif "projected" in volume:
                path.mkdir(parents=True, exist_ok=True)
                for source in volume["projected"].get("sources", []):
                    self._project(manifest, source, path)
            else:  # emptyDir, and anything else a directory can stand in for
                path.mkdir(parents=True, exist_ok=True)
            paths[volume["name"]] = path
        return paths

    def _claimed_path(self, namespace: str, claim_name: str) -> Path:
        """The directory behind a claim: its bound PersistentVolume's hostPath or local path."""
        try:
            claim = self.core.read_namespaced_persistent_volume_claim(claim_name, namespace)
        except ApiException as exc:
            if exc.status == 404:
                raise ConfigError(f'persistentvolumeclaim "{claim_name}" not found') from None
            raise
        if not claim.spec.volume_name:
            raise ConfigError(f'persistentvolumeclaim "{claim_name}" is not bound')
        volume = self.core.read_persistent_volume(claim.spec.volume_name)
        source = volume.spec.host_path or volume.spec.local
        if source is None:
            raise ConfigError(f"persistentvolume {claim.spec.volume_name} is neither hostPath nor local")
        return Path(source.path)

    def _write_keys(self, namespace: str, volume: dict[str, Any], path: Path) -> None:
        if "configMap" in volume:
            ref = volume["configMap"]
            data = self._config_map(namespace, ref["name"], bool(ref.get("optional")))
        else:
            ref = volume["secret"]
            data = self._secret(namespace, ref["secretName"], bool(ref.get("optional")))
        _write_items(path, data or {}, ref.get("items"))

    def _project(self, manifest: dict[str, Any], source: dict[str, Any], path: Path) -> None:
        meta, namespace = manifest["metadata"], manifest["metadata"]["namespace"]
        if "serviceAccountToken" in source:
            token = source["serviceAccountToken"]
            request = {"spec": {"audiences": [token["audience"]] if token.get("audience") else None,
                                "expirationSeconds": int(token.get("expirationSeconds", 3607)),
                                "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": meta["name"],
                                                   "uid": meta["uid"]}}}
            response = self.core.create_namespaced_service_account_token(
                manifest["spec"].get("serviceAccountName", "default"), namespace, request)
            (path / token["path"]).write_text(response.status.token)
        elif "configMap" in source:
            ref = source["configMap"]
            _write_items(path, self._config_map(namespace, ref["name"], bool(ref.get("optional"))) or {},
                         ref.get("items"))
        elif "secret" in source:
            ref = source["secret"]
            _write_items(path, self._secret(namespace, ref["name"], bool(ref.get("optional"))) or {},
                         ref.get("items"))
        elif "downwardAPI" in source:
            for item in source["downwardAPI"].get("items", []):
                if "fieldRef" in item:
                    (path / item["path"]).write_text(_field(manifest, item["fieldRef"]["fieldPath"]))

    # ---- status ----------------------------------------------------------------------------------------------

    def _hold(self, manifest: dict[str, Any], message: str) -> None:
        """Containers that cannot be configured yet wait, and say why, as CreateContainerConfigError."""
        meta = manifest["metadata"]
        previous = self._held.get(meta["uid"], ("", 0.0))[0]
        self._held[meta["uid"]] = (message, time.monotonic() + HELD_RETRY_SECONDS)
        if previous == message:
            return
        logger.warning("pod %s/%s cannot start: %s", meta["namespace"], meta["name"], message)
        waiting = {"waiting": {"reason": "CreateContainerConfigError", "message": message}}
        status = {"phase": "Pending", "hostIP": "127.0.0.1", "conditions": [
            {"type": "Ready", "status": "False", "reason": "ContainersNotReady", "message": message}],
            "containerStatuses": [{"name": c["name"], "image": c.get("image", ""), "imageID": "", "ready": False,
                                   "restartCount": 0, "state": waiting} for c in manifest["spec"]["containers"]]}
        try:
            self.core.patch_namespaced_pod_status(meta["name"], meta["namespace"], {"status": status})
        except ApiException as exc:
            logger.warning("status of pod %s/%s not written: %s", meta["namespace"], meta["name"], exc.reason)

    def _report(self, pod: LocalPod) -> None:
        containers = [c.status() for c in pod.containers.values()]
        ready = bool(containers) and all(c["ready"] for c in containers)
        running = any(c["state"].get("running") for c in containers)
        condition = "True" if ready else "False"
        status: dict[str, Any] = {
            "phase": "Running" if running else "Pending", "hostIP": "127.0.0.1", "podIP": "127.0.0.1",
            "hostIPs": [{"ip": "127.0.0.1"}], "podIPs": [{"ip": "127.0.0.1"}], "startTime": pod.started_at,
            "conditions": [{"type": "Initialized", "status": "True"},
                           {"type": "ContainersReady", "status": condition},
                           {"type": "Ready", "status": condition}],
            "containerStatuses": containers,
        }
        comparable = {k: v for k, v in status.items() if k != "conditions"} | {"ready": ready}
        if comparable == pod.reported:
            return
        stamp = now()
        for item in status["conditions"]:
            item["lastTransitionTime"] = stamp
        try:
            self.core.patch_namespaced_pod_status(pod.name, pod.namespace, {"status": status})
            pod.reported = comparable
        except ApiException as exc:
            if exc.status != 404:
                logger.warning("status of pod %s/%s not written: %s", pod.namespace, pod.name, exc.reason)


def _field(manifest: dict[str, Any], path: str) -> str:
    meta, spec = manifest["metadata"], manifest["spec"]
    simple = {"metadata.name": meta["name"], "metadata.namespace": meta["namespace"], "metadata.uid": meta["uid"],
              "spec.nodeName": spec.get("nodeName", ""), "spec.serviceAccountName": spec.get("serviceAccountName", ""),
              "status.podIP": "127.0.0.1", "status.hostIP": "127.0.0.1"}
    if path in simple:
        return str(simple[path])
    for prefix, values in (("metadata.labels", meta.get("labels") or {}),
                           ("metadata.annotations", meta.get("annotations") or {})):
        if path.startswith(f"{prefix}['") and path.endswith("']"):
            return str(values.get(path[len(prefix) + 2:-2], ""))
    raise ConfigError(f"fieldPath {path} is not supported by the local kubelet")


def _write_items(path: Path, data: dict[str, str], items: list[dict[str, Any]] | None) -> None:
    chosen = {item["key"]: item["path"] for item in items} if items else {key: key for key in data}
    for key, relative in chosen.items():
        if key in data:
            target = path / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(data[key])


class _PortRewriter:
    """Container ports in a value, as the host sees them (pods share the host's loopback here)."""

    def __init__(self, ports: dict[int, int]):
        self.ports = ports

    def __call__(self, value: str) -> str:
        if value.isdigit() and int(value) in self.ports:
            return str(self.ports[int(value)])
        for container_port, host_port in self.ports.items():
            for host in ("127.0.0.1", "localhost", "0.0.0.0"):
                value = value.replace(f"{host}:{container_port}", f"127.0.0.1:{host_port}")
        return value
