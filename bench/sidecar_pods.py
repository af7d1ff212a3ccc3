"""The real `loraplex sidecar` for Pending pods, for bench/placement_scale.py: with no kubelet the pods the Deployment
controller makes never run, so this starts each one's sidecar container as a plain process, with the environment
the operator rendered into the pod (its downward-API fields, the storage Secret and settings resolved as a kubelet
would, by loraplex.local.pod_config) and signed in with a token of the pod's ServiceAccount bound to that pod.

What a process cannot take from the manifest is replaced: the API server is reached through a kubeconfig (an API
proxy that counts the sidecars' requests) instead of the in-cluster Service, the PEFT volume is a folder of its own,
the HTTP port a free one, and the runtime URL the pod's vLLM stand-in (bench/vllm_standin.py).
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes

from loraplex.local.apiproxy import ApiProxy
from loraplex.local.controlplane import free_port
from loraplex.local.pod_config import PodConfig

SIDECAR_CONTAINER = "loraplex-sidecar"


@dataclass
class SidecarPod:
    pod: str
    uid: str
    volume: Path
    runtime_url: str
    process: subprocess.Popen[bytes]

    @property
    def peft_dir(self) -> Path:
        return self.volume / "adapters"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def pod_token(core: kubernetes.client.CoreV1Api, manifest: dict[str, Any]) -> str:
    """A token of the pod's ServiceAccount bound to the pod, as the kubelet projects one into it."""
    meta = manifest["metadata"]
    request = {"spec": {"expirationSeconds": 24 * 3600,
                        "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": meta["name"],
                                           "uid": meta["uid"]}}}
    response = core.create_namespaced_service_account_token(manifest["spec"]["serviceAccountName"],
                                                            meta["namespace"], request)
    return str(response.status.token)


def sidecar_environment(config: PodConfig, manifest: dict[str, Any], root: Path) -> dict[str, str]:
    """The sidecar container's environment as the pod's manifest gives it, values from Secrets and fields resolved."""
    container = next((c for c in manifest["spec"]["containers"] if c["name"] == SIDECAR_CONTAINER), None)
    if container is None:
        raise ValueError(f"pod {manifest['metadata']['name']} has no {SIDECAR_CONTAINER} container")
    volumes = {volume["name"]: root / "volumes" / volume["name"] for volume in manifest["spec"].get("volumes", [])}
    return config.container(manifest, container, volumes, root, {}).env


def start_sidecar(admin: kubernetes.client.ApiClient, proxy: ApiProxy, manifest: dict[str, Any], root: Path,
                  runtime_url: str) -> SidecarPod:
    """Start the real sidecar of the Pending pod `manifest`, with its runtime at `runtime_url`."""
    core = kubernetes.client.CoreV1Api(admin)
    meta = manifest["metadata"]
    root.mkdir(parents=True, exist_ok=True)
    config = PodConfig(core, proxy.url, {}, restart_backoff_seconds=1.0)
    env = {key: value for key, value in sidecar_environment(config, manifest, root).items()
           if not key.startswith("KUBERNETES_")}  # no in-cluster sign-in: the kubeconfig below
    volume = root / "peft"
    kubeconfig = proxy.write_kubeconfig(root / "kubeconfig", pod_token(core, manifest), meta["namespace"])
    env.update({"KUBECONFIG": str(kubeconfig), "LORAPLEX_VOLUME_DIR": str(volume),
                "LORAPLEX_PEFT_DIR": str(volume / "adapters"), "LORAPLEX_HTTP_PORT": str(free_port()),
                "LORAPLEX_RUNTIME_URL": runtime_url, "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"})
    process = subprocess.Popen([sys.executable, "-m", "loraplex.cli", "sidecar"], env=env,
                               stdout=(root / "sidecar.log").open("wb"), stderr=subprocess.STDOUT)
    return SidecarPod(meta["name"], meta["uid"], volume, runtime_url, process)


def folder_bytes(folder: Path) -> int:
    """Bytes of the regular files under `folder` (0 when it does not exist yet)."""
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file()) if folder.exists() else 0
