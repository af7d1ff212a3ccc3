"""Run the real `loraplex operator` process against the real control plane (through an ApiProxy, which
counts its requests and injects faults), and read the cluster back as a user's tooling would."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import kubernetes
import yaml
from kubernetes.client.rest import ApiException

GROUP, VERSION = "loraplex.io", "v1alpha1"
BASE_MODEL_LABEL = "loraplex.io/base-model"
T = TypeVar("T")


class LoraplexProcess:
    """One `loraplex <subcommand>` process with its output in a log file."""

    def __init__(self, log_path: Path):
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def launch(self, arguments: list[str], env: dict[str, str]) -> None:
        self.process = subprocess.Popen([sys.executable, "-m", "loraplex.cli", *arguments], env=env,
                                        stdout=self.log_path.open("ab"), stderr=subprocess.STDOUT)

    def kill(self) -> None:
        """Die abruptly, as on a node failure: no cleanup handlers run."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


class OperatorProcess(LoraplexProcess):
    """The operator as a process watching one namespace. Its periodic resync is off by default (600 s), so
    a test passes only if events alone get the cluster there; tests of the resync itself ask for a short one."""

    def __init__(self, kubeconfig: Path, namespace: str, log_path: Path, resync_seconds: float = 600.0,
                 peering: tuple[str, int] | None = None, env: dict[str, str] | None = None):
        super().__init__(log_path)
        self.kubeconfig, self.namespace = kubeconfig, namespace
        self.resync_seconds, self.extra_env = resync_seconds, env or {}
        self.peering = peering  # (name, priority), or None for --standalone
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.metrics_port = sock.getsockname()[1]

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as response:
            return response.read().decode()

    def start(self) -> OperatorProcess:
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig),
               "LORAPLEX_RESYNC_SECONDS": str(self.resync_seconds), "LORAPLEX_PEERING_LIFETIME_SECONDS": "5",
               "LORAPLEX_SIDECAR_IMAGE": "loraplex/loraplex:test", "LORAPLEX_METRICS_PORT": str(self.metrics_port),
               **self.extra_env}
        peering = ["--peering", self.peering[0], "--priority", str(self.peering[1])] if self.peering \
            else ["--standalone"]
        self.launch(["operator", "--namespace", self.namespace, *peering], env)
        return self


def kubeconfig_token(kubeconfig: Path) -> str:
    """The bearer token a kubeconfig (as loraplex.local writes them) authenticates with."""
    return str(yaml.safe_load(kubeconfig.read_text())["users"][0]["user"]["token"])


def wait_for(predicate: Callable[[], T], timeout: float = 30.0, what: str = "condition",
             log: Callable[[], str] | None = None) -> T:
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # not there yet (404, no status, connection refused): poll again
            last_error = exc
        time.sleep(0.1)
    detail = f" (last error: {last_error})" if last_error else ""
    tail = ("\n--- logs ---\n" + log()[-6000:]) if log else ""
    raise AssertionError(f"timed out waiting for {what}{detail}{tail}")


