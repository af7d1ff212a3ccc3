"""A real Kubernetes control plane on loopback ports: etcd, kube-apiserver (token authentication, RBAC,
service-account tokens), kube-controller-manager and kube-scheduler, as local processes.

    with ControlPlane(workdir).start() as cluster:
        cluster.kubeconfig   # admin (system:masters), for kubectl and the tests
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import ssl
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from loraplex.local.binaries import find_binaries

SERVICE_CIDR = "10.0.0.0/24"
ADMIN_USER = "loraplex-admin"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ControlPlaneError(RuntimeError):
    pass


@dataclass
class Component:
    name: str
    argv: list[str]
    log: Path
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(self.argv, stdout=self.log.open("ab"), stderr=subprocess.STDOUT,
                                        start_new_session=True)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, grace_seconds: float) -> None:
        if not self.alive():
            return
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=grace_seconds)
        except subprocess.TimeoutExpired:
            # kube-apiserver waits for long-running requests (watches) well past any useful grace period.
            self.process.kill()
            self.process.wait(timeout=10)

    def log_tail(self, lines: int = 30) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


@dataclass
class ControlPlane:
    workdir: Path
    binaries: Path | None = None
    components: dict[str, Component] = field(default_factory=dict)
    admin_token: str = field(default_factory=lambda: secrets.token_hex(16))
    apiserver_port: int = 0

    # ---- where things are ------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.apiserver_port}"

    @property
    def ca_file(self) -> Path:
        """The apiserver's self-signed serving certificate bundle, which also verifies it."""
        return self.workdir / "pki" / "apiserver.crt"

    @property
    def kubeconfig(self) -> Path:
        return self.workdir / "admin.kubeconfig"

    @property
    def service_account_key(self) -> Path:
        return self.workdir / "pki" / "sa.key"

    def write_kubeconfig(self, path: Path, token: str, user: str = "user", server: str | None = None,
                         namespace: str = "default") -> Path:
        """A kubeconfig that authenticates with `token` (an admin's, or a ServiceAccount's from TokenRequest)."""
        config = {
            "apiVersion": "v1", "kind": "Config", "current-context": "local",
            "clusters": [{"name": "local", "cluster": {"server": server or self.url,
                                                       "certificate-authority": str(self.ca_file)}}],
            "users": [{"name": user, "user": {"token": token}}],
            "contexts": [{"name": "local", "context": {"cluster": "local", "user": user,
                                                       "namespace": namespace}}],
        }
        path.write_text(yaml.safe_dump(config))
        path.chmod(0o600)
        return path

    # ---- lifecycle -------------------------------------------------------------------------------------

    def start(self, timeout: float = 90) -> ControlPlane:
        binaries = self.binaries or find_binaries()
        for folder in ("pki", "logs", "etcd"):
            (self.workdir / folder).mkdir(parents=True, exist_ok=True)
        self._write_credentials()
        deadline = time.monotonic() + timeout
        try:
            self._start_etcd(binaries, deadline)
            self._start_apiserver(binaries, deadline)
            self.write_kubeconfig(self.kubeconfig, self.admin_token, ADMIN_USER)
            self._start_controllers(binaries, deadline)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for name in ("kube-scheduler", "kube-controller-manager", "kube-apiserver", "etcd"):
            if name in self.components:
                self.components[name].stop(grace_seconds=5)

    def __enter__(self) -> ControlPlane:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _write_credentials(self) -> None:
        pki = self.workdir / "pki"
        (pki / "tokens.csv").write_text(f"{self.admin_token},{ADMIN_USER},{ADMIN_USER},system:masters\n")
        if not self.service_account_key.exists():
            _run(["openssl", "genrsa", "-out", str(self.service_account_key), "2048"])
            _run(["openssl", "rsa", "-in", str(self.service_account_key), "-pubout", "-out", str(pki / "sa.pub")])

    def _component(self, name: str, argv: list[str]) -> Component:
        component = Component(name, argv, self.workdir / "logs" / f"{name}.log")
        component.start()
        self.components[name] = component
        return component

    def _start_etcd(self, binaries: Path, deadline: float) -> None:
        client, peer = free_port(), free_port()
        self.etcd_url = f"http://127.0.0.1:{client}"
        # The flags both the official etcd and the development machines' minimal build understand.
        etcd = self._component("etcd", [
            str(binaries / "etcd"), "--data-dir", str(self.workdir / "etcd"),
            "--listen-client-urls", self.etcd_url, "--advertise-client-urls", self.etcd_url,
            "--listen-peer-urls", f"http://127.0.0.1:{peer}",
        ])
        self._wait(etcd, deadline, lambda: _get_json(f"{self.etcd_url}/health").get("health") == "true")

    def _start_apiserver(self, binaries: Path, deadline: float) -> None:
        self.apiserver_port = free_port()
        pki = self.workdir / "pki"
        apiserver = self._component("kube-apiserver", [
            str(binaries / "kube-apiserver"), f"--etcd-servers={self.etcd_url}",
            f"--secure-port={self.apiserver_port}", "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1",
            f"--cert-dir={pki}", f"--token-auth-file={pki / 'tokens.csv'}", "--authorization-mode=RBAC",
            f"--service-account-key-file={pki / 'sa.pub'}",
            f"--service-account-signing-key-file={self.service_account_key}",
            "--service-account-issuer=https://kubernetes.default.svc", f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--allow-privileged=true",
        ])
        self._wait(apiserver, deadline, lambda: self._get("/readyz") == "ok")

    def _start_controllers(self, binaries: Path, deadline: float) -> None:
        kubeconfig = str(self.kubeconfig)
        common = [f"--kubeconfig={kubeconfig}", f"--authentication-kubeconfig={kubeconfig}",
                  f"--authorization-kubeconfig={kubeconfig}", "--leader-elect=false", "--bind-address=127.0.0.1"]
        controller_port, scheduler_port = free_port(), free_port()
        controllers = self._component("kube-controller-manager", [
            str(binaries / "kube-controller-manager"), *common, f"--secure-port={controller_port}",
            f"--service-account-private-key-file={self.service_account_key}", f"--root-ca-file={self.ca_file}",
            "--use-service-account-credentials=true",
            # No cloud, no pod network to allocate: the controllers that need one stay off.
            "--controllers=*,-nodeipam,-cloud-node-lifecycle,-service-lb-controller,-route",
        ])
        scheduler = self._component("kube-scheduler", [
            str(binaries / "kube-scheduler"), *common, f"--secure-port={scheduler_port}"])
        self._wait(controllers, deadline, lambda: _healthz(controller_port))
        self._wait(scheduler, deadline, lambda: _healthz(scheduler_port))
        # Pods need their namespace's "default" ServiceAccount, which the controllers create.
        self._wait(controllers, deadline, lambda: self._get("/api/v1/namespaces/default/serviceaccounts/default"))

    def _wait(self, component: Component, deadline: float, ready: Any) -> None:
        last: Exception | None = None
        while time.monotonic() < deadline:
            if not component.alive():
                raise ControlPlaneError(f"{component.name} exited:\n{component.log_tail()}")
            try:
                if ready():
                    return
            except OSError as exc:  # not listening yet, or not ready (HTTP errors are OSErrors too)
                last = exc
            time.sleep(0.2)
        raise ControlPlaneError(f"{component.name} was not ready in time ({last}):\n{component.log_tail()}")

    def _get(self, path: str) -> str:
        request = urllib.request.Request(self.url + path, headers={"Authorization": f"Bearer {self.admin_token}"})
        context = ssl.create_default_context(cafile=str(self.ca_file))
        with urllib.request.urlopen(request, timeout=5, context=context) as response:
            return response.read().decode()


def _run(argv: list[str]) -> None:
    result = subprocess.run(argv, capture_output=True, text=True)
    if result.returncode != 0:
        raise ControlPlaneError(f"{' '.join(argv)}: {result.stderr.strip()}")


def _get_json(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=5) as response:
        return dict(json.loads(response.read()))


def _healthz(port: int) -> bool:
    """The controllers serve /healthz over TLS with a certificate of their own making; only liveness matters."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with urllib.request.urlopen(f"https://127.0.0.1:{port}/healthz", timeout=5, context=context) as response:
        return response.read() == b"ok"


def environment_for(kubeconfig: Path) -> dict[str, str]:
    return {**os.environ, "KUBECONFIG": str(kubeconfig)}
