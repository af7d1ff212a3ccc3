"""Run the real `loraplex sidecar` process against the real control plane, a real S3 server and a runtime
(real vLLM, or a NIM double). The sidecar signs in as its own ServiceAccount, with the Role the operator
renders for it, so a right the sidecar needs and the Role lacks shows up as a refusal in its log. Its pod is a
real Pod object that is never scheduled, so the LoraReplica it reports into has a live owner."""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import kubernetes

from loraplex.api.adapter_set import AdapterLimits, AdapterSet, DesiredAdapter
from loraplex.api.runtime_capabilities import capabilities
from loraplex.api.types import AdapterFormat, BaseModelDeploymentSpec, Runtime
from loraplex.local.controlplane import ControlPlane, free_port
from loraplex.local.install import server_side_apply, service_account_token
from loraplex.operator.naming import ChildNames
from loraplex.operator.render import (
    render_service_account,
    render_sidecar_role,
    render_sidecar_role_binding,
)
from tests.integration.harness import LoraplexProcess, wait_for

GROUP, VERSION = "loraplex.io", "v1alpha1"
BASE_MODEL = "llama3"
POD = f"{BASE_MODEL}-0"
# How the API server words a refusal, in the sidecar's log lines about its API calls.
REFUSAL = re.compile(r"\b403\b|forbidden", re.IGNORECASE)


class MotoServer:
    def __init__(self, log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p",
                                         str(self.port)], stdout=log.open("wb"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("moto_server did not start")

    def client(self) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=self.url, region_name="us-east-1", aws_access_key_id="test",
                            aws_secret_access_key="test")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


@dataclasses.dataclass(frozen=True)
class SidecarIdentity:
    """The base model `llama3` in a namespace, and the ServiceAccount its pods' sidecars run as."""

    namespace: str
    owner: dict[str, Any]
    user: str
    token: str
    kubeconfig: Path
    pod_uid: str

    def api_client(self) -> kubernetes.client.ApiClient:
        configuration = kubernetes.client.Configuration()
        kubernetes.config.load_kube_config(str(self.kubeconfig), client_configuration=configuration)
        return kubernetes.client.ApiClient(configuration)


def install_sidecar_identity(api_client: kubernetes.client.ApiClient, control_plane: ControlPlane, namespace: str,
                             kubeconfig: Path) -> SidecarIdentity:
    """Create the BaseModelDeployment (so the rendered objects' ownerReferences resolve), apply the
    ServiceAccount, Role and RoleBinding the operator renders for its sidecar, and sign in as that account."""
    custom = kubernetes.client.CustomObjectsApi(api_client)
    spec = {"model": "meta/llama3", "runtime": "vllm", "image": "vllm/vllm-openai:v0.11.0"}
    owner = custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "basemodeldeployments", {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "BaseModelDeployment", "metadata": {"name": BASE_MODEL},
        "spec": spec})
    parsed = BaseModelDeploymentSpec.model_validate(spec)
    for manifest in (render_service_account(owner, parsed), render_sidecar_role(owner),
                     render_sidecar_role_binding(owner)):
        server_side_apply(api_client, manifest)
    account = ChildNames(BASE_MODEL).service_account
    user = f"system:serviceaccount:{namespace}:{account}"
    token = service_account_token(api_client, namespace, account)
    path = control_plane.write_kubeconfig(kubeconfig, token, user, namespace=namespace)
    pod_uid = create_unscheduled_pod(api_client, namespace, account)
    identity = SidecarIdentity(namespace, owner, user, token, path, pod_uid)
    # The authorizer learns of a new RoleBinding from its own watch; a sidecar started before that would be
    # refused once and retry, which the tests count as a failure.
    adapter_set = ChildNames(BASE_MODEL).adapter_set
    wait_for(lambda: allowed(api_client, user, namespace, "patch", "lorareplicas", GROUP, "status")
             and allowed(api_client, user, namespace, "watch", "configmaps", "", name=adapter_set),
             what="the sidecar's RoleBinding to take effect")
    return identity


