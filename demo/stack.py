"""A whole loraplex installation on one machine: API emulator, moto S3, the real operator, and the pod
runner that runs the rendered pods (CPU runtime + sidecar) as local processes."""

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
import yaml

from tests.adapters import make_hf_adapter_for, make_tiny_model
from tests.conftest import tool
from tests.kube_emulator import EmulatorThread
from tests.kube_emulator.pod_runner import PodRunner

ROOT = Path(__file__).resolve().parents[1]
S3_PORT = 39077  # examples/demo.yaml names this endpoint
GROUP, VERSION = "loraplex.io", "v1alpha1"
ADAPTER_SEEDS = {"math": 1, "squad": 2, "pubmedqa": 3}


def build_artifacts(directory: Path) -> Path:
    """The tiny base model and the demo's adapters, made here with transformers + peft."""
    make_tiny_model(directory / "model")
    for name, seed in ADAPTER_SEEDS.items():
        make_hf_adapter_for(directory / "model", directory / "adapters" / name, rank=8, seed=seed)
    make_hf_adapter_for(directory / "model", directory / "adapters" / "broken", rank=32, seed=9)
    return directory


class LocalStack:
    def __init__(self, workdir: Path, artifacts: Path, s3_port: int = S3_PORT, resync_seconds: float = 5.0):
        self.workdir, self.artifacts = workdir, artifacts
        self.s3_port, self.resync_seconds = s3_port, resync_seconds
        self.emulator: EmulatorThread | None = None
        self.moto: subprocess.Popen[bytes] | None = None
        self.operator: subprocess.Popen[bytes] | None = None
        self.runner: PodRunner | None = None
        self.kubeconfig = workdir / "kubeconfig"

    # ---- lifecycle -----------------------------------------------------------------------------------

    def start(self) -> LocalStack:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._start_moto()
        self._upload_adapters()
        self.emulator = EmulatorThread().start()
        self.kubeconfig.write_text(yaml.safe_dump(self.emulator.kubeconfig()))
        models = self.workdir / "pvc" / "demo-models" / "tiny-llama"
        shutil.copytree(self.artifacts / "model", models, dirs_exist_ok=True)
        self.kubectl("apply", "-f", str(ROOT / "crds"))
        self.start_operator()
        self.runner = PodRunner(self.kubeconfig, self.workdir).start()
        return self

    def stop(self) -> None:
        if self.runner is not None:
            self.runner.stop()
        self.stop_operator()
        if self.moto is not None:
            self.moto.terminate()
            self.moto.wait(timeout=10)
        if self.emulator is not None:
            self.emulator.stop()

    def start_operator(self) -> None:
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig), "LORAPLEX_RESYNC_SECONDS": str(self.resync_seconds),
               "LORAPLEX_SIDECAR_IMAGE": "loraplex/loraplex:0.1.0", "LORAPLEX_METRICS_PORT": "0"}
        log = (self.workdir / "operator.log").open("ab")
        self.operator = subprocess.Popen([sys.executable, "-m", "loraplex.cli", "operator", "--namespace", "default",
                                          "--standalone"], env=env, stdout=log, stderr=subprocess.STDOUT)

    def stop_operator(self, kill: bool = False) -> None:
        if self.operator is not None and self.operator.poll() is None:
            self.operator.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            self.operator.wait(timeout=15)

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
        result = subprocess.run([tool("kubectl"), *args], env=env, capture_output=True, text=True, timeout=60)
        if check and result.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)}: {result.stderr.strip()}")
        return result.stdout

    def api(self) -> kubernetes.client.ApiClient:
        configuration = kubernetes.client.Configuration()
        kubernetes.config.load_kube_config(str(self.kubeconfig), client_configuration=configuration)
        return kubernetes.client.ApiClient(configuration)

    def adapter(self, name: str) -> dict[str, Any]:
        return kubernetes.client.CustomObjectsApi(self.api()).get_namespaced_custom_object(
            GROUP, VERSION, "default", "loraadapters", name)

    def base_model(self, name: str) -> dict[str, Any]:
        return kubernetes.client.CustomObjectsApi(self.api()).get_namespaced_custom_object(
            GROUP, VERSION, "default", "basemodeldeployments", name)

    def phase(self, name: str) -> str | None:
        return (self.adapter(name).get("status") or {}).get("phase")

    def completion(self, pod: str, model: str, prompt: str = "What is 7 times 6?", max_tokens: int = 12) -> str:
        assert self.runner is not None
        request = urllib.request.Request(
            self.runner.url(pod, 8000) + "/v1/completions", method="POST",
            data=json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens}).encode(),
            headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return json.loads(response.read())["choices"][0]["text"]
        except urllib.error.HTTPError as error:
            raise RuntimeError(f"{model} on {pod}: {error.code} {error.read().decode()}") from None

    def served(self, pod: str) -> list[str]:
        assert self.runner is not None
        with urllib.request.urlopen(self.runner.url(pod, 8000) + "/v1/models", timeout=10) as response:
            return [card["id"] for card in json.loads(response.read())["data"]]

    def log_tail(self, lines: int = 40) -> str:
        text = ""
        for path in [self.workdir / "operator.log", *sorted((self.workdir / "pods").glob("*/*.log"))]:
            if path.exists():
                text += f"\n--- {path.relative_to(self.workdir)} ---\n" + "\n".join(
                    path.read_text(errors="replace").splitlines()[-lines:])
        return text
