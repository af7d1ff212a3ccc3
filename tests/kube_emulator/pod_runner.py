"""A kubelet and Deployment controller for the emulator: rendered Deployments become local processes.

For each replica it creates a Pod object, starts every container's command with the environment,
arguments and volumes of the pod spec, probes readiness, writes pod and Deployment status, and
restarts containers that exit. Nothing here knows about loraplex; it runs what the pod spec says.

One machine cannot give each pod its own network namespace and file system, so two things are
translated, the way a kubelet's port mapping and bind mounts would: container ports become free
loopback ports (values in args and env that name a container port are rewritten), and mount paths
become folders under the runner's work directory (values that start with a mount path are rewritten).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path
from typing import Any

import kubernetes
from kubernetes.client.rest import ApiException


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def template_hash(template: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(template, sort_keys=True).encode()).hexdigest()[:10]


@dataclasses.dataclass
class Container:
    name: str
    argv: list[str]
    env: dict[str, str]
    ready_url: str | None
    log: Path
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0

    def start(self) -> None:
        self.process = subprocess.Popen(self.argv, env=self.env, stdout=self.log.open("ab"),
                                        stderr=subprocess.STDOUT, start_new_session=True)

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def ready(self) -> bool:
        if not self.running():
            return False
        if self.ready_url is None:
            return True
        try:
            with urllib.request.urlopen(self.ready_url, timeout=2) as response:
                return 200 <= response.status < 400
        except OSError:
            return False

    def kill(self) -> None:
        if self.running():
            assert self.process is not None
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)


@dataclasses.dataclass
class Pod:
    name: str
    namespace: str
    deployment: str
    template: str
    containers: dict[str, Container]
    root: Path
    ports: dict[int, int]
    ready: bool = False
    reported: dict[str, Any] | None = None


class PodRunner:
    def __init__(self, kubeconfig: Path, workdir: Path, namespace: str = "default", poll_seconds: float = 0.5,
                 extra_env: dict[str, str] | None = None):
        self.kubeconfig, self.workdir, self.namespace = kubeconfig, workdir, namespace
        self.poll_seconds = poll_seconds
        self.extra_env = extra_env or {}
        configuration = kubernetes.client.Configuration()
        kubernetes.config.load_kube_config(str(kubeconfig), client_configuration=configuration)
        self.api = kubernetes.client.ApiClient(configuration)
        self.core = kubernetes.client.CoreV1Api(self.api)
        self.apps = kubernetes.client.AppsV1Api(self.api)
        self.pods: dict[str, Pod] = {}
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="pod-runner", daemon=True)

    # ---- control --------------------------------------------------------------------------------------

    def start(self) -> PodRunner:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        with self._lock:
            for pod in list(self.pods.values()):
                self._terminate(pod)

    def pods_of(self, deployment: str) -> list[Pod]:
        with self._lock:
            return sorted((p for p in self.pods.values() if p.deployment == deployment), key=lambda p: p.name)

    def kill(self, pod_name: str, container: str) -> None:
        """SIGKILL one container, as an OOM kill would; the runner restarts it like the kubelet."""
        with self._lock:
            self.pods[pod_name].containers[container].kill()

    def url(self, pod_name: str, container_port: int) -> str:
        return f"http://127.0.0.1:{self.pods[pod_name].ports[container_port]}"

    # ---- the loop ----------------------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._sync()
            except (ApiException, OSError) as exc:
                print(f"pod runner: {exc}", file=sys.stderr)
            self._stop.wait(self.poll_seconds)

    def _sync(self) -> None:
        deployments = {d.metadata.name: d for d in self.apps.list_namespaced_deployment(self.namespace).items}
        with self._lock:
            for pod in list(self.pods.values()):
                deployment = deployments.get(pod.deployment)
                if deployment is None or template_hash(self._template(deployment)) != pod.template:
                    self._terminate(pod)
            for name, deployment in deployments.items():
                running = self.pods_of(name)
                wanted = deployment.spec.replicas or 0
                for pod in running[wanted:]:
                    self._terminate(pod)
                for _ in range(wanted - len(running)):
                    self._start(deployment)
            for pod in self.pods.values():
                for container in pod.containers.values():
                    if not container.running():  # restartPolicy: Always
                        container.restarts += 1
                        container.start()
                self._report_pod(pod)
            for name, deployment in deployments.items():
                pods = self.pods_of(name)
                ready = sum(1 for pod in pods if pod.ready)
                status = {"replicas": len(pods), "readyReplicas": ready, "availableReplicas": ready,
                          "updatedReplicas": len(pods), "observedGeneration": deployment.metadata.generation}
                current = deployment.status.to_dict() if deployment.status else {}
                if any(current.get(_snake(k)) != v for k, v in status.items()):
                    self.apps.patch_namespaced_deployment_status(name, self.namespace, {"status": status})

    def _template(self, deployment: Any) -> dict[str, Any]:
        return self.api.sanitize_for_serialization(deployment.spec.template)

    # ---- one pod -------------------------------------------------------------------------------------------

    def _start(self, deployment: Any) -> None:
        template = self._template(deployment)
        digest = template_hash(template)
        name = f"{deployment.metadata.name}-{digest[:6]}-{secrets.token_hex(3)[:5]}"
        spec = template["spec"]
        root = self.workdir / "pods" / name
        root.mkdir(parents=True)
        ports = {port["containerPort"]: _free_port() for c in spec["containers"] for port in c.get("ports", [])}
        volumes = self._volumes(spec.get("volumes", []), root)
        mounts: dict[str, Path] = {}
        for container in spec["containers"]:
            for mount in container.get("volumeMounts", []):
                target = volumes[mount["name"]] / mount.get("subPath", "")
                target.mkdir(parents=True, exist_ok=True)
                mounts[mount["mountPath"]] = target
        self.core.create_namespaced_pod(self.namespace, {
            "metadata": {"name": name, "labels": template["metadata"].get("labels", {}),
                         "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment",
                                              "name": deployment.metadata.name, "uid": deployment.metadata.uid,
                                              "controller": True}]},
            "spec": spec,
        })
        containers = {}
        for container in spec["containers"]:
            rewrite = _Rewriter(mounts, ports)
            # A container starts from its spec's environment, not the runner's; the kubeconfig stands in
            # for the service account token a kubelet would mount.
            env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": str(root),
                   "LANG": "C.UTF-8", **self.extra_env, "KUBECONFIG": str(self.kubeconfig)}
            for item in container.get("envFrom", []):
                env.update(self._env_from(item))
            for item in container.get("env", []):
                env[item["name"]] = rewrite(self._env_value(item, name))
            argv = [rewrite(part) for part in container.get("command", []) + container.get("args", [])]
            probe = (container.get("readinessProbe") or {}).get("httpGet")
            ready_url = None
            if probe:
                port = probe["port"]
                if isinstance(port, str):
                    port = next(p["containerPort"] for p in container["ports"] if p["name"] == port)
                ready_url = f"http://127.0.0.1:{ports[port]}{probe['path']}"
            containers[container["name"]] = Container(container["name"], argv, env, ready_url,
                                                      root / f"{container['name']}.log")
        pod = Pod(name, self.namespace, deployment.metadata.name, digest, containers, root, ports)
        for container in containers.values():
            container.start()
        self.pods[name] = pod

    def _volumes(self, volumes: list[dict[str, Any]], root: Path) -> dict[str, Path]:
        paths = {}
        for volume in volumes:
            if "persistentVolumeClaim" in volume:
                path = self.workdir / "pvc" / volume["persistentVolumeClaim"]["claimName"]
            else:
                path = root / "volumes" / volume["name"]
            path.mkdir(parents=True, exist_ok=True)
            if "configMap" in volume:
                data = self.core.read_namespaced_config_map(volume["configMap"]["name"], self.namespace).data or {}
                for key, value in data.items():
                    (path / key).write_text(value)
            paths[volume["name"]] = path
        return paths

    def _env_from(self, item: dict[str, Any]) -> dict[str, str]:
        import base64

        if "secretRef" in item:
            secret = self.core.read_namespaced_secret(item["secretRef"]["name"], self.namespace)
            return {k: base64.b64decode(v).decode() for k, v in (secret.data or {}).items()}
        if "configMapRef" in item:
            return dict(self.core.read_namespaced_config_map(item["configMapRef"]["name"], self.namespace).data or {})
        return {}

    def _env_value(self, item: dict[str, Any], pod_name: str) -> str:
        if "value" in item:
            return str(item["value"])
        field = ((item.get("valueFrom") or {}).get("fieldRef") or {}).get("fieldPath")
        return {"metadata.name": pod_name, "metadata.namespace": self.namespace}.get(field, "")

    def _report_pod(self, pod: Pod) -> None:
        ready = all(container.ready() for container in pod.containers.values())
        statuses = [{"name": c.name, "ready": c.ready(), "restartCount": c.restarts, "image": "",
                     "imageID": "", "started": c.running()} for c in pod.containers.values()]
        status = {"phase": "Running", "podIP": "127.0.0.1",
                  "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
                  "containerStatuses": statuses}
        if status != pod.reported:
            try:
                self.core.patch_namespaced_pod_status(pod.name, self.namespace, {"status": status})
                pod.reported = status
            except ApiException:
                pass
        pod.ready = ready

    def _terminate(self, pod: Pod) -> None:
        for container in pod.containers.values():
            if container.running():
                assert container.process is not None
                os.killpg(container.process.pid, signal.SIGTERM)
        for container in pod.containers.values():
            if container.process is not None:
                try:
                    container.process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    container.kill()
        try:
            self.core.delete_namespaced_pod(pod.name, pod.namespace)
        except ApiException:
            pass
        self.pods.pop(pod.name, None)
        shutil.rmtree(pod.root / "volumes", ignore_errors=True)


class _Rewriter:
    """Container paths and ports in a value, as the host sees them."""

    def __init__(self, mounts: dict[str, Path], ports: dict[int, int]):
        self.mounts = sorted(mounts.items(), key=lambda item: -len(item[0]))
        self.ports = ports

    def __call__(self, value: str) -> str:
        for mount_path, host in self.mounts:
            if value == mount_path or value.startswith(mount_path.rstrip("/") + "/"):
                return str(host) + value[len(mount_path.rstrip("/")):]
        if value.isdigit() and int(value) in self.ports:
            return str(self.ports[int(value)])
        for container_port, host_port in self.ports.items():
            for host in ("127.0.0.1", "localhost"):
                value = value.replace(f"{host}:{container_port}", f"127.0.0.1:{host_port}")
        return value


def _snake(name: str) -> str:
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in name)