def create_unscheduled_pod(api_client: kubernetes.client.ApiClient, namespace: str, account: str) -> str:
    """The Pod the sidecar runs "in": it owns the sidecar's LoraReplica. A node selector no node matches keeps it
    Pending, whatever nodes the cluster has. Returns its uid, which the Downward API would give the sidecar."""
    pod = kubernetes.client.CoreV1Api(api_client).create_namespaced_pod(namespace, {
        "metadata": {"name": POD, "labels": {"loraplex.io/base-model": BASE_MODEL}},
        "spec": {"nodeSelector": {"loraplex.io/no-such-node": "true"}, "serviceAccountName": account,
                 "automountServiceAccountToken": False,
                 "containers": [{"name": "inference", "image": "vllm/vllm-openai:v0.11.0"}]}})
    return str(pod.metadata.uid)


def allowed(api_client: kubernetes.client.ApiClient, user: str, namespace: str, verb: str, resource: str,
            group: str, subresource: str = "", name: str = "") -> bool:
    review = kubernetes.client.AuthorizationV1Api(api_client).create_subject_access_review({
        "apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
        "spec": {"user": user, "groups": ["system:serviceaccounts", f"system:serviceaccounts:{namespace}",
                                          "system:authenticated"],
                 "resourceAttributes": {"namespace": namespace, "verb": verb, "group": group,
                                        "resource": resource, "subresource": subresource, "name": name}}})
    return bool(review.status.allowed)


class AdapterSetWriter:
    """Plays the operator's part: LoraAdapter objects and the adapter-set ConfigMap of base model 'llama3'."""

    def __init__(self, api_client: kubernetes.client.ApiClient, namespace: str, runtime: Runtime = Runtime.VLLM,
                 max_rank: int = 64):
        self.custom = kubernetes.client.CustomObjectsApi(api_client)
        self.core = kubernetes.client.CoreV1Api(api_client)
        self.namespace = namespace
        self.runtime, self.max_rank = runtime, max_rank
        self.adapters: dict[str, DesiredAdapter] = {}

    def add(self, name: str, source: str, fmt: AdapterFormat = AdapterFormat.AUTO, **extra: Any) -> None:
        body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "LoraAdapter", "metadata": {"name": name},
                "spec": {"baseModel": BASE_MODEL, "source": source, "format": fmt.value}}
        try:
            obj = self.custom.create_namespaced_custom_object(GROUP, VERSION, self.namespace, "loraadapters", body)
        except kubernetes.client.ApiException as exc:
            if exc.status != 409:
                raise
            obj = self.custom.patch_namespaced_custom_object(GROUP, VERSION, self.namespace, "loraadapters", name,
                                                             {"spec": {"source": source}})
        self.adapters[name] = DesiredAdapter(name=name, uid=obj["metadata"]["uid"],
                                             generation=obj["metadata"]["generation"], served_name=name,
                                             source=source, format=fmt, **extra)
        self.publish()

    def remove(self, name: str) -> None:
        del self.adapters[name]
        self.publish()

    def publish(self) -> None:
        allowed_formats = sorted(capabilities(self.runtime).accepted_formats)  # as the operator publishes them
        adapter_set = AdapterSet(base_model=BASE_MODEL, runtime=self.runtime,
                                 limits=AdapterLimits(max_rank=self.max_rank, allowed_formats=allowed_formats),
                                 adapters=list(self.adapters.values()))
        name = ChildNames(BASE_MODEL).adapter_set
        body = {"metadata": {"name": name}, "data": adapter_set.to_configmap_data()}
        try:
            self.core.create_namespaced_config_map(self.namespace, body)
        except kubernetes.client.ApiException as exc:
            if exc.status != 409:
                raise
            self.core.replace_namespaced_config_map(name, self.namespace, body)

    def adapter(self, name: str) -> dict[str, Any]:
        return self.custom.get_namespaced_custom_object(GROUP, VERSION, self.namespace, "loraadapters", name)

    def report(self, pod: str = POD) -> dict[str, Any] | None:
        """The pod's LoraReplica, where its sidecar reports; None until the sidecar created it."""
        try:
            return self.custom.get_namespaced_custom_object(GROUP, VERSION, self.namespace, "lorareplicas", pod)
        except kubernetes.client.ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def replica_status(self, name: str, pod: str = POD) -> dict[str, Any] | None:
        return replica_entry(self.report(pod) or {}, name)

    def state(self, name: str) -> str | None:
        entry = self.replica_status(name)
        return entry.get("state") if entry else None