class Cluster:
    """Thin readers and writers over the official client, as a user's tooling would use it."""

    def __init__(self, api_client: kubernetes.client.ApiClient, namespace: str):
        self.namespace = namespace
        self.custom = kubernetes.client.CustomObjectsApi(api_client)
        self.core = kubernetes.client.CoreV1Api(api_client)
        self.apps = kubernetes.client.AppsV1Api(api_client)
        self.rbac = kubernetes.client.RbacAuthorizationV1Api(api_client)

    def apply_base_model(self, name: str, **spec: Any) -> dict[str, Any]:
        body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "BaseModelDeployment", "metadata": {"name": name},
                "spec": {"model": "meta/llama3-8b-instruct", "runtime": "vllm", "image": "vllm/vllm-openai:v0.11.0",
                         **spec}}
        return self._create_or_merge("basemodeldeployments", name, body)

    def apply_adapter(self, name: str, **spec: Any) -> dict[str, Any]:
        body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "LoraAdapter", "metadata": {"name": name},
                "spec": {"baseModel": "llama3", "source": f"s3://adapters/{name}", **spec}}
        return self._create_or_merge("loraadapters", name, body)

    def _create_or_merge(self, plural: str, name: str, body: dict[str, Any]) -> dict[str, Any]:
        try:
            return self.custom.create_namespaced_custom_object(GROUP, VERSION, self.namespace, plural, body)
        except ApiException as exc:
            if exc.status != 409:
                raise
            return self.custom.patch_namespaced_custom_object(GROUP, VERSION, self.namespace, plural, name,
                                                              {"spec": body["spec"]})

    def get(self, plural: str, name: str) -> dict[str, Any]:
        return self.custom.get_namespaced_custom_object(GROUP, VERSION, self.namespace, plural, name)

    def exists(self, plural: str, name: str) -> bool:
        try:
            self.get(plural, name)
            return True
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise

    def adapter(self, name: str) -> dict[str, Any]:
        return self.get("loraadapters", name)

    def base_model(self, name: str) -> dict[str, Any]:
        return self.get("basemodeldeployments", name)

    def delete(self, plural: str, name: str) -> None:
        self.custom.delete_namespaced_custom_object(GROUP, VERSION, self.namespace, plural, name)

    def condition(self, obj: dict[str, Any], type_: str) -> dict[str, Any] | None:
        return next((c for c in (obj.get("status") or {}).get("conditions") or [] if c["type"] == type_), None)

    def report(self, adapter: str, pod: str, state: str | None, **fields: Any) -> None:
        """What a replica's sidecar writes: the adapter's entry in its pod's LoraReplica (None removes it),
        creating the LoraReplica, owned by the pod, the first time."""
        generation = self.adapter(adapter)["metadata"]["generation"]
        entry = None if state is None else {"state": state, "observedGeneration": generation, **fields}
        try:
            meta = self.core.read_namespaced_pod(pod, self.namespace).metadata
        except ApiException as exc:
            if exc.status == 404 and entry is None:
                return  # a pod that is gone reports nothing: its LoraReplica goes with it
            raise
        base_model = meta.labels[BASE_MODEL_LABEL]
        try:
            self.custom.create_namespaced_custom_object(GROUP, VERSION, self.namespace, "lorareplicas", {
                "apiVersion": f"{GROUP}/{VERSION}", "kind": "LoraReplica",
                "metadata": {"name": pod, "labels": {BASE_MODEL_LABEL: base_model},
                             "ownerReferences": [{"apiVersion": "v1", "kind": "Pod", "name": pod, "uid": meta.uid}]},
                "spec": {"baseModel": base_model}})
        except ApiException as exc:
            if exc.status != 409:
                raise
        try:
            self.custom.patch_namespaced_custom_object_status(GROUP, VERSION, self.namespace, "lorareplicas", pod,
                                                              {"status": {"adapters": {adapter: entry}}})
        except ApiException as exc:
            if exc.status == 404 and entry is None:
                return  # the pod went meanwhile, and its LoraReplica with it: nothing is left to remove
            raise

    def replicas(self, base_model: str = "llama3") -> list[str]:
        """The names of the base model's pods that count as replicas: neither terminating nor finished.
        The Deployment controller makes them; with no kubelet in these tests they stay Pending."""
        pods = self.core.list_namespaced_pod(self.namespace, label_selector=f"{BASE_MODEL_LABEL}={base_model}")
        return sorted(p.metadata.name for p in pods.items
                      if not p.metadata.deletion_timestamp and p.status.phase not in ("Succeeded", "Failed"))

    def delete_pod(self, name: str) -> None:
        self.core.delete_namespaced_pod(name, self.namespace)

    def events_for(self, name: str) -> list[Any]:
        return [e for e in self.core.list_namespaced_event(self.namespace).items if e.involved_object.name == name]
