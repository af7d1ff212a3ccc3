"""A whole loraplex installation on one machine: a real Kubernetes control plane (loraplex.local), a process
kubelet for its GPU node, a kube-proxy stand-in for its Services, moto S3, and the real operator running as the
chart's ServiceAccount. The pods the operator renders are scheduled by the real scheduler and run by the
kubelet (the runtime + sidecar); clients reach them through the operator's Service, as on a cluster."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import kubernetes

from demo.tasks import TASKS, training_text
from loraplex.local.controlplane import ControlPlane
from loraplex.local.install import install_crds, install_operator_identity
from loraplex.local.kubelet import ProcessKubelet
from loraplex.local.serviceproxy import ServiceProxy
from tests.adapters import CORPUS, VLLM_TINY_LLAMA, make_hf_adapter_for, make_tiny_model, train_hf_adapter
from tests.conftest import tool

ROOT = Path(__file__).resolve().parents[1]
S3_PORT = 39077  # examples/demo.yaml names this endpoint
GROUP, VERSION = "loraplex.io", "v1alpha1"
ADAPTER_SEEDS = {"math": 1, "squad": 2, "pubmedqa": 3}
ADAPTER_RANK = 8  # examples/demo.yaml expects it of the math adapter
# Random weights ten times the usual scale: at 0.02 the output layer's rows are so short that no hidden state
# makes any token much likelier than the rest, and adapters (lm_head excluded, see tests/adapters.py) cannot
# learn a clear answer.
DEMO_TINY_LLAMA = {**VLLM_TINY_LLAMA, "initializer_range": 0.2}
MODELS_CLAIM = "demo-models"  # examples/demo.yaml mounts it as the model cache


def build_artifacts(directory: Path) -> Path:
    """The tiny base model (random weights) and the demo's adapters, each trained here with transformers + peft
    to answer its task's questions (demo/tasks.py); training takes about 5 s per adapter on 2 busy cores."""
    make_tiny_model(directory / "model", config=DEMO_TINY_LLAMA, corpus=[*CORPUS, *training_text()])
    for name, task in TASKS.items():
        train_hf_adapter(directory / "model", directory / "adapters" / name, task.examples, rank=ADAPTER_RANK,
                         seed=ADAPTER_SEEDS[name])
    make_hf_adapter_for(directory / "model", directory / "adapters" / "broken", rank=32, seed=9)
    return directory