def replica_entry(report: dict[str, Any], adapter: str) -> dict[str, Any] | None:
    """One adapter's entry in a LoraReplica."""
    return ((report.get("status") or {}).get("adapters") or {}).get(adapter)


def watch_report(api_client: kubernetes.client.ApiClient, namespace: str, adapter: str, resource_version: str,
                 seen: list[dict[str, Any]], timeout_seconds: int = 60) -> None:
    """Append every version of the pod's LoraReplica after `resource_version` to `seen`, until it says `adapter`
    is Loaded or Failed (or the watch times out). Meant for a thread of its own."""
    custom = kubernetes.client.CustomObjectsApi(api_client)
    stream = kubernetes.watch.Watch().stream(
        custom.list_namespaced_custom_object, GROUP, VERSION, namespace, "lorareplicas",
        field_selector=f"metadata.name={POD}", resource_version=resource_version, timeout_seconds=timeout_seconds)
    for event in stream:
        seen.append(event["object"])
        if (replica_entry(event["object"], adapter) or {}).get("state") in ("Loaded", "Failed"):
            return


class SidecarProcess(LoraplexProcess):
    def __init__(self, kubeconfig: Path, namespace: str, volume: Path, runtime: Runtime, runtime_url: str, log: Path,
                 extra_env: dict[str, str] | None = None, pod_uid: str = ""):
        super().__init__(log)
        self.port = free_port()
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("KUBERNETES_")}
        self.env = {
            **inherited, "KUBECONFIG": str(kubeconfig), "POD_NAME": POD, "POD_NAMESPACE": namespace,
            "POD_UID": pod_uid, "LORAPLEX_BASE_MODEL": BASE_MODEL,
            "LORAPLEX_ADAPTER_SET": ChildNames(BASE_MODEL).adapter_set, "LORAPLEX_RUNTIME": runtime.value,
            "LORAPLEX_RUNTIME_URL": runtime_url, "LORAPLEX_SERVED_MODEL": "meta/llama3",
            "LORAPLEX_VOLUME_DIR": str(volume), "LORAPLEX_PEFT_DIR": str(volume / "adapters"),
            "LORAPLEX_HTTP_PORT": str(self.port), "LORAPLEX_RUNTIME_POLL_SECONDS": "0.3",
            "LORAPLEX_NIM_REFRESH_SECONDS": "0.3",
            "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_REGION": "us-east-1",
            "LORAPLEX_S3_FORCE_PATH_STYLE": "true",
            **({"LORAPLEX_RUNTIME_VERSION": "0.32.0"} if runtime == Runtime.VLLM else {}),  # make vllm's
            **(extra_env or {}),
        }

    def start(self) -> SidecarProcess:
        self.launch(["sidecar"], self.env)
        return self

    def refusals(self) -> list[str]:
        """Log lines where the API server refused the sidecar something."""
        # After the date and time: a timestamp's milliseconds may read 403.
        return [line for line in self.log().splitlines() if REFUSAL.search(line.split(" ", 2)[-1])]

    def get(self, path: str) -> tuple[int, str]:
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()


def upload_folder(s3: Any, folder: Path, bucket: str, prefix: str) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            s3.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(folder)}")
