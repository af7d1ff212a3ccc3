"""Run the real `loraplex sidecar` process against the emulator, a real S3 server and a fake runtime."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import kubernetes

from loraplex.api.adapter_set import AdapterLimits, AdapterSet, DesiredAdapter
from loraplex.api.types import AdapterFormat, Runtime
from tests.integration.harness import LoraplexProcess

GROUP, VERSION = "loraplex.io", "v1alpha1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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


class AdapterSetWriter:
    """Plays the operator's part: LoraAdapter objects and the adapter-set ConfigMap of base model 'llama3'."""

    def __init__(self, api_client: kubernetes.client.ApiClient, runtime: Runtime = Runtime.VLLM, max_rank: int = 64):
        self.custom = kubernetes.client.CustomObjectsApi(api_client)
        self.core = kubernetes.client.CoreV1Api(api_client)
        self.runtime, self.max_rank = runtime, max_rank
        self.adapters: dict[str, DesiredAdapter] = {}

    def add(self, name: str, source: str, fmt: AdapterFormat = AdapterFormat.AUTO, **extra: Any) -> None:
        body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "LoraAdapter", "metadata": {"name": name},
                "spec": {"baseModel": "llama3", "source": source, "format": fmt.value}}
        try:
            obj = self.custom.create_namespaced_custom_object(GROUP, VERSION, "default", "loraadapters", body)
        except kubernetes.client.ApiException:
            obj = self.custom.patch_namespaced_custom_object(GROUP, VERSION, "default", "loraadapters", name,
                                                             {"spec": {"source": source}})
        self.adapters[name] = DesiredAdapter(name=name, uid=obj["metadata"]["uid"],
                                             generation=obj["metadata"]["generation"], served_name=name,
                                             source=source, format=fmt, **extra)
        self.publish()

    def remove(self, name: str) -> None:
        del self.adapters[name]
        self.publish()

    def publish(self) -> None:
        allowed = [AdapterFormat.HF] if self.runtime == Runtime.VLLM else \
            [AdapterFormat.HF, AdapterFormat.NEMO, AdapterFormat.TRTLLM]
        adapter_set = AdapterSet(base_model="llama3", runtime=self.runtime,
                                 limits=AdapterLimits(max_rank=self.max_rank, allowed_formats=allowed),
                                 adapters=list(self.adapters.values()))
        body = {"metadata": {"name": "llama3-adapters"}, "data": adapter_set.to_configmap_data()}
        try:
            self.core.create_namespaced_config_map("default", body)
        except kubernetes.client.ApiException:
            self.core.replace_namespaced_config_map("llama3-adapters", "default", body)

    def replica_status(self, name: str, pod: str = "llama3-0") -> dict[str, Any] | None:
        obj = self.custom.get_namespaced_custom_object(GROUP, VERSION, "default", "loraadapters", name)
        return ((obj.get("status") or {}).get("replicaStatus") or {}).get(pod)

    def state(self, name: str) -> str | None:
        entry = self.replica_status(name)
        return entry.get("state") if entry else None


class SidecarProcess(LoraplexProcess):
    def __init__(self, kubeconfig: Path, volume: Path, runtime: Runtime, runtime_url: str, log: Path,
                 extra_env: dict[str, str] | None = None):
        super().__init__(log)
        self.port = free_port()
        self.env = {
            **os.environ, "KUBECONFIG": str(kubeconfig), "POD_NAME": "llama3-0", "POD_NAMESPACE": "default",
            "LORAPLEX_ADAPTER_SET": "llama3-adapters", "LORAPLEX_RUNTIME": runtime.value,
            "LORAPLEX_RUNTIME_URL": runtime_url, "LORAPLEX_SERVED_MODEL": "meta/llama3",
            "LORAPLEX_VOLUME_DIR": str(volume), "LORAPLEX_PEFT_DIR": str(volume / "adapters"),
            "LORAPLEX_HTTP_PORT": str(self.port), "LORAPLEX_RUNTIME_POLL_SECONDS": "0.3",
            "LORAPLEX_NIM_REFRESH_SECONDS": "0.3",
            "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_REGION": "us-east-1",
            "LORAPLEX_S3_FORCE_PATH_STYLE": "true", **(extra_env or {}),
        }

    def start(self) -> SidecarProcess:
        self.launch(["sidecar"], self.env)
        return self

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


def dump(obj: Any) -> str:
    return json.dumps(obj, indent=1, default=str)