class LocalStack:
    """Start it, then use it as a user would: kubectl, the API, and the pods' endpoints.

    With `control_plane` given (the tests' session-wide one) it installs into that cluster instead of
    starting its own; `namespace` is where the user's objects go.
    """

    def __init__(self, workdir: Path, artifacts: Path, s3_port: int = S3_PORT, resync_seconds: float = 5.0,
                 control_plane: ControlPlane | None = None, namespace: str = "default"):
        self.workdir, self.artifacts = workdir, artifacts
        self.s3_port, self.resync_seconds, self.namespace = s3_port, resync_seconds, namespace
        self.control_plane = control_plane
        self.owns_control_plane = control_plane is None
        self.moto: subprocess.Popen[bytes] | None = None
        self.operator: subprocess.Popen[bytes] | None = None
        self.kubelet: ProcessKubelet | None = None
        self.service_proxy: ServiceProxy | None = None
        self.kubeconfig = workdir / "kubeconfig"  # admin, the user's
        self.operator_kubeconfig = workdir / "operator.kubeconfig"

    # ---- lifecycle -----------------------------------------------------------------------------------

    def start(self) -> LocalStack:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._start_moto()
        self._upload_adapters()
        if self.control_plane is None:
            self.control_plane = ControlPlane(self.workdir / "control-plane").start()
        plane = self.control_plane
        plane.write_kubeconfig(self.kubeconfig, plane.admin_token, "admin", namespace=self.namespace)
        with self.api() as client:
            if self.owns_control_plane:
                install_crds(client, ROOT)
            install_operator_identity(plane, client, tool("helm"), ROOT / "charts" / "loraplex",
                                      self.operator_kubeconfig)
            self._ensure_namespace(client)
            self._provide_models_claim(client)
        self.start_operator()
        self.kubelet = ProcessKubelet(self.kubeconfig, self.workdir / "kubelet",
                                      node_name=f"gpu-node-{self.namespace}", restart_backoff_seconds=2).start()
        self.service_proxy = ServiceProxy(self.kubeconfig, [self.kubelet], namespace=self.namespace).start()
        return self

    def stop(self) -> None:
        if self.service_proxy is not None:
            self.service_proxy.stop()
        if self.kubelet is not None:
            self.kubelet.stop()
        self.stop_operator()
        if self.moto is not None:
            self.moto.terminate()
            self.moto.wait(timeout=10)
        if self.control_plane is not None and self.owns_control_plane:
            self.control_plane.stop()

    def start_operator(self) -> None:
        env = {**os.environ, "KUBECONFIG": str(self.operator_kubeconfig),
               "LORAPLEX_RESYNC_SECONDS": str(self.resync_seconds),
               "LORAPLEX_SIDECAR_IMAGE": "loraplex/loraplex:0.1.0", "LORAPLEX_METRICS_PORT": "0"}
        log = (self.workdir / "operator.log").open("ab")
        self.operator = subprocess.Popen([sys.executable, "-m", "loraplex.cli", "operator", "--namespace",
                                          self.namespace, "--standalone"], env=env, stdout=log,
                                         stderr=subprocess.STDOUT)

    def stop_operator(self, kill: bool = False) -> None:
        if self.operator is not None and self.operator.poll() is None:
            self.operator.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            self.operator.wait(timeout=15)

    def _ensure_namespace(self, client: kubernetes.client.ApiClient) -> None:
        try:
            kubernetes.client.CoreV1Api(client).create_namespace({"metadata": {"name": self.namespace}})
        except kubernetes.client.ApiException as exc:
            if exc.status != 409:
                raise

    def _provide_models_claim(self, client: kubernetes.client.ApiClient) -> None:
        """The tiny model on a hostPath PersistentVolume, bound to the claim the base model mounts."""
        models = self.workdir / "volumes" / MODELS_CLAIM
        shutil.copytree(self.artifacts / "model", models / "tiny-llama", dirs_exist_ok=True)
        core = kubernetes.client.CoreV1Api(client)
        volume_name = f"{MODELS_CLAIM}-{self.namespace}"
        core.create_persistent_volume({
            "metadata": {"name": volume_name},
            "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteMany"], "storageClassName": "",
                     "persistentVolumeReclaimPolicy": "Retain", "hostPath": {"path": str(models)}}})
        core.create_namespaced_persistent_volume_claim(self.namespace, {
            "metadata": {"name": MODELS_CLAIM},
            "spec": {"accessModes": ["ReadWriteMany"], "storageClassName": "", "volumeName": volume_name,
                     "resources": {"requests": {"storage": "1Gi"}}}})

    def _start_moto(self) -> None:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", self.s3_port)) == 0:
                raise RuntimeError(f"port {self.s3_port} is taken; the demo's S3 server needs it")
        self.moto = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p",
                                      str(self.s3_port)], stdout=(self.workdir / "moto.log").open("wb"),
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", self.s3_port)) == 0:
                    return
            time.sleep(0.1)
        raise RuntimeError("moto_server did not start")

    def s3(self) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=f"http://127.0.0.1:{self.s3_port}", region_name="us-east-1",
                            aws_access_key_id="demo", aws_secret_access_key="demo-secret")

    def _upload_adapters(self) -> None:
        s3 = self.s3()
        s3.create_bucket(Bucket="demo-adapters")
        for folder in sorted((self.artifacts / "adapters").iterdir()):
            self.upload(folder, f"tiny-llama/{folder.name}")

    def upload(self, folder: Path, prefix: str) -> None:
        s3 = self.s3()
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                s3.upload_file(str(path), "demo-adapters", f"{prefix}/{path.relative_to(folder)}")

    # ---- as a user would --------------------------------------------------------------------------------

    def kubectl(self, *args: str, check: bool = True) -> str:
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig), "KUBECACHEDIR": str(self.workdir / "kube-cache")}
        result = subprocess.run([tool("kubectl"), *args], env=env, capture_output=True, text=True, timeout=120)
        if check and result.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)}: {result.stderr.strip()}")
        return result.stdout

    def api(self) -> kubernetes.client.ApiClient:
        configuration = kubernetes.client.Configuration()
        kubernetes.config.load_kube_config(str(self.kubeconfig), client_configuration=configuration)
        return kubernetes.client.ApiClient(configuration)

    def _custom(self, plural: str, name: str) -> dict[str, Any]:
        with self.api() as client:
            return kubernetes.client.CustomObjectsApi(client).get_namespaced_custom_object(
                GROUP, VERSION, self.namespace, plural, name)

    def adapter(self, name: str) -> dict[str, Any]:
        return self._custom("loraadapters", name)

    def base_model(self, name: str) -> dict[str, Any]:
        return self._custom("basemodeldeployments", name)

    def replica_report(self, pod: str) -> dict[str, Any]:
        """The LoraReplica the pod's sidecar reports into; empty while the sidecar has not created it."""
        import kubernetes

        try:
            return self._custom("lorareplicas", pod)
        except kubernetes.client.ApiException as exc:
            if exc.status == 404:
                return {}
            raise

    def phase(self, name: str) -> str | None:
        return (self.adapter(name).get("status") or {}).get("phase")

    def pods(self, base_model: str) -> list[dict[str, Any]]:
        """The base model's pods as the API shows them, running ones only, oldest first."""
        with self.api() as client:
            listed = kubernetes.client.CoreV1Api(client).list_namespaced_pod(
                self.namespace, label_selector=f"loraplex.io/base-model={base_model}")
            pods = [client.sanitize_for_serialization(pod) for pod in listed.items]
        running = [p for p in pods if (p.get("status") or {}).get("phase") == "Running"
                   and not p["metadata"].get("deletionTimestamp")]
        return sorted(running, key=lambda p: (p["metadata"]["creationTimestamp"], p["metadata"]["name"]))

    def pod_names(self, base_model: str) -> list[str]:
        return [pod["metadata"]["name"] for pod in self.pods(base_model)]

    def restarts(self, base_model: str) -> dict[str, dict[str, int]]:
        """Container restart counts per pod, from pod status as the kubelet reports them."""
        return {pod["metadata"]["name"]: {c["name"]: c["restartCount"] for c in pod["status"]["containerStatuses"]}
                for pod in self.pods(base_model)}

    def url(self, pod: str, port: int = 8000) -> str:
        assert self.kubelet is not None
        return self.kubelet.url(self.namespace, pod, port)

    def service_url(self, service: str, port: int = 8000) -> str:
        """Where the Service's port is reached on this machine (the stand-in for its ClusterIP)."""
        assert self.service_proxy is not None
        return self.service_proxy.url(service, port)

    def service_backends(self, service: str, port: int = 8000) -> list[str]:
        """The ready pods the Service sends connections to, round-robin."""
        assert self.service_proxy is not None
        return self.service_proxy.backends(service, port)

    def completion(self, pod: str, model: str, prompt: str = "What is 7 times 6?", max_tokens: int = 12) -> str:
        """Greedy completion from one pod's runtime."""
        return self.complete(self.url(pod), model, prompt, max_tokens, where=pod)

    def complete(self, base_url: str, model: str, prompt: str, max_tokens: int = 12, where: str = "") -> str:
        """Greedy completion (temperature 0) from the OpenAI-compatible server at `base_url`."""
        request = urllib.request.Request(
            base_url + "/v1/completions", method="POST",
            data=json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens,
                             "temperature": 0}).encode(),
            headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return json.loads(response.read())["choices"][0]["text"]
        except urllib.error.HTTPError as error:
            raise RuntimeError(f"{model} at {where or base_url}: {error.code} {error.read().decode()}") from None

    def runtime_version(self, base_url: str) -> str:
        """The version vLLM's server reports (GET /version)."""
        with urllib.request.urlopen(base_url + "/version", timeout=10) as response:
            return str(json.loads(response.read())["version"])

    def served(self, pod: str) -> list[str]:
        with urllib.request.urlopen(self.url(pod) + "/v1/models", timeout=10) as response:
            return [card["id"] for card in json.loads(response.read())["data"]]

    def log_tail(self, lines: int = 40) -> str:
        text = ""
        logs = [self.workdir / "operator.log", *sorted((self.workdir / "kubelet" / "pods").glob("*/*.log"))]
        for path in logs:
            if path.exists():
                text += f"\n--- {path.relative_to(self.workdir)} ---\n" + "\n".join(
                    path.read_text(errors="replace").splitlines()[-lines:])
        return text
